"""`recsys evaluate`: a bundle on a dataset's test split, with the bundle's own config."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import polars as pl

from experiments.config import NightlyConfig, load_config
from recsys.baselines import LGBMScorer
from recsys.bundle import Bundle
from recsys.data import Dataset, read_dataset, validate_dataset
from recsys.errors import ConfigError
from recsys.evaluation import BASELINES, BATCH, baseline_scorers, requests, score_rows
from recsys.featurize import ONLINE, point_in_time_frame
from recsys.lists import bundle_prior_weight, list_evaluation
from recsys.metrics import evaluation_table

from .nightly import list_settings
from .prepare import parse_time, sampled_impressions


def bundle_config(bundle: Bundle) -> NightlyConfig:
    """The nightly config a bundle was built with (its manifest's flat params), defaults for
    what an older bundle did not record."""
    sections: dict[str, dict[str, Any]] = {}
    for key, value in bundle.manifest.get("config", {}).items():
        if "." in key:
            sec, name = key.split(".", 1)
            sections.setdefault(sec, {})[name] = value
    base = load_config(None)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(base):
        cur = getattr(base, f.name)
        if dataclasses.is_dataclass(cur) and f.name in sections:
            names = {g.name for g in dataclasses.fields(cur)}
            kw = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in sections[f.name].items() if k in names}  # fmt: skip
            out[f.name] = dataclasses.replace(cur, **kw)  # type: ignore[type-var]
    return dataclasses.replace(base, **out)


def evaluate_bundle(
    data_dir: str | os.PathLike[str],
    bundle_path: str | os.PathLike[str],
    *,
    split_at: str | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """({mode: evaluation table} for batch (features as of the split, the bundle's ranker) and
    online (as of each impression, its online ranker), the quality of the lists its nightly
    would write at the split)."""
    bundle = Bundle.load(bundle_path)
    logged = Dataset.from_validated(validate_dataset(read_dataset(data_dir)))
    pc = load_config(None).pipeline
    data = sampled_impressions(logged, pc.sampled_negatives, pc.seed, pc.sampled_popular_share)
    test_at = parse_time(split_at or bundle.manifest["split"]["test_at"])
    rows = data.impressions.filter(pl.col("ts") >= test_at)
    if rows.height == 0:
        raise ConfigError(
            f"no impressions at or after {test_at.isoformat()} in {data_dir}; pass an earlier "
            "--split-at"
        )
    req = requests(rows)
    cut = req.with_columns(pl.lit(test_at, dtype=pl.Datetime("us", "UTC")).alias("ts"))
    heads = {
        BATCH: (bundle.spec, bundle.ranker, cut),
        ONLINE: (bundle.online_spec or bundle.spec, bundle.online_ranker or bundle.ranker, req),
    }
    tables = {}
    for mode, (spec, ranker, at) in heads.items():
        online = dataclasses.replace(spec, refresh=ONLINE)  # `at` holds the moments already
        frame = point_in_time_frame(online, at, data, bundle.vectors if spec.use_semantic else None)
        frame = frame.with_columns(rows["clicked"])
        scorers = [*baseline_scorers(spec, seed=0), LGBMScorer("bundle", ranker)]
        scores = score_rows(frame, scorers)
        tables[mode] = evaluation_table(scores, [*BASELINES, "bundle"], versus=BASELINES).to_dicts()
    settings = list_settings(bundle_config(bundle))
    lists = list_evaluation(logged, test_at, bundle.ranker, bundle.spec, settings, bundle.vectors,
                            log, prior_weight=bundle_prior_weight(bundle))  # fmt: skip
    return tables, lists
