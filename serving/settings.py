"""Server settings from the environment (prefix `RECSYS_`), validated when built.

RECSYS_BUNDLE=/path/to/bundle          a bundle folder, or
RECSYS_MODEL_URI=models:/recsys@champion   a registered MLflow model (downloaded at start)
RECSYS_TRACKING_URI=sqlite:///mlflow.db    MLflow tracking URI for RECSYS_MODEL_URI
RECSYS_ADMIN_TOKEN=...                  bearer token of POST /v1/admin/reload (unset: admin off)
RECSYS_MAX_BODY_BYTES=1048576           larger request bodies get 413
RECSYS_PRELOAD_ENCODER=true             load the encoder at start (new-item embedding)
RECSYS_PREDICT_THREADS=1                LightGBM threads per prediction (1: workers scale)
RECSYS_EVENT_LOG=/path/to/events        event log folder: turns on POST /v1/events and features
                                        as of now (unset: events off, features as of the cut-off)
RECSYS_REDIS_URL=redis://host:6379/0    the live state shared by every worker and replica
                                        (serving/shared_events.py; needs RECSYS_EVENT_LOG;
                                        unset: each process keeps its own)
RECSYS_REDIS_PREFIX=recsys              the Redis keys' prefix (one live state per prefix)
RECSYS_MAX_EVENT_LAG_SECONDS=3600       with events: no impression or click event for longer
                                        than this before a request's moment makes the live
                                        state stale, and /v1/rank ranks as the batch path
                                        until events flow again (default: the bundle's, twice
                                        the longest quiet spell of its log's last week)
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_", extra="ignore", frozen=True)

    bundle: Path | None = None
    model_uri: str | None = None
    tracking_uri: str | None = None
    admin_token: SecretStr | None = None
    max_body_bytes: int = Field(default=1_048_576, ge=1_024, le=64 * 1_048_576)
    preload_encoder: bool = True
    native_threads: int = Field(default=1, ge=1, le=256)
    # requests a worker computes at once (features, LightGBM): on 2 cores 16 threads at once
    # spent 1.8x the CPU per request of one (interpreter lock and thread switches), so the
    # others wait their turn; the event loop keeps reading, answering and /healthz meanwhile
    rank_threads: int = Field(default=1, ge=1, le=256)
    reload_file: Path | None = None
    event_log: Path | None = None
    redis_url: str | None = None
    redis_prefix: str = Field(default="recsys", min_length=1, max_length=64, pattern=r"^[\w.:-]+$")
    reload_poll_seconds: float = Field(default=1.0, gt=0, le=3600)
    max_event_lag_seconds: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_source(self) -> Settings:
        if self.bundle is not None and self.model_uri is not None:
            raise ValueError(
                "set RECSYS_BUNDLE or RECSYS_MODEL_URI, not both (the bundle to serve)"
            )
        if self.redis_url is not None and self.event_log is None:
            raise ValueError(
                "RECSYS_REDIS_URL shares the live state of events: set RECSYS_EVENT_LOG too "
                "(the durable log Redis is seeded from)"
            )
        if self.admin_token is not None and len(self.admin_token.get_secret_value()) < 8:
            raise ValueError("RECSYS_ADMIN_TOKEN must be at least 8 characters (or unset)")
        return self

    @property
    def source(self) -> str | None:
        """The configured bundle source as one string (a path or a models:/ URI), or None."""
        if self.bundle is not None:
            return str(self.bundle)
        return self.model_uri
