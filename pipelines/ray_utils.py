"""Starting Ray for a job: join a cluster by address, or start a light local Ray.

A Ray already initialised in this process (by an earlier job or a test fixture) is reused, so
consecutive jobs of one nightly run pay Ray's start-up once.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

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
        Ray with `num_cpus` CPUs (default: min(2, os.cpu_count())) and a small object store,
        without dashboard and without worker logs on the driver.
    """
    if ray.is_initialized():
        return False
    runtime_env: dict[str, Any] = {"env_vars": dict(WORKER_ENV)}
    if address:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(
                f"cannot connect to the Ray cluster at {address!r} ({e}); check --ray-address "
                "or leave it unset to run on a local Ray"
            ) from e
        return True
    ray.init(
        num_cpus=num_cpus or min(2, os.cpu_count() or 1),
        object_store_memory=object_store_memory,
        include_dashboard=False,
        log_to_driver=False,
        ignore_reinit_error=True,
        runtime_env=runtime_env,
    )
    return True


def cluster_gpus() -> int:
    """Number of GPUs Ray sees in the cluster (0 on a CPU-only machine)."""
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 1))


def device_name(gpus: int) -> str:
    """A short description of where a job runs, for reports ("cpu", "cuda x2")."""
    return f"cuda x{gpus}" if gpus else "cpu"


def quiet_ray_data() -> None:
    """No progress bars or per-run INFO logs from Ray Data (jobs print their own summary)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
