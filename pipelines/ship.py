"""The nightly's last stages: evaluate the rankers, write the model bundle, build the ranked
lists through it."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import polars as pl

from features import FeatureConfig, build_snapshot
from features.events import live_lag_seconds
from recsys.bundle import Bundle, write_bundle
from recsys.data.schema import TS
from recsys.evaluation import (
    BASELINES,
    BATCH,
    MODELS,
    freshness_note,
    model_scorers,
    ranker_spec,
    score_chunks,
    ship_choice,
)
from recsys.featurize import ONLINE, FeatureSpec
from recsys.io import write_json, write_parquet
from recsys.lists import (
    ListSettings,
    block_users,
    fit_prior_weight,
    list_context,
    list_evaluation,
    ranked_lists,
)
from recsys.metrics import evaluation_table, impression_metrics, paired_difference
from recsys.ranker import Ranker

from .prepare import Split, Validated, as_time, logged_data, read_tables
from .stages import StageContext, StageResult, to_json
from .train import (
    Embedded,
    Finetuned,
    Frames,
    Ranked,
    frame_chunks,
    frames_of,
    item_vectors,
    load_rankers,
)

Rankers = tuple[dict[str, Ranker], dict[str, Ranker]]


@dataclass(frozen=True)
class ModeEvaluation:
    test: list[dict[str, Any]]  # the evaluation table, one row per model
    versus: str
    full_vs_behavioural: dict[str, float]  # auc_diff, auc_diff_se
    shipped_ranker: dict[str, str]  # name, reason
    freshness: str
    validation: dict[str, float]  # the selected lgbm_full on the validation rows


@dataclass(frozen=True)
class Evaluation:
    batch: ModeEvaluation  # the headline: what the lists and an API without events serve
    online: ModeEvaluation
    lists: dict[str, Any]
    candidate_recall: dict[str, float]

    def report(self) -> dict[str, Any]:
        """evaluation.json: the batch mode's fields at the top, the online mode's under
        "online", the lists' evaluation."""
        return {**to_json(self.batch), ONLINE: to_json(self.online), "lists": self.lists,
                "candidate_recall": self.candidate_recall}  # fmt: skip


def _evaluate_mode(
    mode: str, rows: Callable[[str], Iterator[pl.DataFrame]], rankers: Rankers, ranked: Ranked,
    spec: FeatureSpec, test_at: datetime, seed: int, ship: tuple[bool, float, str],
    log: Callable[[str], None],
) -> tuple[ModeEvaluation, pl.DataFrame]:  # fmt: skip
    """One freshness mode's table and scores on the test rows, its validation metrics and ship
    choice. `rows(split)`: the mode's feature rows of a split, in pieces (`frame_chunks`);
    `rankers`: (shipped, selected by early stopping) of the mode."""
    shipped, selected = rankers
    scores = score_chunks(rows("test"), model_scorers(spec, shipped, seed))
    table = evaluation_table(scores, list(MODELS), versus=BASELINES).to_dicts()
    # validation: the models early stopping chose, on rows none of them trained on
    vscores = score_chunks(rows("valid"), model_scorers(spec, selected, seed))
    diff, se = paired_difference(scores, "lgbm_full", "lgbm_behavioural")
    name, reason = ship_choice(diff, se, *ship)
    log(f"[evaluate] {mode}: ships {name}: {reason}")
    return ModeEvaluation(
        test=table,
        versus=table[0]["versus"],
        full_vs_behavioural={"auc_diff": diff, "auc_diff_se": se},
        shipped_ranker={"name": name, "reason": reason},
        freshness=freshness_note(mode, spec, test_at, ranked.refresh[mode].validation_auc),
        validation=impression_metrics(vscores.rename({"lgbm_full": "score"})),
    ), scores


def evaluate(
    ctx: StageContext,
    validated: StageResult[Validated],
    split: StageResult[Split],
    embedded: StageResult[Embedded],
    frames: StageResult[Frames],
    ranked: StageResult[Ranked],
    spec: FeatureSpec,
    seed: int,
    ship: tuple[bool, float, str],
    lists: ListSettings,
) -> Evaluation:
    """Both modes' tables (scores*.parquet), then the batch ranker's lists made at the cut-off
    judged on what users consumed next. `ship`: (use_semantic, margin in standard errors,
    pipeline.ship) for `ship_choice`."""
    s, log = split.summary, ctx.env.log
    spec = _chosen(spec, ranked)
    shipped, selected = load_rankers(ranked), load_rankers(ranked, selected=True)
    modes: dict[str, ModeEvaluation] = {}
    for mode in frames_of(frames):
        rows = functools.partial(frame_chunks, frames, mode, ranked.summary.refresh[mode].chosen,
                                 chunk_rows=ctx.env.chunk_rows)  # fmt: skip
        modes[mode], scores = _evaluate_mode(
            mode, rows, (shipped[mode], selected[mode]), ranked.summary, spec, s.test_at, seed,
            ship, log,
        )  # fmt: skip
        write_parquet(scores, ctx.work / scores_file(mode))
    name = modes[BATCH].shipped_ranker["name"]
    logged, vectors = logged_data(validated), item_vectors(embedded, spec)
    block = block_users(ctx.env.chunk_rows, lists.quotas)
    weight, tried = fit_prior_weight(
        logged, s.valid_at, selected[BATCH][name], ranker_spec(spec, name), lists, vectors,
        block=block,
    )  # fmt: skip
    if tried:
        log(f"[evaluate] lists: popularity weight {weight:g}, chosen at the validation cut-off "
            f"(recall@{lists.top_n} " + ", ".join(f"w {k} {v:.4f}" for k, v in tried.items())
            + ")")  # fmt: skip
    judged = list_evaluation(logged, s.test_at, shipped[BATCH][name], ranker_spec(spec, name),
                             lists, vectors, log, prior_weight=weight, block=block)  # fmt: skip
    judged["prior_weight_validation"] = tried
    recall = {f"recall@{r['k']} ({r['source']})": r["recall"] for r in judged["sources"]}
    out = Evaluation(modes[BATCH], modes[ONLINE], judged, recall)
    write_json(out.report(), ctx.work / "evaluation.json")
    return out


