"""Compare nightly runs in MLflow: the latest run of each named experiment config, side by side.

recsys compare [--tracking-uri URI] [--experiment recsys-nightly]

Per config: the shipped full ranker's test metrics (batch and online freshness), the
behavioural ranker's nDCG@10 beside it, validation nDCG@10, which ranker each mode shipped,
what the run cost (wall and CPU seconds over its stages, fine-tuning's wall seconds) and the
registry's decision.
"""

from __future__ import annotations

import os
from typing import Any

from experiments.tracking import _quiet_mlflow
from recsys.errors import ConfigError

COLUMNS = ("ndcg_at_10", "ndcg_at_5", "mrr", "auc")
NAN = float("nan")


def compare_runs(
    *, tracking_uri: str | None = None, experiment: str = "recsys-nightly"
) -> list[dict[str, Any]]:
    """One row per config tag (its latest finished nightly run; see the module docstring for
    the figures). Raises ConfigError when there is no such experiment."""
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
        m, tags = r.data.metrics, r.data.tags
        row: dict[str, Any] = {"config": name, "run_id": r.info.run_id[:8]}
        for c in COLUMNS:
            row[f"test.{c}"] = m.get(f"test.lgbm_full.{c}", NAN)
        row["test.behavioural.ndcg_at_10"] = m.get("test.lgbm_behavioural.ndcg_at_10", NAN)
        row["test_online.ndcg_at_10"] = m.get("test_online.lgbm_full.ndcg_at_10", NAN)
        row["valid.ndcg_at_10"] = m.get("valid.ndcg_at_10", NAN)
        row["shipped"] = tags.get("ranker.shipped", "")
        row["shipped_online"] = tags.get("ranker_online.shipped", "")
        row["wall_s"] = _total(m, "seconds.")
        row["cpu_s"] = _total(m, "cpu_seconds.")
        row["finetune_s"] = m.get("seconds.finetune", NAN)
        row["champion"] = tags.get("champion_decision", "")[:40]
        seen[name] = row
    return sorted(seen.values(), key=lambda x: str(x["config"]))


def _total(metrics: dict[str, float], prefix: str) -> float:
    """The sum of the per-stage metrics named `prefix`STAGE (NaN when there are none)."""
    values = [v for k, v in metrics.items() if k.startswith(prefix)]
    return float(sum(values)) if values else NAN


def side_by_side(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`compare_runs` rows turned: one row per figure, one column per config."""
    if not rows:
        return []
    keys = [k for k in rows[0] if k != "config"]
    return [{"figure": k, **{str(r["config"]): r.get(k, "") for r in rows}} for k in keys]
