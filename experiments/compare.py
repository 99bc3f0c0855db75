"""Compare nightly runs in MLflow: the latest run of each named experiment config, side by side.

recsys compare [--tracking-uri URI] [--experiment recsys-nightly]
"""

from __future__ import annotations

import os
from typing import Any

from experiments.tracking import _quiet_mlflow
from recsys.errors import ConfigError

COLUMNS = ("ndcg_at_10", "ndcg_at_5", "mrr", "auc")


def compare_runs(
    *, tracking_uri: str | None = None, experiment: str = "recsys-nightly"
) -> list[dict[str, Any]]:
    """One row per config tag (latest finished run): test metrics of lgbm_full, validation
    nDCG@10, seconds. Raises ConfigError when there is no such experiment."""
    import mlflow

    _quiet_mlflow()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ConfigError(
            f"no MLflow experiment {experiment!r} at {uri}; run `recsys nightly` first or pass "
            "--tracking-uri (e.g. sqlite:///demo/mlflow.db)"
        )
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'FINISHED' and tags.config != ''",
        order_by=["attributes.start_time DESC"],
        max_results=500,
    )
    seen: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r.data.tags.get("mlflow.parentRunId"):
            continue
        name = r.data.tags.get("config", "?")
        if name in seen:
            continue
        m = r.data.metrics
        row: dict[str, Any] = {"config": name, "run_id": r.info.run_id[:8]}
        for c in COLUMNS:
            row[f"test {c}"] = m.get(f"test.lgbm_full.{c}", float("nan"))
        row["test behavioural ndcg_at_10"] = m.get("test.lgbm_behavioural.ndcg_at_10", float("nan"))
        row["valid ndcg_at_10"] = m.get("valid.ndcg_at_10", float("nan"))
        row["finetune s"] = m.get("seconds.finetune", float("nan"))
        row["champion"] = r.data.tags.get("champion_decision", "")[:40]
        seen[name] = row
    return sorted(seen.values(), key=lambda x: str(x["config"]))
