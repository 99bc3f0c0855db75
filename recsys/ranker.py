"""The learning-to-rank model: LightGBM `lambdarank` over impressions, early-stopped on nDCG@10.

Tracking stays outside: `train_ranker` takes LightGBM callbacks (see `eval_logger`, which hands
each iteration's validation metrics to any function, e.g. an MLflow tracker's `log_metrics`).
A trained `Ranker` saves as LightGBM's text model plus a small JSON file - never a pickle - so
the batch job and the API load the same two files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import polars as pl

from recsys.errors import ConfigError, DataError
from recsys.io import write_json, write_text

__all__ = ["ColumnRanker", "Ranker", "RankerConfig", "eval_logger", "refit_ranker", "train_ranker"]

MODEL_FILE = "model.txt"
META_FILE = "ranker.json"
FORMAT_VERSION = 1
EVAL_AT = 10
MAX_GROUP_ROWS = 10_000  # LightGBM's lambdarank limit on rows per query
# (num_leaves, min_data_in_leaf) tried beside the configured size on small logs
SMALL_LOG_TREES = ((7, 50), (3, 100))


@dataclass(frozen=True)
class RankerConfig:
    """LightGBM lambdarank settings (logged whole as run parameters).

    early_stopping_rounds = 0 turns early stopping off (all n_estimators trees are kept).
    small_log_groups: with fewer training impressions (groups) than this, the tree size is
    chosen on the validation impressions among (num_leaves, min_data_in_leaf) and the smaller
    SMALL_LOG_TREES: a ranker fit on a thousand impressions with 31-leaf trees learns noise and
    ranks below its own best input. 0 never chooses (the given size always).
    """

    num_leaves: int = 31
    learning_rate: float = 0.05
    n_estimators: int = 500
    early_stopping_rounds: int = 30
    min_data_in_leaf: int = 20
    feature_fraction: float = 0.9
    lambdarank_truncation_level: int = 20
    seed: int = 0
    num_threads: int = 2
    small_log_groups: int = 5_000

    def __post_init__(self) -> None:
        ints = {
            "num_leaves": (2, 131_072),
            "n_estimators": (1, None),
            "early_stopping_rounds": (0, None),
            "min_data_in_leaf": (1, None),
            "lambdarank_truncation_level": (1, None),
            "seed": (0, None),
            "num_threads": (1, None),
            "small_log_groups": (0, None),
        }
        for key, (lo, hi) in ints.items():
            value = getattr(self, key)
            allowed = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
            if (
                isinstance(value, bool)
                or not isinstance(value, int | np.integer)
                or value < lo
                or (hi is not None and value > hi)
            ):
                raise ConfigError(f"ranker config: {key} must be {allowed}, got {value!r}")
        for key in ("learning_rate", "feature_fraction"):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0.0 < value <= 1.0
            ):
                raise ConfigError(f"ranker config: {key} must be a number in (0, 1], got {value!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RankerConfig:
        """Build from a mapping (e.g. a TOML table); unknown keys are an error naming them."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ConfigError(f"ranker config: unknown key(s) {unknown}; allowed keys: {allowed}")
        return cls(**values)

    def lgb_params(self) -> dict[str, Any]:
        """The LightGBM parameter dict for `lgb.train` (deterministic, quiet)."""
        return {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [EVAL_AT],
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "lambdarank_truncation_level": self.lambdarank_truncation_level,
            "seed": self.seed,
            "num_threads": self.num_threads,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }


def eval_logger(log: Callable[[int, dict[str, float]], None]) -> Callable[[Any], None]:
    """A LightGBM callback calling `log(iteration, {"valid_ndcg@10": value, ...})` per iteration.

    `iteration` is 1-based. Hand it to `train_ranker(callbacks=[...])`, e.g. with an MLflow
    tracker: `eval_logger(lambda step, m: tracker.log_metrics(m, step=step))`.
    """

    def _callback(env: Any) -> None:
        metrics = {
            f"{data}_{name}": float(value) for data, name, value, *_ in env.evaluation_result_list
        }
        log(env.iteration + 1, metrics)

    _callback.order = 25  # type: ignore[attr-defined]  # after record_evaluation (20), before early stopping (30)
    return _callback


def _feature_matrix(df: pl.DataFrame, features: Sequence[str], what: str) -> np.ndarray:
    """(n, n_features) float64 matrix of `features` in order; null -> NaN (LightGBM: missing)."""
    _check_features(df.schema, features, what)
    if not features:
        return np.zeros((df.height, 0))
    return df.select(_as_float(f) for f in features).to_numpy().astype(np.float64, copy=False)


