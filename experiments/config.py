"""Experiment configs: one TOML file per named experiment, loaded into one frozen, typed config.

    name = "lora"                      # optional; defaults to the file name
    description = "LoRA-tuned encoder + behavioural features"
    [finetune]   -> recsys.encoder.FinetuneConfig
    [encoder]    -> recsys.encoder.EncoderConfig
    [features]   -> features.FeatureConfig
    [ranker]     -> recsys.ranker.RankerConfig
    [pipeline]   -> PipelineConfig (split, candidates, lists)
    [rules]      -> recsys.rules.ListRules (exclusions, category cap, diversity)
    [tracking]   -> TrackingConfig

An unknown section or key, or a value of the wrong type, is a ConfigError that names the key and
what is allowed; each section's own checks run when it is built (`__post_init__`).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from features import FeatureConfig
from features.config import valid_duration
from recsys.encoder import EncoderConfig, FinetuneConfig
from recsys.errors import ConfigError
from recsys.featurize import ONLINE, check_refresh
from recsys.ranker import RankerConfig
from recsys.rules import ListRules

CONFIG_DIR = Path(__file__).resolve().parent


AUTO = "auto"  # pipeline.refresh: the candidate period that validates best


@dataclass(frozen=True)
class PipelineConfig:
    """Split, candidate retrieval and ranked-list settings of the nightly job."""

    test_fraction: float = 0.2  # with no --split-at: the last share of events is the test split
    valid_fraction: float = 0.15  # the last share of the pre-test events validates
    use_semantic: bool = True  # False: the ranker sees behavioural features only
    top_n: int = 20  # length of each user's ranked list
    # Candidate quotas per retrieval source (0 = off), unioned and deduplicated (recsys.retrieval).
    # Popular finds the most test positives per slot on EB-NeRD, MovieLens and H&M alike
    # (bench_lists' per-source table), so it holds the largest share.
    k_semantic: int = 40  # nearest items to the user's profile vector
    k_cooccurrence: int = 20  # item-kNN: items consumed by the same users
    k_popular: int = 70  # popular, decayed with the fitted half-life
    k_category: int = 10  # popular in the user's top categories
    k_fresh: int = 10  # newest items
    # None = fitted to the log's cadence (recsys.retrieval.fit_cadence); a number fixes it
    popular_half_life_days: float | None = None
    live_window_days: float | None = None  # candidates: items active this recently; 0 = all
    # Days of consumption after the cut-off that judge the lists; None = 1 for a fast
    # catalogue (live window <= 7 d), else the whole test split
    list_horizon_days: float | None = None
    # Each list's order blends the ranker with the decayed popularity, rank-wise within the
    # user's candidates: (1 - w) x ranker + w x popularity (recsys.lists.with_prior); None =
    # the w among recsys.lists.PRIOR_WEIGHTS whose lists do best at the validation cut-off
    list_prior_weight: float | None = None
    # the semantic source answers from an HNSW index (faiss) at this many live items; exact below
    ann_min_items: int = 100_000
    max_history: int = 50
    half_life_days: float = 7.0
    sampled_negatives: int = 20  # data sets without impressions: negatives per positive
    sampled_popular_share: float = 0.5  # of them, drawn in proportion to popularity at the time
    # The ranker sees rates, shares and within-request ranks/z-scores, no raw count or age.
    stable_features: bool = True
    # With a tuned encoder, the full ranker also reads the frozen encoder's cosines: they are
    # honest on the early training rows, where the tuned encoder's are hidden (it was tuned on
    # them), so the ranker learns to use semantics from all its rows.
    frozen_semantic: bool = True
    # Freshness of the batch ranker's training rows: a period such as "1d" = each row as of the
    # start of its period (a bundle rebuilt daily serves features up to a day old); "online" =
    # as of each impression; "auto" = each of `refresh_candidates`, the one whose lgbm_full
    # scores best on the validation slice as the batch path serves it (as of the slice's start,
    # as test rows are as of the cut-off). On EB-NeRD it picks "2d" (lgbm_full - lgbm_behavioural
    # -0.0004 -> +0.0038 AUC), on a 4% user sample of it and on the generator's log "1d" (README).
    # The online ranker's rows are always as of each moment.
    refresh: str = AUTO
    refresh_candidates: tuple[str, ...] = ("1d", "2d")
    # The earliest share of the pre-validation impressions tunes the encoder; the ranker trains
    # on the rest, so no ranker row has semantic features from an encoder fitted on it.
    encoder_fraction: float = 0.5
    refit: bool = True  # after early stopping, retrain the ranker on train + validation
    # the ranker each mode ships: "auto" = lgbm_full only when it beats lgbm_behavioural by more
    # than tracking.promote_margin_se standard errors; or always "lgbm_full" / "lgbm_behavioural"
    ship: str = "auto"
    # published bundle versions kept in RUN_DIR/bundles (RUN_DIR/bundles/current: the newest)
    keep_bundles: int = 3
    seed: int = 0
    # The memory knob: the stages that go over every impression row (the feature tables) hold
    # about this many rows at a time. It changes memory and time, never an output.
    chunk_rows: int = 500_000
    # Where Ray workers exchange files (Ray Train's checkpoints): a folder every node mounts or
    # a pyarrow.fs URI such as s3://bucket/recsys. None: a local temporary folder, which is
    # right for one machine; a cluster of several nodes needs one (nothing else travels by
    # disk: data and encoders go through Ray's object store).
    storage: str | None = None

    def __post_init__(self) -> None:
        for name in ("test_fraction", "valid_fraction"):
            v = getattr(self, name)
            if not 0.0 < v < 0.9:
                raise ConfigError(f"pipeline.{name} must be in (0, 0.9), got {v}")
        if not 0.0 < self.encoder_fraction < 1.0:
            raise ConfigError(
                f"pipeline.encoder_fraction must be in (0, 1), got {self.encoder_fraction}"
            )
        if self.refresh != AUTO and self.refresh != ONLINE and not valid_duration(self.refresh):
            raise ConfigError(
                f"pipeline.refresh must be {AUTO!r} (the candidate period that validates best), "
                f"{ONLINE!r} or a polars duration such as '1d' or '6h', got {self.refresh!r}"
            )
        if not self.refresh_candidates:
            raise ConfigError("pipeline.refresh_candidates must name at least one period")
        for c in self.refresh_candidates:
            if c == ONLINE:
                raise ConfigError(
                    "pipeline.refresh_candidates are batch periods such as '1d'; 'online' has "
                    "its own ranker"
                )
            check_refresh(c, "pipeline.refresh_candidates")
        if self.ship not in SHIP_CHOICES:
            raise ConfigError(
                f"pipeline.ship must be one of {list(SHIP_CHOICES)}, got {self.ship!r}"
            )
        if not 0.0 <= self.sampled_popular_share <= 1.0:
            raise ConfigError(
                f"pipeline.sampled_popular_share must be in [0, 1], got "
                f"{self.sampled_popular_share}"
            )
        positive = ("top_n", "max_history", "sampled_negatives", "ann_min_items", "keep_bundles")
        for name in (*positive, "chunk_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pipeline.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("k_semantic", "k_cooccurrence", "k_popular", "k_category", "k_fresh"):
            if getattr(self, name) < 0:
                raise ConfigError(f"pipeline.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("popular_half_life_days", "list_horizon_days"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"pipeline.{name} must be > 0 (or left out: fitted), got {v}")
        w = self.list_prior_weight
        if w is not None and not 0.0 <= w <= 1.0:
            raise ConfigError(
                f"pipeline.list_prior_weight must be in [0, 1] (0 = the ranker alone, 1 = "
                f"popularity alone) or left out (chosen on validation), got {w}"
            )
        if self.live_window_days is not None and self.live_window_days < 0:
            raise ConfigError(
                f"pipeline.live_window_days must be >= 0 (0 = every item), got "
                f"{self.live_window_days}"
            )

    @property
    def refreshes(self) -> tuple[str, ...]:
        """The batch ranker's training freshness(es) to try: the candidates for "auto"."""
        return self.refresh_candidates if self.refresh == AUTO else (self.refresh,)

    @property
    def quotas(self) -> dict[str, int]:
        """Retrieval quota per source, in interleaving order."""
        return {
            "semantic": self.k_semantic if self.use_semantic else 0,
            "cooccurrence": self.k_cooccurrence,
            "popular": self.k_popular,
            "category": self.k_category,
            "fresh": self.k_fresh,
        }


