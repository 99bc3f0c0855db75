"""The nightly on a Ray cluster of two nodes (`ray.cluster_utils.Cluster`: two raylets on this
machine, each with its own CPUs and object store).

The run starts from the session nightly's validated data and split and runs everything from
fine-tuning on with `--ray-address`: fine-tuning under Ray Train with its checkpoints in
`[pipeline] storage`, the embedding actors (the encoder reaches them through the object store),
the feature tables as Ray tasks over chunks of requests. Its features, scores and lists must
equal the one-node session nightly's: the same computation wherever it runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from conftest import NIGHTLY_TOML, count_stages

pytestmark = pytest.mark.slow


@pytest.fixture
def two_nodes() -> Iterator[Any]:
    from ray.cluster_utils import Cluster

    small = {"num_cpus": 2, "object_store_memory": 128 * 1024**2}
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={**small, "include_dashboard": False})  # fmt: skip
    try:
        cluster.add_node(**small)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def _without_run_stamp(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path).drop("generated_at", "model_version")


def test_nightly_on_two_nodes_runs_on_both_and_equals_one_node(nightly, two_nodes, tmp_path):
    out = tmp_path / "run"
    for name in ("validate", "split"):  # the rest runs on the cluster
        shutil.copytree(nightly.run_dir / name, out / name)
    shared = tmp_path / "shared"  # storage every node reaches (here: the same disk)
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(
        NIGHTLY_TOML.replace(
            "[pipeline]\n", f'[pipeline]\nchunk_rows = 2000\nstorage = "{shared}"\n'
        )
        + "\n[tracking]\nenabled = false\n"
    )
    cmd = [sys.executable, "-m", "recsys.cli", "nightly", "--data", str(nightly.data_dir),
           "--out", str(out), "--config", str(cfg), "--ray-address", two_nodes.address,
           "--show-users", "0"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    count_stages(done.stdout)
    for name in ("finetune", "embed", "features", "rank", "lists"):
        assert f"[{name}] running" in done.stdout, name

    frames = json.loads((out / "features" / "_stage.json").read_text())["summary"]
    assert frames["chunks"] > 4
    assert len(frames["nodes"]) == 2, frames["nodes"]  # both nodes computed chunks
    assert sum(frames["nodes"].values()) == frames["chunks"] * len(frames["variants"])
    assert not list(shared.iterdir())  # Ray Train's run folder is removed after

    ref = nightly.run_dir
    for f in sorted((ref / "features").glob("*.parquet")):
        assert pl.read_parquet(out / "features" / f.name).equals(pl.read_parquet(f)), f.name
    for name in ("scores.parquet", "scores_online.parquet"):
        assert pl.read_parquet(out / "evaluate" / name).equals(
            pl.read_parquet(ref / "evaluate" / name)
        ), name
    assert _without_run_stamp(out / "recommendations.parquet").equals(
        _without_run_stamp(nightly.result.recommendations)
    )
