"""The promotion gate: paired, with a noise margin, fail-closed; on a real MLflow store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from experiments.registry import ALIAS, gate_decision, register_bundle


def _scores(n_imp: int, quality: float, seed: int) -> pl.DataFrame:
    """n_imp impressions of 10 items, item 0 clicked; the score ranks it first with
    probability ~quality (per impression, from its own seed)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_imp):
        s = rng.random(10)
        if rng.random() < quality:
            s[0] = 2.0
        rows += [(f"i{i}", j == 0, float(s[j])) for j in range(10)]
    return pl.DataFrame(rows, schema=["impression_id", "clicked", "score"], orient="row")


def test_gate_promotes_a_clear_gain_only() -> None:
    base = _scores(400, 0.3, seed=1)
    same = gate_decision(base, base, "ndcg@10", 2.0)
    assert same["diff"] == 0 and same["promote"] is False  # a tie keeps the champion
    better = gate_decision(_scores(400, 0.8, seed=1), base, "ndcg@10", 2.0)
    assert better["diff"] > 0.2 and better["promote"] is True
    assert better["n_impressions"] == 400
    worse = gate_decision(base, _scores(400, 0.8, seed=1), "ndcg@10", 2.0)
    assert worse["promote"] is False
    # A small gain: promoted with no margin, refused once it must exceed 2 standard errors.
    missed = base.filter(pl.col("clicked") & (pl.col("score") < 2.0))["impression_id"].head(
        3
    )  # three impressions where the click was not put first
    slight = base.with_columns(
        pl.when(pl.col("clicked") & pl.col("impression_id").is_in(missed.implode()))
        .then(2.0)
        .otherwise(pl.col("score"))
        .alias("score")
    )
    d = gate_decision(slight, base, "ndcg@10", 0.0)
    assert 0 < d["diff"] < 2 * d["se"] and d["promote"] is True
    assert gate_decision(slight, base, "ndcg@10", 2.0)["promote"] is False
    with pytest.raises(ValueError, match="same rows"):
        gate_decision(base.head(20), base, "auc", 2.0)


def _register(uri: str, bundle: Path, gate) -> dict:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("gate-test")
    with mlflow.start_run() as run:
        return register_bundle(
            uri, "gate-test", bundle, run_id=run.info.run_id, validation={"ndcg@10": 0.5},
            validation_key="k", primary_metric="ndcg@10", gate_scores=gate, margin_se=2.0,
        )  # fmt: skip


def test_registry_gate_fails_closed(tmp_path: Path, bundle_dir: Path) -> None:
    """A real bundle (each version is a pyfunc model of it); the gate's scores are made up."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    bundle = bundle_dir
    good, better = _scores(300, 0.4, seed=2), _scores(300, 0.9, seed=2)
    try:
        first = _register(uri, bundle, lambda path: good)
        assert first["promoted"] is True and "no champion yet" in first["reason"]
        # Same scores as the champion: within the noise, refused.
        tie = _register(uri, bundle, lambda path: good)
        assert tie["promoted"] is False and "within the noise" in tie["reason"]

        # A champion that cannot be scored keeps the alias, even against a better model.
        def broken_champion(path: str) -> pl.DataFrame:
            if path != str(bundle):
                raise OSError("bundle unreadable")
            return better

        kept = _register(uri, bundle, broken_champion)
        assert kept["promoted"] is False and "could not be scored" in kept["reason"]
        assert "bundle unreadable" in kept["reason"]
        client = mlflow.MlflowClient(uri)
        assert client.get_model_version_by_alias("gate-test", ALIAS).version == 1
        # A clearly better model takes it; the decision and its numbers are recorded.
        win = _register(uri, bundle, lambda path: better if path == str(bundle) else good)
        assert win["promoted"] is True and win["gate"]["diff"] > 0.2
        mv = client.get_model_version_by_alias("gate-test", ALIAS)
        assert str(mv.version) == win["version"] == "4"
        assert float(mv.tags["gate.diff"]) == pytest.approx(win["gate"]["diff"])
        assert "becomes champion" in mv.tags["decision"]
        assert mv.source.startswith("models:/m-")  # the logged pyfunc model
        run = client.get_run(mv.run_id)
        assert run.data.tags["gate.promoted"] == "true"
        assert "gate.json" in {a.path for a in client.list_artifacts(mv.run_id)}
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
