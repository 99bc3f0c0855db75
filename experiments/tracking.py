"""Experiment tracking handed into jobs: an MLflow tracker, or one that does nothing.

Jobs call `tracker.log_params/log_metrics/log_artifact/stage(...)`; they never test whether tracking
is on. `MlflowTracker` uses a local sqlite store by default (`sqlite:///<dir>/mlflow.db`, with
artifacts beside it) or `MLFLOW_TRACKING_URI`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Tracker(Protocol):
    """What a job may tell the tracking system."""

    run_id: str | None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, str]) -> None: ...
    def stage(self, name: str) -> contextlib.AbstractContextManager[Tracker]: ...


class NullTracker:
    """Tracking off: accepts everything, records nothing."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: Mapping[str, str]) -> None:
        pass

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[NullTracker]:
        yield self


def default_tracking_uri(base_dir: str | Path) -> str:
    """`$MLFLOW_TRACKING_URI`, else a sqlite store in `base_dir` (created if needed)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'mlflow.db'}"


def _quiet_mlflow() -> None:
    """MLflow's INFO lines off; its artifact progress bars only when verbose (RECSYS_LOG_LEVEL
    DEBUG: recsys.logs)."""
    from recsys import logs

    if not logs.verbose():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def ensure_experiment(tracking_uri: str, experiment: str) -> str:
    """Create `experiment` if missing (artifacts beside a sqlite store); return its id."""
    import mlflow

    _quiet_mlflow()
    mlflow.set_tracking_uri(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return str(exp.experiment_id)
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        artifact_location = (db.parent / "mlartifacts").resolve().as_uri()
    return str(client.create_experiment(experiment, artifact_location=artifact_location))


class MlflowTracker:
    """One MLflow run; `stage(name)` opens a nested run for a pipeline stage."""

    def __init__(self, run: Any) -> None:
        self._run = run
        self.run_id: str | None = run.info.run_id

    @classmethod
    @contextlib.contextmanager
    def start(
        cls,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        tags: Mapping[str, str] | None = None,
    ) -> Iterator[MlflowTracker]:
        import mlflow

        exp_id = ensure_experiment(tracking_uri, experiment)
        with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=dict(tags or {})) as r:
            yield cls(r)

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        flat = {k: str(v)[:6000] for k, v in params.items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import mlflow

        clean = {_metric_key(k): float(v) for k, v in metrics.items() if v == v}  # drop NaN
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        import mlflow

        p = Path(path)
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=artifact_path)
        elif p.is_file():
            mlflow.log_artifact(str(p), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        mlflow.set_tags(dict(tags))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[MlflowTracker]:
        import mlflow

        # in the parent's experiment (by default MLflow would put it in the active one, and the
        # UI would not show it under its parent)
        exp = self._run.info.experiment_id
        with mlflow.start_run(run_name=name, nested=True, experiment_id=exp) as r:
            yield MlflowTracker(r)


class MlflowRunTracker:
    """An MLflow run named by id, from any process: a Ray worker, where no run is active, logs
    to the stage run its driver opened. Everything goes through an `MlflowClient`; `stage`
    opens a child run of this one."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri)
        self._uri = tracking_uri
        self.run_id: str | None = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        for k, v in params.items():
            self._client.log_param(self._id, k, str(v)[:6000])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self._client.log_metric(self._id, _metric_key(k), float(v), step=step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self._client.log_artifacts(self._id, str(p), artifact_path=artifact_path)
        elif p.is_file():
            self._client.log_artifact(self._id, str(p), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self._client.set_tag(self._id, k, v)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[MlflowRunTracker]:
        experiment = self._client.get_run(self._id).info.experiment_id
        child = self._client.create_run(
            experiment, run_name=name, tags={"mlflow.parentRunId": self._id}
        )
        try:
            yield MlflowRunTracker(self._uri, child.info.run_id)
        finally:
            self._client.set_terminated(child.info.run_id)

    @property
    def _id(self) -> str:
        assert self.run_id is not None
        return self.run_id


def _metric_key(key: str) -> str:
    """MLflow metric names allow [A-Za-z0-9_-. :/]: '@' (as in ndcg@10) becomes '_at_', any
    other character '_'."""
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key.replace("@", "_at_"))
