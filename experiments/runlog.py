"""A nightly run's record in the tracker: metrics of every table, tags of every choice, the
ranker's and the encoder's curves, plots and the evaluation as artifacts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiments.tracking import Tracker
from recsys.io import write_json


def _table_metrics(prefix: str, table: list[dict[str, Any]]) -> dict[str, float]:
    return {f"{prefix}.{row['model']}.{k}": v for row in table for k, v in row.items()
            if isinstance(v, int | float)}  # fmt: skip


def _log_evaluation(tracker: Tracker, ev: Mapping[str, Any]) -> None:
    """evaluation.json (batch fields at the top, "online", "lists", "candidate_recall")."""
    online = ev.get("online", {})
    tracker.log_metrics(_table_metrics("test", ev["test"]))
    tracker.log_metrics(_table_metrics("test_online", online.get("test", [])))
    if online:
        tracker.set_tags({"evaluation_online.freshness": online["freshness"],
                          "ranker_online.shipped": online["shipped_ranker"]["name"]})  # fmt: skip
        tracker.log_metrics({f"test_online.full_vs_behavioural.{k}": v
                             for k, v in online["full_vs_behavioural"].items()})  # fmt: skip
    tracker.log_metrics({f"valid.{k}": v for k, v in ev["validation"].items()})
    tracker.set_tags({"evaluation.freshness": ev["freshness"], "evaluation.versus": ev["versus"]})
    tracker.log_metrics({f"test.full_vs_behavioural.{k}": v
                         for k, v in ev["full_vs_behavioural"].items()})  # fmt: skip
    shipped = ev["shipped_ranker"]
    tracker.set_tags({"ranker.shipped": shipped["name"],
                      "ranker.shipped_reason": shipped["reason"][:5000]})  # fmt: skip
    tracker.log_metrics({f"candidates.{k}": v for k, v in ev["candidate_recall"].items()})


def _log_lists(tracker: Tracker, lists: Mapping[str, Any]) -> None:
    for row in lists.get("table", []):
        tracker.log_metrics({f"lists.{row['list']}.{k}": v for k, v in row.items()
                             if isinstance(v, int | float)})  # fmt: skip
    for row in lists.get("sources", []):
        src = f"retrieval.{row['source']}"
        tracker.log_metrics({f"{src}.recall": row["recall"],
                             f"{src}.ms_per_user": row["ms_per_user"]})  # fmt: skip
    if "prior_weight" in lists:
        tracker.log_metrics({"lists.prior_weight": lists["prior_weight"]})
        for w, recall in lists.get("prior_weight_validation", {}).items():
            tracker.log_metrics({f"valid_lists.prior_weight_{w}.recall": recall})
    if lists.get("ceiling"):
        ceiling = lists["ceiling"]
        tracker.log_metrics({"lists.ceiling.recall": ceiling["recall"],
                             "lists.ceiling.cold_share": ceiling["cold_share"]})  # fmt: skip
    if lists.get("note"):
        tracker.set_tags({"lists.evaluation": lists["note"]})


def flatten_history(hist: Any) -> dict[str, list[float]]:
    """LightGBM eval history {dataset: {metric: [..]}} (or {metric: [..]}) -> {name: [..]}."""
    out: dict[str, list[float]] = {}
    if not isinstance(hist, dict):
        return out
    for k, v in hist.items():
        if isinstance(v, dict):
            for m, vals in v.items():
                out[f"{k}.{m}".replace("@", "_at_")] = [float(x) for x in vals]
        elif isinstance(v, list):
            out[str(k).replace("@", "_at_")] = [float(x) for x in v]
    return out


def log_nightly(
    tracker: Tracker,
    evaluation: Mapping[str, Any],
    rank: Mapping[str, Any],
    finetune: Mapping[str, Any],
    cost: Mapping[str, Any],
    run_dir: Path,
) -> None:
    """Log a nightly's outcome: `evaluation` (evaluation.json), the rank stage's summary
    (`refresh` per mode, `rankers` by key), the finetune stage's summary, the cost report;
    plots and the evaluation go to the run's artifacts (from RUN_DIR/artifacts)."""
    from experiments.plots import plot_importance, plot_training_curves

    _log_evaluation(tracker, evaluation)
    refresh = rank["refresh"]["batch"]
    tracker.set_tags({"ranker.refresh": refresh["chosen"]})
    for period, aucs in refresh["validation_auc"].items():
        tracker.log_metrics({f"valid_refresh.{period}.{n}.auc": v for n, v in aucs.items()})
    _log_lists(tracker, evaluation.get("lists", {}))
    for i, loss in enumerate(finetune.get("losses", [])):
        tracker.log_metrics({"finetune.loss": loss}, step=i + 1)
    full = rank["rankers"]["lgbm_full"]
    for metric, values in flatten_history(full.get("history", {})).items():
        for i in range(0, len(values), max(1, len(values) // 200)):
            tracker.log_metrics({f"ranker.{metric}": values[i]}, step=i + 1)
    for name, r in cost["stages"].items():
        cpu = r["driver_cpu_seconds"] + r.get("worker_cpu_seconds", 0.0)
        tracker.log_metrics({f"seconds.{name}": r["wall_seconds"], f"cpu_seconds.{name}": cpu})
    art = run_dir / "artifacts"
    art.mkdir(exist_ok=True)
    plot_importance(full["importance"], art / "feature_importance.png")
    plot_training_curves(finetune.get("losses", []), full.get("history", {}),
                         art / "training_curves.png")  # fmt: skip
    write_json(cost, art / "cost_report.json")
    online = evaluation.get("online", {}).get("test", [])
    write_json({"test": evaluation["test"], "test_online": online,
                "validation": evaluation["validation"],
                "candidate_recall": evaluation["candidate_recall"], "lists": evaluation["lists"]},
               art / "evaluation.json")  # fmt: skip
    tracker.log_artifact(art)
    tracker.log_artifact(run_dir / "recommendations.parquet", artifact_path="lists")
