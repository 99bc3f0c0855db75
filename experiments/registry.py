"""The model registry: every nightly bundle becomes a registered model version; the alias
`champion` moves to it only if its validation metric is no worse than the current champion's on
the same validation data. The decision and its reason are recorded on the version and returned."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments.tracking import _metric_key, _quiet_mlflow

logger = logging.getLogger(__name__)
ALIAS = "champion"


def register_bundle(
    tracking_uri: str,
    model_name: str,
    bundle_dir: str | Path,
    *,
    run_id: str,
    validation: dict[str, float],
    validation_key: str,
    primary_metric: str,
    evaluate_champion: Callable[[str], dict[str, float]],
) -> dict[str, Any]:
    """Log `bundle_dir` to the active run, register it and decide whether it becomes champion.

    `validation_key` identifies the validation data (dataset fingerprint + split); when the
    champion was validated on other data, `evaluate_champion(local_bundle_path)` re-scores it on
    this run's validation data so the comparison is like for like.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    _quiet_mlflow()
    client = mlflow.MlflowClient(tracking_uri)
    mlflow.log_artifacts(str(bundle_dir), artifact_path="bundle")
    run = client.get_run(run_id)
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        client.create_registered_model(model_name, description="recsys model bundles (nightly)")
    ours = float(validation[primary_metric])
    tags = {_metric_key(f"valid.{k}"): str(v) for k, v in validation.items()}
    tags["validation_key"] = validation_key
    mv = client.create_model_version(
        model_name, source=f"{run.info.artifact_uri}/bundle", run_id=run_id, tags=tags
    )
    try:
        champ = client.get_model_version_by_alias(model_name, ALIAS)
    except MlflowException:
        champ = None

    if champ is None:
        promote, reason = True, f"no {ALIAS} yet: version {mv.version} becomes {ALIAS}"
        theirs = None
    else:
        theirs = None
        if champ.tags.get("validation_key") == validation_key:
            theirs = float(champ.tags.get(_metric_key(f"valid.{primary_metric}"), "nan"))
            how = "its recorded validation metrics"
        else:
            try:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"models:/{model_name}/{champ.version}", tracking_uri=tracking_uri
                )
                theirs = float(evaluate_champion(path)[primary_metric])
                how = "re-scored on this run's validation data"
            except Exception as e:  # an unreadable champion must not block a new, valid model
                logger.warning("could not evaluate the champion: %s", e)
                how = f"the champion could not be evaluated ({type(e).__name__}: {e})"
        if theirs is None or theirs != theirs:  # missing or NaN
            promote = True
            reason = f"version {mv.version} becomes {ALIAS}: {how}"
        else:
            promote = ours >= theirs - 1e-12
            verb = "becomes" if promote else "does not become"
            cmp = ">=" if promote else "<"
            reason = (
                f"version {mv.version} {verb} {ALIAS}: validation {primary_metric} {ours:.4f} "
                f"{cmp} {ALIAS} version {champ.version}'s {theirs:.4f} ({how})"
            )
    if promote:
        client.set_registered_model_alias(model_name, ALIAS, mv.version)
    client.set_model_version_tag(model_name, mv.version, "decision", reason)
    client.set_model_version_tag(model_name, mv.version, "promoted", str(promote).lower())
    return {
        "model_name": model_name,
        "version": str(mv.version),
        "promoted": promote,
        "reason": reason,
        "metric": primary_metric,
        "value": ours,
        "champion_value": theirs,
        "previous_champion": None if champ is None else str(champ.version),
    }