SHIP_CHOICES = ("auto", "lgbm_full", "lgbm_behavioural")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    experiment: str = "recsys-nightly"
    model_name: str = "recsys"  # registered model name
    primary_metric: str = "ndcg@10"  # the promotion gate's metric, higher is better
    # promote only when the challenger's paired gain on the gate slice exceeds this many
    # standard errors (experiments.registry)
    promote_margin_se: float = 2.0

    def __post_init__(self) -> None:
        if not (self.promote_margin_se >= 0 and math.isfinite(self.promote_margin_se)):
            raise ConfigError(
                f"tracking.promote_margin_se must be a number >= 0, got {self.promote_margin_se}"
            )
        allowed = ("auc", "mrr", "ndcg@5", "ndcg@10")
        if self.primary_metric not in allowed:
            raise ConfigError(
                f"tracking.primary_metric must be one of {allowed}, got {self.primary_metric!r}"
            )


@dataclass(frozen=True)
class NightlyConfig:
    name: str = "default"
    description: str = ""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    rules: ListRules = field(default_factory=ListRules)  # business rules for every list
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        # one base model: the fine-tune's is the frozen encoder's (semantic_frozen, the head's
        # inputs), so [finetune] base_model sets [encoder] model_path unless that says the same
        base, path = self.finetune.base_model, self.encoder.model_path
        if base is not None and path is not None and Path(base) != Path(path):
            raise ConfigError(
                f"finetune.base_model {base!r} and encoder.model_path {path!r} differ: the "
                "frozen vectors must come from the model the fine-tune starts from; set one"
            )
        if base is not None and path is None:
            object.__setattr__(self, "encoder", dataclasses.replace(self.encoder, model_path=base))

    def section(self, name: str) -> dict[str, Any]:
        return dataclasses.asdict(getattr(self, name))

    def to_params(self) -> dict[str, Any]:
        """Flat `section.key -> value` dict: the run parameters logged to MLflow."""
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for k, v in dataclasses.asdict(value).items():  # type: ignore[arg-type]
                    out[f"{f.name}.{k}"] = v
        return out


