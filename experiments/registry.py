"""The model registry and its promotion gate.

Every nightly bundle becomes a registered model version. The alias `champion` moves to it only
when it beats the current champion by more than the noise on the *gate slice*: the run's test
impressions, which neither early stopping nor any fit has seen. Both versions are scored there
by the same function, at the same feature freshness, and compared per impression (paired): the
challenger is promoted when its mean advantage in the primary metric exceeds `margin_se`
standard errors of that paired difference. The gate fails closed: a champion that cannot be
scored keeps the alias, and the reason says why. Every decision, with its numbers, is recorded
on the model version (tags), on the run (tags and a `gate.json` artifact) and returned.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from experiments.tracking import _metric_key, _quiet_mlflow
from recsys.metrics import paired_difference
from serving.pyfunc import log_bundle_model
from serving.source import resolve_source

logger = logging.getLogger(__name__)
ALIAS = "champion"
GateScores = Callable[[str], pl.DataFrame]  # bundle path -> impression_id, clicked, score


def gate_decision(
    ours: pl.DataFrame, theirs: pl.DataFrame, metric: str, margin_se: float
) -> dict[str, Any]:
    """Challenger (`ours`) against champion (`theirs`), both one row per shown item of the same
    gate impressions in the same order (impression_id, clicked, score).

    Returns {diff, se, n_impressions, promote}: diff is the mean over impressions of the
    challenger's `metric` minus the champion's, se its standard error; promote is
    diff > margin_se * se (a tie, or a gain within the noise, keeps the champion)."""
    if ours.height != theirs.height or not ours["impression_id"].equals(theirs["impression_id"]):
        raise ValueError("gate: challenger and champion were not scored on the same rows")
    frame = ours.select("impression_id", "clicked", pl.col("score").alias("challenger"))
    frame = frame.with_columns(theirs["score"].alias("champion"))
    diff, se = paired_difference(frame, "challenger", "champion", metric)
    n = frame["impression_id"].n_unique()
    promote = bool(math.isfinite(diff) and math.isfinite(se) and diff > margin_se * se)
    return {"diff": diff, "se": se, "n_impressions": n, "promote": promote}


def register_bundle(
    tracking_uri: str,
    model_name: str,
    bundle_dir: str | Path,
    *,
    run_id: str,
    validation: dict[str, float],
    validation_key: str,
    primary_metric: str,
    gate_scores: GateScores,
    margin_se: float = 2.0,
) -> dict[str, Any]:
    """Log `bundle_dir` to the active run as a pyfunc model (serving/pyfunc.py: what
    `mlflow.pyfunc.load_model("models:/NAME@champion")` and `recsys serve --model-uri` load),
    register it and decide whether it becomes champion.

    gate_scores(bundle_path): the bundle's scores on the gate slice (see the module docstring),
    called for this bundle and for the champion's downloaded copy. validation and
    validation_key are recorded on the version (tags).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    _quiet_mlflow()
    client = mlflow.MlflowClient(tracking_uri)
    info = log_bundle_model(bundle_dir)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="recsys model bundles (nightly)")
    tags = {_metric_key(f"valid.{k}"): str(v) for k, v in validation.items()}
    tags["validation_key"] = validation_key
    mv = client.create_model_version(
        model_name, source=info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id
    )
    try:
        champ = client.get_model_version_by_alias(model_name, ALIAS)
    except MlflowException:
        champ = None

    gate: dict[str, Any] = {"metric": primary_metric, "margin_se": margin_se}
    if champ is None:
        promote, reason = True, f"no {ALIAS} yet: version {mv.version} becomes {ALIAS}"
    else:
        ours = theirs = None
        try:
            ours = gate_scores(str(bundle_dir))
            path = resolve_source(f"models:/{model_name}/{champ.version}", tracking_uri)
            theirs = gate_scores(str(path))
        except Exception as e:  # fail closed: the champion keeps the alias
            who = "this version" if ours is None else f"{ALIAS} version {champ.version}"
            logger.warning("could not score %s on the gate slice: %s", who, e)
            promote = False
            reason = (
                f"version {mv.version} does not become {ALIAS}: {who} could not be scored on "
                f"the gate slice ({type(e).__name__}: {e}), so version {champ.version} stays "
                f"{ALIAS}; to promote anyway, set the alias by hand (MlflowClient()."
                f"set_registered_model_alias({model_name!r}, {ALIAS!r}, {mv.version}))"
            )
        if ours is not None and theirs is not None:
            gate.update(gate_decision(ours, theirs, primary_metric, margin_se))
            promote = gate["promote"]
            diff, se = gate["diff"], gate["se"]
            why = (
                f"{primary_metric} {diff:+.4f} (se {se:.4f}) over {ALIAS} version "
                f"{champ.version} on {gate['n_impressions']} gate impressions"
            )
            if promote:
                reason = f"version {mv.version} becomes {ALIAS}: {why}, > {margin_se:g} se"
            else:
                reason = (
                    f"version {mv.version} does not become {ALIAS}: {why}, not > "
                    f"{margin_se:g} se ({'worse' if diff < 0 else 'within the noise'})"
                )
    gate.update({"promoted": promote, "reason": reason})
    if promote:
        client.set_registered_model_alias(model_name, ALIAS, mv.version)
    client.set_model_version_tag(model_name, mv.version, "decision", reason)
    client.set_model_version_tag(model_name, mv.version, "promoted", str(promote).lower())
    numbers = {k: gate[k] for k in ("diff", "se", "n_impressions") if k in gate}
    for k, v in numbers.items():
        client.set_model_version_tag(model_name, mv.version, f"gate.{k}", str(v))
    client.set_tag(run_id, "gate.promoted", str(promote).lower())
    client.log_dict(run_id, {"version": str(mv.version), **gate}, "gate.json")
    return {
        "model_name": model_name,
        "version": str(mv.version),
        "promoted": promote,
        "reason": reason,
        "metric": primary_metric,
        "value": float(validation[primary_metric]),
        "gate": gate,
        "previous_champion": None if champ is None else str(champ.version),
    }
