"""Starting Ray for a job: join a cluster by address, or start a light local Ray.

A Ray already initialised in this process (by an earlier job or a test fixture) is reused, so
consecutive jobs of one nightly run pay Ray's start-up once.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import ray

from recsys import logs
from recsys.errors import ConfigError

# Worker processes inherit these: never download, no tokenizer thread pools fighting torch.
WORKER_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    object_store_memory: int | None = LOCAL_OBJECT_STORE_BYTES,
) -> bool:
    """Make sure Ray is up; return True when this call started it.

    address: a Ray cluster ("ray://host:10001", "host:6379" or "auto"); None starts a local
        Ray with `num_cpus` CPUs (default: $RECSYS_RAY_CPUS, else every core) and a small
        object store, without dashboard.

    Ray's own logs (its driver-side INFO lines, the workers' output) stay in its log folder
    (/tmp/ray/session_latest/logs) unless the process is verbose (recsys/logs.py).
    """
    if ray.is_initialized():
        return False
    verbose = logs.verbose()
    quiet: dict[str, Any] = {
        "log_to_driver": verbose,
        "logging_level": logging.DEBUG if verbose else logging.WARNING,
    }
    runtime_env: dict[str, Any] = {
        "env_vars": {**WORKER_ENV, logs.ENV: logging.getLevelName(logs.current())}
    }
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, **quiet)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(
                f"cannot connect to the Ray cluster at {address!r} ({e}); check --ray-address "
                "or leave it unset to run on a local Ray. A cluster with token authentication "
                "(`ray start`'s default) needs RAY_AUTH_MODE=token here and its token "
                "(~/.ray/auth_token or RAY_AUTH_TOKEN)"
            ) from e
        return True
    # A local Ray turns token authentication on by default (kept) and says so on the terminal
    # each start ("Token authentication is enabled ..."): that notice only when verbose.
    # (RAY_AUTH_MODE=token would say it without the notice, but only if set before Ray is
    # imported: Ray reads its config once, and a driver that read "disabled" is refused.)
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    auth.setLevel(logging.NOTSET if verbose else logging.ERROR)
    ray.init(
        num_cpus=num_cpus or _local_cpus(),
        object_store_memory=object_store_memory,
        include_dashboard=False,
        ignore_reinit_error=True,
        runtime_env=runtime_env,
        **quiet,
    )
    return True


def _local_cpus() -> int:
    """CPUs for a local Ray: RECSYS_RAY_CPUS if set, else every core of the machine."""
    raw = os.environ.get("RECSYS_RAY_CPUS", "").strip()
    if not raw:
        return os.cpu_count() or 1
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"RECSYS_RAY_CPUS must be a whole number >= 1, got {raw!r}")
    return int(raw)


def cluster_gpus() -> int:
    """Number of GPUs Ray sees in the cluster (0 on a CPU-only machine)."""
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def node_cpus() -> int:
    """CPUs of the largest alive node: what one worker or actor can be given (a request for
    the cluster-wide total would never be scheduled on a multi-node cluster)."""
    sizes = [int(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return max([*sizes, 1])


def quiet_ray_data() -> None:
    """No progress bars or per-run INFO logs from Ray Data (jobs print their own progress),
    unless verbose. Ray Data warns once that its bars are off, from its progress module: that
    notice only when verbose."""
    import ray.data

    verbose = logs.verbose()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    logging.getLogger("ray.data").setLevel(logging.DEBUG if verbose else logging.WARNING)
    notice = logging.getLogger("ray.data._internal.progress")
    notice.setLevel(logging.NOTSET if verbose else logging.ERROR)


def put_folder(path: str | os.PathLike[str]) -> list[Any]:
    """The files of a folder in Ray's object store, for workers on any node (nodes share no
    disk): one ObjectRef in a list, so a constructor or task receives the reference, not the
    bytes, and calls `local_folder` where it runs."""
    root = Path(path)
    files = {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
             if f.is_file()}  # fmt: skip
    return [ray.put(files)]


def local_folder(box: list[Any], prefix: str) -> Path:
    """A fresh local copy of a folder sent with `put_folder` (in this process's temp dir)."""
    files: dict[str, bytes] = ray.get(box[0])
    out = Path(tempfile.mkdtemp(prefix=prefix))
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return out


def ray_map(
    fn: Callable[[Any, Any], Any],
    shared: Any,
    items: Iterable[Any],
    *,
    in_flight: int | None = None,
    nodes: Counter[str] | None = None,
) -> Iterator[Any]:
    """`fn(shared, item)` for each item as Ray tasks (a CPU each), the results in the items'
    order. `shared` goes to the object store once (every task reads it from there, on any
    node); at most `in_flight` tasks (default: twice the cluster's CPUs) are submitted ahead of
    the result being read, so the driver holds a bounded number of results. `nodes` counts the
    tasks each node ran (its id's first 8 characters)."""
    limit = in_flight or 2 * cluster_cpus()
    task = ray.remote(num_cpus=1, max_retries=2)(_call_on_node)
    ref = ray.put(shared)
    pending: deque[Any] = deque()

    def take() -> Any:
        result, node = ray.get(pending.popleft())
        if nodes is not None:
            nodes[node] += 1
        return result

    for item in items:
        pending.append(task.remote(fn, ref, item))
        if len(pending) >= limit:
            yield take()
    while pending:
        yield take()


def _call_on_node(fn: Callable[[Any, Any], Any], shared: Any, item: Any) -> tuple[Any, str]:
    return fn(shared, item), ray.get_runtime_context().get_node_id()[:8]