def _as_float(column: str) -> pl.Expr:
    return pl.col(column).cast(pl.Float64).fill_null(float("nan"))


def _gathered_matrix(lf: pl.LazyFrame, features: Sequence[str], rows: np.ndarray) -> np.ndarray:
    """`_feature_matrix` of the `rows` (indices, in that order) of `lf`, read one column at a
    time: nothing but the result holds every column (a Parquet scan reads one column a pass)."""
    x = np.empty((rows.size, len(features)), dtype=np.float64)
    for j, f in enumerate(features):
        x[:, j] = lf.select(_as_float(f)).collect().to_series().to_numpy()[rows]
    return x


def _check_features(schema: Mapping[str, Any], features: Sequence[str], what: str) -> None:
    missing = [f for f in features if f not in schema]
    if missing:
        raise DataError(
            f"{what}: missing feature column(s) {missing}; compute them first (the ranker was "
            f"trained on {list(features)})"
        )
    for f in features:
        dtype = schema[f]
        if not (dtype.is_numeric() or dtype == pl.Boolean or dtype == pl.Null):
            raise DataError(f"{what}: feature {f!r} has dtype {dtype}; encode it as numbers")


@dataclass(frozen=True)
class _Groups:
    x: np.ndarray  # (n, f) float64
    y: np.ndarray  # (n,) int32 relevance
    sizes: np.ndarray  # (g,) rows per group, in row order
    dropped: int  # groups without any click


def _grouped(
    df: pl.DataFrame | pl.LazyFrame,
    features: Sequence[str],
    group_col: str,
    label_col: str,
    what: str,
    seed: int,
) -> _Groups:
    """Rows sorted by group, in a random order within each group drawn from `seed`; groups
    without a positive label dropped and counted.

    LightGBM's lambdarank and its nDCG metric break ties between scores by row order. Logs put
    clicked items near the top (position bias) and impressions synthesised from interactions
    put the positive first, so in input order a model that scores a whole group alike (the
    first tree has a handful of leaves) is credited with ranking the click first: on
    MovieLens the validation nDCG@10 of one tree beat every later iteration, and early
    stopping shipped a one-tree ranker.

    The order is found on the group and label columns alone; the feature matrix is then
    gathered a column at a time, so a LazyFrame (a Parquet scan) is never held whole."""
    lf = df.lazy()
    schema = lf.collect_schema()
    for col in (group_col, label_col):
        if col not in schema:
            raise DataError(f"{what}: missing column {col!r}; got {schema.names()}")
    _check_features(schema, features, what)
    d = lf.select(group_col, label_col).collect()
    if d[label_col].null_count():
        raise DataError(f"{what}: {d[label_col].null_count()} null labels in {label_col!r}")
    key = np.random.default_rng(seed).permutation(d.height)
    d = d.select(group_col, pl.col(label_col).cast(pl.Int32).alias("__y"), pl.Series("__k", key))
    d = d.with_row_index("__i").sort([group_col, "__k"])
    if d.select((pl.col("__y") < 0).any()).item():
        raise DataError(f"{what}: labels in {label_col!r} must be >= 0 (0/1 or graded)")
    has_pos = pl.col("__y").max().over(group_col) > 0
    n_groups = d[group_col].n_unique()
    d = d.filter(has_pos)
    sizes = d.group_by(group_col, maintain_order=True).len()["len"].to_numpy()
    if sizes.size and sizes.max() > MAX_GROUP_ROWS:
        raise DataError(
            f"{what}: a group of {group_col!r} has {int(sizes.max())} rows; LightGBM lambdarank "
            f"allows at most {MAX_GROUP_ROWS}; cut candidates per impression"
        )
    return _Groups(
        x=_gathered_matrix(lf, features, d["__i"].to_numpy()),
        y=d["__y"].to_numpy().astype(np.int32),
        sizes=sizes.astype(np.int64),
        dropped=n_groups - int(sizes.size),
    )