def scores_file(mode: str) -> str:
    return "scores.parquet" if mode == BATCH else f"scores_{mode}.parquet"


def _chosen(spec: FeatureSpec, ranked: StageResult[Ranked]) -> FeatureSpec:
    """`spec` at the batch training freshness the rank stage chose."""
    return dataclasses.replace(spec, refresh=ranked.summary.refresh[BATCH].chosen)


@dataclass(frozen=True)
class Bundled:
    as_of: datetime  # the bundle's features are as of this moment (just after the log's end)
    model_version: str


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("recsys", "torch", "transformers", "peft", "lightgbm", "polars", "pyarrow", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _log_end(data: Any) -> datetime:
    """Just after the last impression or interaction: the moment the bundle describes."""
    last = (data.impressions["ts"].max(), data.interactions["ts"].max())
    return max(as_time(t) for t in last if t is not None) + timedelta(microseconds=1)


def bundle(
    ctx: StageContext,
    validated: StageResult[Validated],
    split: StageResult[Split],
    finetuned: StageResult[Finetuned],
    embedded: StageResult[Embedded],
    ranked: StageResult[Ranked],
    evaluation: StageResult[Evaluation],
    spec: FeatureSpec,
    features: FeatureConfig,
    lists: ListSettings,
    params: dict[str, Any],
    data_fingerprint: str,
) -> Bundled:
    """The model bundle (ctx.work/bundle): encoder, item vectors, the feature snapshot at the
    log's end, the shipped batch and online rankers and a manifest of how they were made.
    `params`: the nightly config, flat, as logged."""
    data = read_tables(validated.path)
    as_of = _log_end(data)
    spec = _chosen(spec, ranked)
    ev = evaluation.summary
    ctx_lists = list_context(logged_data(validated), as_of, lists, item_vectors(embedded, spec))
    manifest = {
        "config": params,
        "data_fingerprint": data_fingerprint,
        "encoder_id": embedded.summary.item_vectors.encoder_id,
        "metrics": {"test": ev.batch.test, "validation": ev.batch.validation},
        "split": to_json(split.summary),
        "versions": _versions(),
        "model_version": f"{params['name']}-{ranked.fingerprint[:10]}",
        "ranker": ev.batch.shipped_ranker,
        "online": {
            "ranker": ev.online.shipped_ranker,
            "metrics": {"test": ev.online.test},
            # a live server ranks as the batch path after this long without an event
            "max_event_lag_s": live_lag_seconds(
                pl.concat([data.impressions["ts"].cast(TS), data.interactions["ts"].cast(TS)]),
                as_of,
            ),
        },
        "lists": {
            "half_life_days": ctx_lists.cadence.half_life_days,
            "live_window_days": ctx_lists.cadence.live_window_days,
            "quotas": dict(lists.quotas),
            "rules": to_json(lists.rules),
            "prior_weight": ev.lists.get("prior_weight", 0.0),
        },
    }
    rankers = load_rankers(ranked)
    batch_name, online_name = ev.batch.shipped_ranker["name"], ev.online.shipped_ranker["name"]
    online_spec = dataclasses.replace(spec, refresh=ONLINE)
    write_bundle(
        ctx.work / "bundle",
        encoder_dir=finetuned.path / "encoder",
        vectors_path=embedded.path / "item_vectors.parquet",
        frozen_vectors_path=embedded.path / "item_vectors_frozen.parquet",
        snapshot=build_snapshot(data, as_of, features),
        history=data.interactions.select("user_id", "item_id", "ts"),
        popular=ctx_lists.popularity,
        ranker=rankers[BATCH][batch_name],
        spec=ranker_spec(spec, batch_name),
        online=(rankers[ONLINE][online_name], ranker_spec(online_spec, online_name)),
        manifest=manifest,
    )
    return Bundled(as_of, manifest["model_version"])


@dataclass(frozen=True)
class Listed:
    users: int
    rows: int
    short: int  # users with fewer than top_n items


def lists(
    ctx: StageContext,
    validated: StageResult[Validated],
    bundled: StageResult[Bundled],
    settings: ListSettings,
) -> Listed:
    """Top-N per active user through the bundle (ctx.work/recommendations.parquet)."""
    from tqdm import tqdm

    b = Bundle.load(bundled.path / "bundle")
    logged = logged_data(validated)
    ctx_lists = list_context(logged, bundled.summary.as_of, settings, b.vectors)
    with tqdm(desc="ranked lists", unit="users", disable=None) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        block = block_users(ctx.env.chunk_rows, settings.quotas)
        recs, short = ranked_lists(b, logged, ctx_lists, settings, progress=progress, block=block)
    write_parquet(recs, ctx.work / "recommendations.parquet")
    if short:
        ctx.env.log(f"[lists] {short} users have fewer than {settings.top_n} items (not enough "
                    "eligible candidates after the rules)")  # fmt: skip
    return Listed(recs["user_id"].n_unique(), recs.height, short)