SECTIONS: dict[str, type] = {
    f.name: f.default_factory  # type: ignore[misc]
    for f in dataclasses.fields(NightlyConfig)
    if f.default_factory is not dataclasses.MISSING
}


def _coerce(section: str, key: str, value: Any, annotation: Any) -> Any:
    """Check a TOML value against a field's annotation; lists become tuples."""
    where = f"{section}.{key}"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(section, key, value, inner[0])
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(section, key, v, elem) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def build_section(section: str, values: dict[str, Any]) -> Any:
    """Build one section's dataclass from a dict, naming unknown keys and bad values."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in allowed:
            raise ConfigError(f"unknown config key {section}.{key}; allowed keys: {allowed}")
        kwargs[key] = _coerce(section, key, value, hints[key])
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}]: {e}") from e


def config_from_dict(raw: dict[str, Any], name: str = "default") -> NightlyConfig:
    allowed_top = ["name", "description", *SECTIONS]
    sections = {}
    for key, value in raw.items():
        if key not in allowed_top:
            raise ConfigError(f"unknown config section or key {key!r}; allowed: {allowed_top}")
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table of keys")
            sections[key] = build_section(key, value)
    return NightlyConfig(
        name=str(raw.get("name", name)), description=str(raw.get("description", "")), **sections
    )


def load_config(path: str | Path | None) -> NightlyConfig:
    """Load an experiment config: a TOML path, a name in experiments/ (e.g. "lora"), or None."""
    if path is None:
        return NightlyConfig()
    p = Path(path)
    if not p.is_file() and (CONFIG_DIR / f"{path}.toml").is_file():
        p = CONFIG_DIR / f"{path}.toml"
    if not p.is_file():
        names = sorted(x.stem for x in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"{path}: no such config file; named configs: {names}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from e
    try:
        return config_from_dict(raw, name=p.stem)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from e