class Ranker:
    """A trained lambdarank model over named features.

    feature_names: the feature columns, in model order
    best_iteration: number of trees used for prediction (the early-stopping best)
    history: {"valid": {"ndcg@10": [value per iteration]}} (LightGBM's record_evaluation form)
    info: rows, groups and dropped groups of train and valid, and the config
    """

    def __init__(
        self,
        booster: lgb.Booster,
        feature_names: Sequence[str],
        best_iteration: int,
        history: dict[str, Any] | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.booster = booster
        self.feature_names = list(feature_names)
        self.best_iteration = int(best_iteration)
        self.history = history or {}
        self.info = info or {}

    def _x(self, X: np.ndarray | pl.DataFrame) -> np.ndarray:
        if isinstance(X, pl.DataFrame):
            return _feature_matrix(X, self.feature_names, "ranker")
        arr = np.asarray(X, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != len(self.feature_names):
            raise DataError(
                f"ranker: expected an array of shape (n, {len(self.feature_names)}) with columns "
                f"{self.feature_names}, got {arr.shape}"
            )
        return arr

    def predict(self, X: np.ndarray | pl.DataFrame) -> np.ndarray:
        """Scores (n,) float64 for rows of X (a DataFrame with the feature columns, or (n, f))."""
        x = self._x(X)
        if x.shape[0] == 0:
            return np.zeros(0)
        return np.asarray(self.booster.predict(x, num_iteration=self.best_iteration))

    def contributions(self, X: np.ndarray | pl.DataFrame) -> np.ndarray:
        """SHAP contributions (n, n_features + 1), last column the bias; rows sum to predict."""
        x = self._x(X)
        if x.shape[0] == 0:
            return np.zeros((0, len(self.feature_names) + 1))
        return np.asarray(
            self.booster.predict(x, num_iteration=self.best_iteration, pred_contrib=True)
        )

    def describe(self) -> str:
        """The model in a few words (the run log, the small-log choice)."""
        config = self.info.get("config", {})
        return (
            f"{config.get('num_leaves', '?')} leaves, min {config.get('min_data_in_leaf', '?')}"
            f" rows, {self.best_iteration} trees"
        )

    def feature_importance(self, kind: str = "gain") -> pl.DataFrame:
        """feature, importance (total gain or split count over the used trees), largest first."""
        if kind not in ("gain", "split"):
            raise ConfigError(f"feature_importance: kind must be 'gain' or 'split', got {kind!r}")
        imp = self.booster.feature_importance(importance_type=kind, iteration=self.best_iteration)
        return pl.DataFrame(
            {"feature": self.feature_names, "importance": np.asarray(imp, dtype=np.float64)}
        ).sort("importance", "feature", descending=[True, False])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write folder `path`: model.txt (LightGBM text, best_iteration trees) and ranker.json."""
        folder = Path(path)
        write_text(
            self.booster.model_to_string(num_iteration=self.best_iteration), folder / MODEL_FILE
        )
        meta = {
            "format_version": FORMAT_VERSION,
            "lightgbm_version": lgb.__version__,
            "feature_names": self.feature_names,
            "best_iteration": self.best_iteration,
            "history": self.history,
            "info": self.info,
        }
        write_json(meta, folder / META_FILE)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Ranker:
        """Read a folder written by `save`."""
        folder = Path(path)
        model, meta_path = folder / MODEL_FILE, folder / META_FILE
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        if meta.get("kind") == ColumnRanker.KIND:
            return ColumnRanker.from_meta(meta)
        if not model.is_file() or not meta:
            raise DataError(
                f"ranker: {folder} must hold {MODEL_FILE} and {META_FILE} (written by "
                "Ranker.save); retrain or point at the model bundle's ranker folder"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"ranker: {meta_path} has format_version {meta.get('format_version')!r}, this "
                f"code reads {FORMAT_VERSION}; retrain the ranker"
            )
        booster = lgb.Booster(model_str=model.read_text())
        if booster.feature_name() != meta["feature_names"]:
            raise DataError(f"ranker: {model} and {meta_path} disagree on feature names; re-save")
        return cls(
            booster, meta["feature_names"], meta["best_iteration"], meta["history"], meta["info"]
        )


class ColumnRanker(Ranker):
    """One input column as the ranker: sign x value, a missing value below every value seen in
    training. A small log falls back to it when no tree model validates above its best input
    (the ranker then ranks as that input does, never below it). Saved as ranker.json alone
    (kind "column"); predicts, explains and reloads like a tree ranker."""

    KIND = "column"

    def __init__(
        self,
        feature_names: Sequence[str],
        feature: str,
        sign: float,
        fill: float,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.feature_names = list(feature_names)
        self.feature = feature
        self.column = self.feature_names.index(feature)
        self.sign = float(sign)
        self.fill = float(fill)
        self.best_iteration = 0
        self.history = {}
        self.info = info or {}

    @classmethod
    def best_of(cls, tr: _Groups, feats: list[str], info: dict[str, Any]) -> ColumnRanker:
        """The column (and direction) with the best training AUC."""
        best: tuple[float, int, float] | None = None
        for j in range(len(feats)):
            for sign in (1.0, -1.0):
                auc = _valid_auc(np.nan_to_num(sign * tr.x[:, j], nan=-np.inf), tr)
                if best is None or auc > best[0]:
                    best = (auc, j, sign)
        assert best is not None
        _, j, sign = best
        seen = sign * tr.x[:, j]
        finite = seen[np.isfinite(seen)]
        fill = float(finite.min()) - 1.0 if finite.size else 0.0
        return cls(feats, feats[j], sign, fill, {**info, "config": {}})

    def describe(self) -> str:
        return f"the column {'-' if self.sign < 0 else ''}{self.feature} alone"

    def predict(self, X: np.ndarray | pl.DataFrame) -> np.ndarray:
        x = self._x(X)
        score = self.sign * x[:, self.column]
        return np.where(np.isnan(score), self.fill, score)

    def contributions(self, X: np.ndarray | pl.DataFrame) -> np.ndarray:
        """Exact for one column: its score is its contribution, the bias 0."""
        score = self.predict(X)
        out = np.zeros((score.size, len(self.feature_names) + 1))
        out[:, self.column] = score
        return out

    def feature_importance(self, kind: str = "gain") -> pl.DataFrame:
        if kind not in ("gain", "split"):
            raise ConfigError(f"feature_importance: kind must be 'gain' or 'split', got {kind!r}")
        imp = np.zeros(len(self.feature_names))
        imp[self.column] = 1.0
        return pl.DataFrame({"feature": self.feature_names, "importance": imp}).sort(
            "importance", "feature", descending=[True, False]
        )

    def save(self, path: str | os.PathLike[str]) -> None:
        folder = Path(path)
        (folder / MODEL_FILE).unlink(missing_ok=True)
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.KIND,
            "feature_names": self.feature_names,
            "feature": self.feature,
            "sign": self.sign,
            "fill": self.fill,
            "info": self.info,
        }
        write_json(meta, folder / META_FILE)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> ColumnRanker:
        return cls(meta["feature_names"], meta["feature"], meta["sign"], meta["fill"], meta["info"])


def train_ranker(
    train: pl.DataFrame | pl.LazyFrame,
    valid: pl.DataFrame | pl.LazyFrame,
    features: Sequence[str],
    config: RankerConfig,
    *,
    group_col: str = "impression_id",
    label_col: str = "clicked",
    callbacks: list[Callable[..., Any]] | None = None,
) -> Ranker:
    """Train LightGBM lambdarank on impressions, early-stopping on the valid set's nDCG@10.

    train, valid: one row per shown item: `group_col`, `label_col` (bool or int relevance >= 0)
        and the `features` (numeric or bool; null = missing). Rows are sorted by group (stably)
        here; groups without any positive label carry no ranking signal and are dropped (counted
        in `ranker.info`, as is everything else about the data seen). A LazyFrame (e.g. a
        Parquet scan) is read a column at a time: memory holds the float matrix, not a frame.
    callbacks: extra LightGBM callbacks (tracking: see `eval_logger`).
    Returns a Ranker predicting with the best iteration's trees.
    """
    feats = list(features)
    if not feats:
        raise ConfigError("train_ranker: features is empty; name at least one feature column")
    if len(set(feats)) != len(feats):
        raise ConfigError(f"train_ranker: features repeat: {feats}")
    tr = _grouped(train, feats, group_col, label_col, "train", config.seed)
    va = _grouped(valid, feats, group_col, label_col, "valid", config.seed)
    for what, g in (("train", tr), ("valid", va)):
        if g.sizes.size == 0:
            raise DataError(
                f"train_ranker: no group in {what} has a positive {label_col!r}; "
                f"give it impressions with clicks"
            )
    ranker, _, _ = _fit(tr, va, feats, config, callbacks)
    if tr.sizes.size >= config.small_log_groups:
        return ranker
    # A small log: the configured size, smaller trees, and the best single input column, each
    # judged by its validation AUC; the first of equals wins (the configured size first).
    candidates = [ranker]
    for leaves, min_data in SMALL_LOG_TREES:
        if (leaves, min_data) != (config.num_leaves, config.min_data_in_leaf):
            smaller = replace(config, num_leaves=leaves, min_data_in_leaf=min_data)
            candidates.append(_fit(tr, va, feats, smaller, None)[0])  # tracked: the first only
    candidates.append(ColumnRanker.best_of(tr, feats, ranker.info))
    scores = [_valid_auc(c.predict(va.x), va) for c in candidates]
    chosen = candidates[max(range(len(scores)), key=lambda k: (scores[k], -k))]
    chosen.info["chosen_on_valid_auc"] = {
        c.describe(): score for c, score in zip(candidates, scores, strict=True)
    }
    return chosen


def _valid_auc(scores: np.ndarray, va: _Groups) -> float:
    """Mean per-impression AUC of `scores` on the grouped validation rows (ties count 1/2)."""
    from recsys.metrics import impression_metrics

    frame = pl.DataFrame(
        {
            "impression_id": np.repeat(np.arange(va.sizes.size), va.sizes),
            "clicked": va.y > 0,
            "score": scores,
        }
    )
    return float(impression_metrics(frame, "score")["auc"])


def _fit(
    tr: _Groups,
    va: _Groups,
    feats: list[str],
    config: RankerConfig,
    callbacks: list[Callable[..., Any]] | None,
) -> tuple[Ranker, int, float]:
    """One early-stopped fit: (ranker, best iteration, validation nDCG there)."""
    params = config.lgb_params()
    dtrain = lgb.Dataset(tr.x, tr.y, group=tr.sizes, feature_name=feats, params=params)
    dvalid = lgb.Dataset(va.x, va.y, group=va.sizes, reference=dtrain, params=params)
    evals: dict[str, Any] = {}
    cbs: list[Callable[..., Any]] = [lgb.record_evaluation(evals)]
    if config.early_stopping_rounds:
        cbs.append(
            lgb.early_stopping(config.early_stopping_rounds, first_metric_only=True, verbose=False)
        )
    cbs += callbacks or []
    booster = lgb.train(
        params,
        dtrain,
        num_boost_round=config.n_estimators,
        valid_sets=[dvalid],
        valid_names=["valid"],
        callbacks=cbs,
    )
    best = booster.best_iteration if booster.best_iteration > 0 else booster.current_iteration()
    history = {
        data: {m: [float(v) for v in vals] for m, vals in d.items()} for data, d in evals.items()
    }
    curve = history["valid"][f"ndcg@{EVAL_AT}"]
    info = {
        "train_rows": int(tr.y.size),
        "train_groups": int(tr.sizes.size),
        "train_groups_dropped": tr.dropped,
        "valid_rows": int(va.y.size),
        "valid_groups": int(va.sizes.size),
        "valid_groups_dropped": va.dropped,
        "iterations_run": len(curve),
        "config": asdict(config),
    }
    return Ranker(booster, feats, best, history, info), best, curve[best - 1]


def refit_ranker(
    rows: pl.DataFrame | pl.LazyFrame,
    selected: Ranker,
    config: RankerConfig,
    *,
    group_col: str = "impression_id",
    label_col: str = "clicked",
) -> Ranker:
    """Retrain `selected`'s model on `rows` (e.g. train + validation: everything up to the
    cut-off) with the number of trees early stopping chose, so the shipped model has seen the
    newest data, with the tree size chosen there (`selected.info["config"]`). No early stopping
    (nothing is held out); the selection's history is kept.
    """
    if isinstance(selected, ColumnRanker):
        return selected  # nothing to fit: the column ranks the same on any rows
    chosen = selected.info.get("config", {})
    config = replace(
        config,
        num_leaves=chosen.get("num_leaves", config.num_leaves),
        min_data_in_leaf=chosen.get("min_data_in_leaf", config.min_data_in_leaf),
    )
    feats = list(selected.feature_names)
    data = _grouped(rows, feats, group_col, label_col, "refit", config.seed)
    if data.sizes.size == 0:
        raise DataError(f"refit_ranker: no group has a positive {label_col!r}")
    params = config.lgb_params()
    dtrain = lgb.Dataset(data.x, data.y, group=data.sizes, feature_name=feats, params=params)
    trees = max(1, selected.best_iteration)
    booster = lgb.train(params, dtrain, num_boost_round=trees)
    info = dict(selected.info)
    info.update(refit_rows=int(data.y.size), refit_groups=int(data.sizes.size), refit_trees=trees)
    return Ranker(booster, feats, trees, selected.history, info)
