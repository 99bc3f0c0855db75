"""The `embed` job: the catalogue through the encoder on a Ray Data actor pool.

    report = run_embed(items, "out/encoder", "out/item_vectors.parquet")

Incremental: the existing file at `out_path` supplies the previous vectors; an item keeps its
vector when its text hash and the encoder id are unchanged, so only new or changed items go to
Ray (none at all: Ray is not even started), and each distinct text among them goes once (colour
variants share a text: half of H&M's articles). Items gone from the catalogue are dropped. The
file is replaced atomically.

Actors: one per GPU when Ray sees GPUs ("auto" = fp16), else CPU actors ("auto" = int8), each
using its share of one node's CPUs as torch threads; the texts are split into enough blocks for
every actor. A configured form the device cannot compute (int8 on CUDA, fp16 on CPU) is refused.
The vectors' `encoder_id` names the encoder and the form (`<encoder id>+cpu-int8`), so vectors
of different forms never mix under one id. The job's own logic (what to embed, assembling the
table) is `recsys.encoder.vectors`.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import ray

from pipelines.ray_utils import (
    cluster_cpus,
    cluster_gpus,
    init_ray,
    local_folder,
    node_cpus,
    put_folder,
    quiet_ray_data,
)
from recsys.encoder import EncoderConfig, encoder_id_for
from recsys.encoder.store import head_only
from recsys.encoder.vectors import (
    EmbedPlan,
    assemble,
    empty_vectors,
    plan_embedding,
    read_item_vectors,
    through_head,
    vectors_frame,
)
from recsys.errors import DataError
from recsys.io import write_parquet

RAY_BATCH = 1024  # texts per Ray Data batch; the encoder length-sorts within it
ACTORS_READY_S = 600  # how long the embed job waits for its actor pool to start


@dataclass
class EmbedReport:
    """What one embedding run did; `device` says where the new vectors were computed.

    embedded: items that got a new vector; distinct_texts: how many texts the encoder ran on;
    through_head: items whose new vector is the head applied to their base vector (see
    `run_embed`'s base_vectors), without running the encoder.
    """

    embedded: int
    reused: int
    dropped: int
    fallback_texts: int
    seconds: float
    device: str
    encoder_id: str
    out_path: Path
    actors: int = 0
    distinct_texts: int = 0
    texts_per_actor: dict[str, int] = field(default_factory=dict)  # "node:pid" -> texts
    worker_cpu_seconds: float = 0.0  # CPU time of the actor processes, all of them together
    worker_peak_rss_mb: float = 0.0  # the largest actor's peak resident memory
    through_head: int = 0


class EmbedActor:
    """A Ray Data actor holding one loaded encoder; called with batches of item texts."""

    def __init__(
        self,
        encoder_files: list[Any] | None,
        quantize: str,
        max_length: int,
        template: str,
        batch_size: int,
        threads: int,
        expected_id: str,
    ) -> None:
        import torch

        from recsys.encoder import TextEncoder

        use_gpu = bool(ray.get_gpu_ids()) and torch.cuda.is_available()
        if not use_gpu:
            torch.set_num_threads(max(1, threads))
        # the encoder folder comes through the object store: no node needs the driver's disk
        encoder_path = None if encoder_files is None else local_folder(encoder_files, "encoder-")
        try:
            self.encoder = TextEncoder.load(
                encoder_path,
                quantize=quantize,
                device="cuda" if use_gpu else "cpu",
                max_length=max_length,
                template=template,
            )
        finally:  # loaded into memory: the copy is not needed
            if encoder_path is not None:
                shutil.rmtree(encoder_path, ignore_errors=True)
        if self.encoder.encoder_id != expected_id:
            raise RuntimeError(
                "the encoder changed during the run "
                f"(id {self.encoder.encoder_id[:12]}, expected {expected_id[:12]})"
            )
        self.batch_size = batch_size
        self.name = f"{ray.get_runtime_context().get_node_id()[:8]}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        vectors = self.encoder.embed([str(t) for t in batch["text"]], batch_size=self.batch_size)
        n = len(vectors)
        who = np.full(n, self.name)  # which actor did it, and its process's cost so far
        cpu = np.full(n, time.process_time())
        rss = np.full(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return {"text_hash": batch["text_hash"], "vector": vectors, "actor": who,
                "cpu_s": cpu, "rss_mb": rss}  # fmt: skip


def _previous(out_path: Path) -> pl.DataFrame | None:
    return read_item_vectors(out_path) if out_path.is_file() else None


def vector_form(quantize: str, gpus: int) -> str:
    """The device class and numeric form vectors get: "cpu-int8", "cuda-fp16", "cpu-fp32"...

    A configured form the device cannot compute is refused (ConfigError), never swapped."""
    import torch

    from recsys.encoder.model import resolve_precision

    device = "cuda" if gpus else "cpu"
    return f"{device}-{resolve_precision(quantize, torch.device(device))}"


def _cluster_gpus(ray_address: str | None) -> int:
    """GPUs the embedding would run on, without starting a local Ray to ask (a local Ray sees
    this machine's GPUs)."""
    if ray_address is None and not ray.is_initialized():
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    init_ray(ray_address)
    return cluster_gpus()


def _embed_on_ray(
    plan: EmbedPlan,
    encoder_path: str | None,
    config: EncoderConfig,
    encoder_id: str,
    form: str,
    num_actors: int | None,
) -> tuple[pl.DataFrame, str, int, dict[str, int], dict[str, tuple[float, float]]]:
    """(fresh vectors table, device description, actors, texts embedded per actor, each
    actor's (CPU seconds, peak RSS MB)) for `plan.todo` on the Ray cluster.

    Only distinct texts travel (keyed by text hash); items sharing a text share its vector.
    The texts are split into at least 4 blocks per actor, so every actor of the pool gets work.
    """
    gpus = cluster_gpus()
    vector_id = f"{encoder_id}+{form}"
    if gpus:
        actors = num_actors or gpus
        num_gpus, num_cpus, threads = 1, 1, 1
        device = f"cuda x{actors} ({form})"
    else:
        cpus = cluster_cpus()
        actors = num_actors or max(1, cpus // 4)  # a few threads per actor beats many actors
        threads = max(1, min(node_cpus(), cpus // actors))
        num_gpus, num_cpus = 0, threads
        device = f"cpu x{actors} ({form})"
    todo = plan.todo.select("item_id", "text", "text_hash")
    distinct = todo.unique(subset="text_hash", keep="first", maintain_order=True)
    quiet_ray_data()
    blocks = min(distinct.height, max(4 * actors, math.ceil(distinct.height / RAY_BATCH)))
    # Blocks cut here, not by a Ray repartition: its tasks would wait for CPUs the actors hold.
    arrow = distinct.select("text_hash", "text").to_arrow()
    size = math.ceil(arrow.num_rows / max(1, blocks))
    ds = ray.data.from_arrow([arrow.slice(s, size) for s in range(0, arrow.num_rows, size)])
    # Work is handed out only once every actor of the pool has started: by default Ray Data
    # starts as soon as one is ready, and a fast first actor can take every block of a small
    # catalogue while the second is still importing torch.
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.wait_for_min_actors_s = max(data_ctx.wait_for_min_actors_s, ACTORS_READY_S)
    # Ray Data restarts a dead actor by default, but its constructor arguments live in the
    # object store, from where a restart cannot rebuild it (ray-project/ray#53727; Ray says so
    # on the terminal). A dead actor fails the stage instead; the nightly resumes. Ray 2.60
    # has no named parameter for it: its own docs (ActorPoolMapOperator) say to pass
    # max_restarts=0 as an extra remote argument, which it also marks deprecated (for 2.64).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        out = ds.map_batches(
            EmbedActor,
            fn_constructor_kwargs={
                "encoder_files": None if encoder_path is None else put_folder(encoder_path),
                "quantize": config.quantize,
                "max_length": config.max_length,
                "template": config.template,
                "batch_size": config.batch_size,
                "threads": threads,
                "expected_id": encoder_id,
            },
            batch_size=min(RAY_BATCH, size),  # a block per call: bundling blocks up to a larger
            # batch would hand a small catalogue to one actor
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            max_restarts=0,
        )
    row_of: dict[str, int] = {}
    vectors: list[np.ndarray] = []
    per_actor: dict[str, int] = {}
    usage: dict[str, tuple[float, float]] = {}  # actor -> (CPU seconds, peak RSS MB)
    returned = 0
    for batch in out.iter_batches(batch_format="numpy", batch_size=None):
        for h in batch["text_hash"]:
            row_of[str(h)] = returned
            returned += 1
        vectors.append(np.asarray(batch["vector"], dtype=np.float32))
        for a, cpu, rss in zip(batch["actor"], batch["cpu_s"], batch["rss_mb"], strict=True):
            per_actor[str(a)] = per_actor.get(str(a), 0) + 1
            was = usage.get(str(a), (0.0, 0.0))
            usage[str(a)] = (max(was[0], float(cpu)), max(was[1], float(rss)))
    hashes = todo["text_hash"].to_list()
    if not returned == len(row_of) == distinct.height or not row_of.keys() >= set(hashes):
        raise RuntimeError(f"embedding returned {returned} vectors for {distinct.height} texts")
    rows = np.fromiter((row_of[h] for h in hashes), dtype=np.int64, count=len(hashes))
    fresh = np.concatenate(vectors)[rows]
    table = vectors_frame(todo["item_id"].to_list(), fresh, hashes, vector_id)
    return table, device, actors, dict(sorted(per_actor.items())), usage


def run_embed(
    items: pl.DataFrame,
    encoder_dir: str | os.PathLike[str] | None,
    out_path: str | os.PathLike[str],
    *,
    config: EncoderConfig = EncoderConfig(),  # noqa: B008 - frozen, so a shared default is safe
    ray_address: str | None = None,
    num_actors: int | None = None,
    base_vectors: str | os.PathLike[str] | None = None,
) -> EmbedReport:
    """Embed `items` (canonical items table) into `out_path` (item_vectors.parquet).

    encoder_dir: an encoder directory or base model folder; None = `config.model_path`, and
        when that is None too, the packaged MiniLM.
    ray_address: a Ray cluster; None = a local Ray (started only if something needs embedding).
    num_actors: actor pool size; None = one per GPU, or one per 4 CPUs (at least one).
    base_vectors: an item vectors file of the encoder's base model in the same form. When the
        encoder is that base model followed by a projection head alone (`head_only`: fine-tuning
        shipped a head epoch), each text found there gets the head applied to its base vector,
        the same vector the encoder computes, and only the others go to Ray.
    """
    t0 = time.perf_counter()
    if "item_id" not in items.columns:
        raise DataError("items: no item_id column; pass the canonical items table")
    out = Path(out_path)
    path = encoder_dir if encoder_dir is not None else config.model_path
    encoder_path = str(path) if path is not None else None
    encoder_id = encoder_id_for(encoder_path, config.max_length, config.template)
    # The vectors' identity: the encoder's and the form they are computed in, so vectors of
    # another precision or device class are re-embedded, never mixed in.
    form = vector_form(config.quantize, _cluster_gpus(ray_address))
    vector_id = f"{encoder_id}+{form}"
    plan = plan_embedding(items, config.template, vector_id, _previous(out))
    embedded = plan.todo.height
    derived, base = empty_vectors(), _base_of(encoder_path, base_vectors)
    if base is not None and plan.todo.height:
        weight, base_dir = base
        base_id = f"{encoder_id_for(base_dir, config.max_length, config.template)}+{form}"
        assert base_vectors is not None
        derived, plan = through_head(
            plan, read_item_vectors(base_vectors), base_id, weight, vector_id
        )
    fresh, actors = empty_vectors(), 0
    device = "head on base vectors" if derived.height else "none (all reused)"
    per_actor: dict[str, int] = {}
    usage: dict[str, tuple[float, float]] = {}
    distinct_texts = plan.todo["text_hash"].n_unique()
    if plan.todo.height:
        init_ray(ray_address)
        fresh, device, actors, per_actor, usage = _embed_on_ray(
            plan, encoder_path, config, encoder_id, form, num_actors
        )
    table = assemble(plan, derived, fresh)
    write_parquet(table, out)
    return EmbedReport(
        embedded=embedded,
        reused=plan.reused.height,
        dropped=plan.dropped,
        fallback_texts=plan.fallback_texts,
        seconds=time.perf_counter() - t0,
        device=device,
        encoder_id=vector_id,
        out_path=out,
        actors=actors,
        distinct_texts=distinct_texts,
        texts_per_actor=per_actor,
        worker_cpu_seconds=sum(u[0] for u in usage.values()),
        worker_peak_rss_mb=max((u[1] for u in usage.values()), default=0.0),
        through_head=derived.height,
    )


def _base_of(
    encoder_path: str | None, base_vectors: str | os.PathLike[str] | None
) -> tuple[np.ndarray, Path] | None:
    """(head weight, base model folder) when base vectors are given and the encoder is its base
    model plus a head alone, else None."""
    if base_vectors is None or encoder_path is None or not Path(base_vectors).is_file():
        return None
    return head_only(encoder_path)
