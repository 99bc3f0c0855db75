"""Where a served bundle comes from: a folder, or a registered MLflow model, downloaded once.

resolve_source(source, tracking_uri) -> Path        a local bundle folder
load_model(source, settings) -> ServingModel         loaded, prepared and self-checked
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from recsys import logs
from recsys.bundle import Bundle
from recsys.errors import DataError, RecsysError
from serving.ranking import ServingModel
from serving.settings import Settings

BUNDLE = "bundle"  # the bundle's artifact key in the pyfunc model (serving/pyfunc.py)


def resolve_source(source: str, tracking_uri: str | None = None) -> Path:
    """A local bundle folder for `source`: a path as is, or a registered model
    (`models:/NAME@ALIAS`, `models:/NAME/VERSION`) or other MLflow artifact URI, downloaded:
    the bundle artifact of the pyfunc model (serving/pyfunc.py) a version holds, or the bare
    bundle folder of a version registered before it.
    The registry is looked up at `tracking_uri` (None: MLflow's default). Download errors
    become a `DataError`."""
    if "\x00" in source:  # no file system accepts it (os calls raise ValueError)
        raise DataError(f"bundle source {source!r} holds a NUL character; give a folder path")
    if "://" not in source and not source.startswith(("models:/", "runs:/")):
        # Resolved once: through RUN_DIR/bundles/current, a load reads one published version
        # even if the nightly flips the pointer meanwhile.
        return Path(source).resolve()
    try:
        return bundle_of(_download(source, tracking_uri))
    except Exception as e:
        raise DataError(
            f"{source}: could not download the bundle from MLflow ({type(e).__name__}: "
            f"{str(e)[:300]}); check the model name and alias and --tracking-uri "
            f"({tracking_uri or 'default'})"
        ) from e


def _download(uri: str, tracking_uri: str | None) -> str:
    """Download `uri`; a registered model version goes to a folder of its own under the temp
    dir (keyed by registry, name, version and source), reused when already complete, so
    reloads of the same version download nothing."""
    import mlflow

    if not logs.verbose():  # MLflow's progress bars only when verbose
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if not uri.startswith("models:/"):
        return str(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=tracking_uri))
    # Resolve the version here: download_artifacts alone would ask the default registry.
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name, at, alias = uri.removeprefix("models:/").partition("@")
    if at:
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, _, version = name.partition("/")
        if not version.isdigit():
            raise DataError(f"{uri}: give models:/NAME@ALIAS or models:/NAME/VERSION")
        mv = client.get_model_version(name, version)
    source = client.get_model_version_download_uri(mv.name, mv.version)
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in mv.name)
    key = hashlib.sha256(f"{tracking_uri}|{source}".encode()).hexdigest()[:12]
    dest = Path(tempfile.gettempdir()) / "recsys-bundles" / f"{safe}-v{mv.version}-{key}"
    if (dest / "manifest.json").is_file() or (dest / "MLmodel").is_file():
        return str(dest)  # Bundle.load still checks every part
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(work),
                                                       tracking_uri=tracking_uri))  # fmt: skip
        if dest.exists():  # another process finished first
            return str(dest)
        os.replace(got, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(dest)


def bundle_of(model_dir: str | Path) -> Path:
    """The bundle folder in a downloaded model version: the `bundle` artifact of a pyfunc
    model, or the folder itself for a version that holds a bare bundle (those registered
    before the pyfunc model)."""
    path = Path(model_dir)
    if (path / "manifest.json").is_file() or not (path / "MLmodel").is_file():
        return path
    from mlflow.models import Model

    flavor = Model.load(str(path)).flavors.get("python_function", {})
    art = flavor.get("artifacts", {}).get(BUNDLE, {})
    return path / art["path"] if "path" in art else path


def load_model(source: str, settings: Settings) -> ServingModel:
    """Load, prepare and self-check a bundle; `DataError` if it is missing, broken or skewed."""
    bundle = Bundle.load(resolve_source(source, settings.tracking_uri))
    try:
        return ServingModel.from_bundle(
            bundle,
            preload_encoder=settings.preload_encoder,
            max_event_lag_s=settings.max_event_lag_seconds,
        )
    except RecsysError:
        raise
    except Exception as e:  # a bundle whose parts load but do not fit together
        raise DataError(
            f"{source}: bundle failed its serving checks ({type(e).__name__}: {e})"
        ) from e
