"""`recsys serve`: check the bundle, then run the API in one process or several workers.

serve(bundle, model_uri, host, port, workers, tracking_uri, event_log, access_log, events, redis)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from pydantic import ValidationError

from recsys.errors import ConfigError
from serving.app import create_app
from serving.errors import details
from serving.metrics import MULTIPROC_ENV
from serving.settings import Settings
from serving.source import load_model
from serving.workers import run_workers


def default_event_log(bundle: Path) -> Path:
    """Where a served bundle's events go by default: RUN/events for a bundle the nightly
    published (RUN/bundles/VERSION or RUN/bundles/current), else events/ beside the bundle."""
    parent = bundle.absolute().parent
    return parent.parent / "events" if parent.name == "bundles" else parent / "events"


def serve(
    bundle: str | os.PathLike[str] | None = None,
    model_uri: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    tracking_uri: str | None = None,
    event_log: str | os.PathLike[str] | None = None,
    access_log: bool | None = None,
    events: bool = True,
    redis: str | None = None,
) -> None:
    """Load the bundle (a folder, or a registered MLflow model) and serve it until stopped.

    Events (the live engine) are on by default with one worker: the event log is `event_log`,
    else RECSYS_EVENT_LOG, else `default_event_log(bundle)` beside the run's bundles (a
    model URI has no such place: give one). events=False (`--no-events`), several workers
    without Redis or a model URI without a log serve the batch ranker on features as of the
    cut-off. `redis` (else RECSYS_REDIS_URL): the live state shared through Redis
    (serving/shared_events.py), so several workers (and replicas) take events and rank alike.
    access_log: a line per request on the terminal (None: RECSYS_ACCESS_LOG, default off).

    The bundle is loaded and checked before the server starts, so a bad one is a one-line
    error. With workers > 1 each worker process (serving/workers.py: its own SO_REUSEPORT
    socket, so connections spread evenly) loads its own copy and keeps its own metrics; an
    admin reload is answered by one worker and followed by the others (serving/sync.py).
    """
    import uvicorn

    redis = redis or os.environ.get("RECSYS_REDIS_URL") or None
    event_log, why_off = _event_log(bundle, model_uri, port, workers, event_log, events, redis)
    settings = _settings(bundle, model_uri, tracking_uri, event_log, redis if event_log else None)
    source = settings.source
    assert source is not None
    model = load_model(source, settings)
    print(f"serving {model.model_version} from {source} on http://{host}:{port} (docs: /docs)")
    ranker, freshness = model.served(live=event_log is not None)
    if event_log is not None:
        print(f"events on, log {event_log} (--no-events to turn off): ranker {ranker}, {freshness}")
        if settings.redis_url:
            from serving.shared_events import redacted

            print(f"live state shared in Redis at {redacted(settings.redis_url)} "
                  f"(prefix {settings.redis_prefix!r}), {workers} worker(s)")  # fmt: skip
    else:
        print(f"events off ({why_off}): ranker {ranker}, {freshness}")
    log_level = os.environ.get("RECSYS_LOG_LEVEL", "info").lower()
    if access_log is None:
        access_log = os.environ.get("RECSYS_ACCESS_LOG", "false").lower() in ("1", "true", "yes")
    if workers == 1:
        uvicorn.run(create_app(settings, model=model), host=host, port=port,
                    log_level=log_level, access_log=access_log)  # fmt: skip
        return
    del model
    _run_workers(settings, bundle is not None, workers, host, port, log_level, access_log)


def _event_log(
    bundle: str | os.PathLike[str] | None,
    model_uri: str | None,
    port: int,
    workers: int,
    event_log: str | os.PathLike[str] | None,
    events: bool,
    redis: str | None = None,
) -> tuple[str | os.PathLike[str] | None, str | None]:
    """(the event log to use or None, why events are off) for `serve`'s arguments; a
    ConfigError for arguments that contradict each other."""
    if (bundle is None) == (model_uri is None):
        raise ConfigError("give exactly one of --bundle PATH or --model-uri models:/NAME@ALIAS")
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if workers > 1 and port == 0:
        raise ConfigError("--port 0 (any free port) works with one worker only; give a port")
    event_log = event_log or os.environ.get("RECSYS_EVENT_LOG")
    if not events and event_log:
        raise ConfigError("--no-events and --event-log contradict each other: give one")
    why_off = None
    if not events:
        why_off = "--no-events"
    elif not event_log and workers > 1 and not redis:
        why_off = f"{workers} workers keep no shared live state"
    elif not event_log and bundle is None:
        why_off = "a model URI has no run folder for the log; give --event-log DIR"
    elif not event_log:
        event_log = default_event_log(Path(bundle))  # type: ignore[arg-type]
    if workers > 1 and event_log and not redis:
        raise ConfigError(
            "--event-log keeps the live state in one process; with several workers each would "
            "count only its own events. Give --redis URL (RECSYS_REDIS_URL) to share it, run "
            "one worker, or several with --no-events"
        )
    return event_log, why_off


def _settings(
    bundle: str | os.PathLike[str] | None,
    model_uri: str | None,
    tracking_uri: str | None,
    event_log: str | os.PathLike[str] | None,
    redis: str | None = None,
) -> Settings:
    try:
        return Settings(
            bundle=Path(bundle) if bundle is not None else None,  # type: ignore[call-arg]
            model_uri=model_uri,
            tracking_uri=tracking_uri or os.environ.get("RECSYS_TRACKING_URI"),
            event_log=Path(event_log) if event_log else None,
            redis_url=redis,
        )
    except ValidationError as e:
        raise ConfigError(f"server settings: {details(list(e.errors()))}") from e  # type: ignore[arg-type]


def _run_workers(
    settings: Settings,
    from_bundle: bool,
    workers: int,
    host: str,
    port: int,
    log_level: str,
    access_log: bool,
) -> None:
    """Run `workers` processes (serving/workers.py) that build their app from the environment
    set here: the source, the tracking URI, native threads and the reload note's file."""
    source = settings.source
    assert source is not None
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(settings.native_threads))  # read as workers start
    run_dir = Path(tempfile.mkdtemp(prefix="recsys-serve-"))
    if settings.reload_file is None:  # admin reloads reach one worker; the others follow
        os.environ["RECSYS_RELOAD_FILE"] = str(run_dir / "reload.json")
    os.environ[MULTIPROC_ENV] = str(_metrics_dir(run_dir))
    os.environ["RECSYS_BUNDLE" if from_bundle else "RECSYS_MODEL_URI"] = source
    os.environ.pop("RECSYS_MODEL_URI" if from_bundle else "RECSYS_BUNDLE", None)
    if settings.tracking_uri:
        os.environ["RECSYS_TRACKING_URI"] = settings.tracking_uri
    for var, value in (("RECSYS_EVENT_LOG", settings.event_log),
                       ("RECSYS_REDIS_URL", settings.redis_url)):  # fmt: skip
        if value is not None:
            os.environ[var] = str(value)
        else:
            os.environ.pop(var, None)
    try:
        run_workers(workers, host, port, log_level=log_level, access_log=access_log)
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e}); pick another --port") from e
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _metrics_dir(run_dir: Path) -> Path:
    """The workers' prometheus_client folder (serving/metrics.py): PROMETHEUS_MULTIPROC_DIR if
    given, emptied of an earlier run's files (they would be summed in), else one in `run_dir`."""
    given = os.environ.get(MULTIPROC_ENV)
    folder = Path(given) if given else run_dir / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.db"):
        old.unlink()
    return folder
