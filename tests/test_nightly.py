"""The nightly pipeline end to end on generated data: real local Ray, real MLflow (sqlite).

The generator's known answer: clicks depend on the topic (only in the text) and on behaviour
(quality, freshness), so LightGBM over both must beat each side alone. The end-to-end tests read
the session's one nightly (`nightly` in conftest.py); a test that needs a second run copies its
run folder, so the rerun reuses every stage whose inputs are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import polars as pl
import pytest
from conftest import NIGHTLY_SIZES, NIGHTLY_TOML, copy_run, count_stages

from experiments.config import PipelineConfig, config_from_dict
from features import FeatureConfig
from pipelines.nightly import run_nightly
from recsys.bundle import Bundle
from recsys.data import write_dataset
from recsys.errors import ConfigError, DataError
from recsys.evaluation import batch_moments, ship_choice
from recsys.featurize import FeatureSpec
from recsys.generate import GeneratorConfig, generate
from recsys.lists import PRIOR_WEIGHTS


def test_batch_rows_get_the_moment_the_batch_path_serves() -> None:
    """Test rows as of the cut-off, validation rows as of the validation start (a bundle built
    then serves them), training rows as of the start of their refresh period."""
    utc = pl.Datetime("us", "UTC")
    ts = [datetime(2026, 1, d, h, tzinfo=UTC) for d, h in ((1, 5), (2, 20), (3, 9), (4, 1), (5, 7))]
    imp = pl.DataFrame(
        {"ts": ts, "split": ["train", "train", "train", "valid", "test"]},
        schema={"ts": utc, "split": pl.Utf8},
    )
    req = imp.select(pl.int_range(5).alias("request_id"), "ts")
    valid_at, cutoff = datetime(2026, 1, 3, 12, tzinfo=UTC), datetime(2026, 1, 4, 6, tzinfo=UTC)
    day = datetime(2026, 1, 1, tzinfo=UTC)

    def moments(refresh: str) -> list[datetime]:
        spec = FeatureSpec(FeatureConfig(), refresh=refresh)
        return batch_moments(req, imp, spec, valid_at, cutoff)["ts"].to_list()

    assert moments("2d") == [day, day, datetime(2026, 1, 3, tzinfo=UTC), valid_at, cutoff]
    one = moments("1d")
    assert one[:3] == [day, datetime(2026, 1, 2, tzinfo=UTC), datetime(2026, 1, 3, tzinfo=UTC)]
    assert moments("online")[:3] == ts[:3]


def test_the_full_ranker_ships_only_when_it_beats_the_behavioural_one_beyond_the_noise() -> None:
    assert ship_choice(0.02, 0.005, True, 2.0)[0] == "lgbm_full"
    name, why = ship_choice(0.008, 0.005, True, 2.0)  # 1.6 se: within the noise
    assert name == "lgbm_behavioural" and "not more than 2 se" in why
    assert ship_choice(-0.01, 0.001, True, 2.0)[0] == "lgbm_behavioural"
    assert ship_choice(0.0, 0.0, True, 2.0)[0] == "lgbm_behavioural"  # a tie
    assert ship_choice(float("nan"), float("nan"), True, 2.0)[0] == "lgbm_behavioural"
    name, why = ship_choice(0.5, 0.001, False, 2.0)
    assert name == "lgbm_behavioural" and "use_semantic" in why
    name, why = ship_choice(-0.01, 0.001, True, 2.0, ship="lgbm_full")  # pipeline.ship forces it
    assert name == "lgbm_full" and "pipeline.ship" in why


def _lists(path: Path) -> pl.DataFrame:
    return (
        pl.read_parquet(path).select("user_id", "rank", "item_id", "score").sort("user_id", "rank")
    )


@pytest.mark.slow
def test_outputs_and_known_answer(nightly):
    result = nightly.result
    rows = {r["model"]: r for r in result.evaluation}
    assert list(rows) == [
        "random", "popularity", "smoothed_ctr", "recent_clicks", "semantic_frozen",
        "semantic_tuned", "lgbm_behavioural", "lgbm_full",
    ]  # fmt: skip
    full = rows["lgbm_full"]["ndcg@10"]
    for other in set(rows) - {"lgbm_full"}:
        assert full > rows[other]["ndcg@10"], (other, rows)
    # every row is compared with the best simple baseline, paired over the same impressions
    assert result.versus in ("random", "popularity", "smoothed_ctr", "recent_clicks")
    assert rows[result.versus]["auc_diff"] == 0.0
    best = max(rows[m]["auc"] for m in ("random", "popularity", "smoothed_ctr", "recent_clicks"))
    assert rows[result.versus]["auc"] == best
    for r in rows.values():
        assert r["auc_diff"] == pytest.approx(r["auc"] - best, abs=1e-9) and r["auc_diff_se"] >= 0
    assert result.full_vs_behavioural["auc_diff"] == pytest.approx(
        rows["lgbm_full"]["auc"] - rows["lgbm_behavioural"]["auc"], abs=1e-9
    )
    # "auto": every candidate period was fitted; the one whose lgbm_full validates best ships
    chosen, aucs = result.refresh["chosen"], result.refresh["validation_auc"]
    assert list(aucs) == list(PipelineConfig().refresh_candidates) == ["1d", "2d"]
    assert aucs[chosen]["lgbm_full"] == max(a["lgbm_full"] for a in aucs.values())
    assert (
        f"refreshed every {chosen}" in result.freshness and "as of the cut-off" in result.freshness
    )
    assert "chosen among 1d, 2d" in result.freshness
    # the online mode: its own table (same models, same baselines) and its own shipped ranker
    online = {r["model"]: r for r in result.online["test"]}
    assert list(online) == list(rows) and "online" in result.online["freshness"]
    assert online["lgbm_full"]["n_impressions"] == rows["lgbm_full"]["n_impressions"]
    assert online["smoothed_ctr"]["auc"] != rows["smoothed_ctr"]["auc"]  # fresher counts
    # pipeline.ship forced the full ranker (the API's tests need both halves on the hot path);
    # the reason still gives the comparison the gate would have made (ship_choice's own test
    # covers the choice itself)
    fb = result.full_vs_behavioural
    assert result.shipped_ranker["name"] == "lgbm_full"
    assert "pipeline.ship = 'lgbm_full'" in result.shipped_ranker["reason"]
    assert f"{fb['auc_diff']:+.4f}" in result.shipped_ranker["reason"]
    manifest = json.loads((result.run_dir / "bundles" / "current" / "manifest.json").read_text())
    assert manifest["ranker"] == result.shipped_ranker
    assert manifest["online"]["ranker"] == result.online["shipped_ranker"]
    bundle = Bundle.load(result.run_dir / "bundles" / "current")
    assert bundle.online_ranker is not None and bundle.online_spec is not None
    assert bundle.online_spec.refresh == "online" and bundle.spec.refresh == chosen
    assert list(bundle.online_ranker.feature_names) == manifest["online"]["feature_names"]
    # a tuned encoder: the full ranker reads the frozen encoder's cosines too, the bundle
    # carries both vector sets, and the API's fast path computes them as featurize does
    from recsys.ranker import Ranker

    assert result.finetune["fell_back"] is False, result.finetune  # the adapter shipped
    full = Ranker.load(result.run_dir / "rank" / "lgbm_full").feature_names
    assert "sem_cos_mean_frozen" in full and "sem_cos_max_frozen_rank" in full
    assert bundle.vectors.frozen is not None and bundle.vectors.frozen.ids == bundle.vectors.ids
    from serving.ranking import ServingModel

    ServingModel.from_bundle(bundle, preload_encoder=False)  # the parity self-check
    recs = pl.read_parquet(result.recommendations)
    assert recs.columns == [
        "user_id", "rank", "item_id", "score", "source", "model_version", "generated_at"
    ]  # fmt: skip
    known = {"semantic", "cooccurrence", "popular", "category", "fresh"}
    assert all(set(s.split("+")) <= known for s in recs["source"].unique())
    assert recs.group_by("user_id").len()["len"].max() <= 20
    assert recs.filter(pl.col("rank") == 1)["user_id"].n_unique() == recs["user_id"].n_unique()
    # lists exclude what the user already consumed
    seen = pl.read_parquet(result.run_dir / "validate" / "interactions.parquet")
    assert recs.join(seen, on=["user_id", "item_id"], how="semi").height == 0
    scores = pl.read_parquet(result.run_dir / "evaluate" / "scores.parquet")
    assert {"impression_id", "user_id", "item_id", "clicked", "lgbm_full"} <= set(scores.columns)
    saved = json.loads((result.run_dir / "evaluation.json").read_text())
    assert saved["test"] == result.evaluation
    assert result.candidate_recall and all(0 <= v <= 1 for v in result.candidate_recall.values())
    # list quality: every source's recall and the union's, the lists beside baseline lists
    sources = {r["source"]: r for r in result.lists["sources"]}
    assert set(sources) == {"semantic", "cooccurrence", "popular", "category", "fresh", "union"}
    assert all(sources["union"]["recall"] >= r["recall"] for r in sources.values())
    table = {r["list"]: r for r in result.lists["table"]}
    assert set(table) == {"lgbm_lists", "popular", "recent_popular", "item_knn"}
    assert table[result.lists["versus"]]["recall_diff"] == 0.0
    for r in table.values():
        assert 0 <= r["recall@20"] <= 1 and 0 <= r["ndcg@20"] <= 1 and r["recall_diff_se"] >= 0
    assert saved["lists"]["note"].startswith("lists as of the cut-off")
    # the popularity weight of the lists: chosen at the validation cut-off, used by the test
    # evaluation and written into the bundle that the lists stage (and the API) read
    tried = saved["lists"]["prior_weight_validation"]
    assert set(tried) == {f"{w:g}" for w in PRIOR_WEIGHTS}
    weight = saved["lists"]["prior_weight"]
    assert tried[f"{weight:g}"] == max(tried.values())
    assert Bundle.load(result.bundle_dir).manifest["lists"]["prior_weight"] == weight
    ceiling = saved["lists"]["ceiling"]
    assert table["lgbm_lists"]["recall@20"] <= ceiling["recall"] <= 1
    cost = json.loads((result.run_dir / "cost.json").read_text())
    # The Ray workers' cost is counted: fine-tune workers and embed actors.
    for stage in ("finetune", "embed"):
        assert cost["stages"][stage]["worker_cpu_seconds"] > 0, stage
        assert cost["stages"][stage]["worker_peak_rss_mb"] > 0, stage
    # the LoRA adapter (under 1% of MiniLM's weights) and the 384 x 384 projection head
    assert cost["trainable_params"] - 384 * 384 < 0.01 * cost["total_params"]
    assert cost["items_embedded"] + cost["items_reused"] == NIGHTLY_SIZES["items"]
    # the published bundle: RUN_DIR/bundles/current -> an immutable version holding the lists
    current = result.run_dir / "bundles" / "current"
    assert current.is_symlink() and current.resolve() == Path(result.bundle_dir).resolve()
    assert pl.read_parquet(current / "recommendations.parquet").equals(recs)


@pytest.mark.slow
def test_mlflow_run_and_champion(nightly, tmp_path):
    result, uri = nightly.result, nightly.tracking_uri
    client = mlflow.MlflowClient(uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.data.params["finetune.method"] == "lora"
    assert "test.lgbm_full.ndcg_at_10" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"feature_importance.png", "training_curves.png", "cost_report.json",
            "evaluation.json", "lists"} <= arts, arts  # fmt: skip
    # every stage is a run nested under the nightly's (same experiment); fine-tuning's holds
    # its epoch metrics
    children = client.search_runs(
        [run.info.experiment_id],
        f"tags.mlflow.parentRunId = '{result.mlflow_run_id}'",
    )
    stages = {c.info.run_name: c for c in children}
    assert set(stages) == {s.name for s in result.stages}, sorted(stages)
    assert stages["finetune"].data.tags["stage.reused"] == "false"
    # (step metrics come every 10 steps: this run's 8 adapter steps log none)
    assert {"loss", "val_auc", "seconds"} <= set(stages["finetune"].data.metrics)
    assert result.registry["promoted"] is True
    champ = client.get_model_version_by_alias("recsys", "champion")
    assert str(champ.version) == result.registry["version"]
    # the version is the pyfunc model of the bundle (tests/test_pyfunc.py loads and ranks it)
    logged = client.get_logged_model(champ.source.removeprefix("models:/"))
    assert logged.source_run_id == run.info.run_id
    # A worse model (the behavioural ranker shipped) on the same gate slice does not take the
    # alias; the reason is recorded. A copy of the run folder: only evaluate, bundle and lists
    # run again.
    worse_cfg = tmp_path / "worse.toml"
    worse_cfg.write_text(NIGHTLY_TOML.replace('ship = "lgbm_full"', 'ship = "lgbm_behavioural"'))
    worse = run_nightly(nightly.data_dir, copy_run(nightly, tmp_path / "worse"),
                        config_path=worse_cfg, tracking_uri=uri, log=count_stages)  # fmt: skip
    assert worse.shipped_ranker["name"] == "lgbm_behavioural"
    assert not {s.name for s in worse.stages if not s.skipped} & {"finetune", "embed", "rank"}
    assert worse.registry["promoted"] is False, worse.registry
    assert "does not become champion" in worse.registry["reason"]
    assert worse.registry["gate"]["diff"] < 0 and "worse" in worse.registry["reason"]
    # The same data and config again (every stage reused): the same model, also refused.
    again = run_nightly(
        nightly.data_dir,
        copy_run(nightly, tmp_path / "again"),
        config_path=nightly.config_file,
        tracking_uri=uri,
        log=count_stages,
    )
    assert all(s.skipped for s in again.stages), [s.name for s in again.stages if not s.skipped]
    assert again.registry["promoted"] is False, again.registry
    assert again.registry["gate"]["diff"] == 0 and "within the noise" in again.registry["reason"]
    assert str(client.get_model_version_by_alias("recsys", "champion").version) == str(
        champ.version
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_run_resumes_with_identical_lists(nightly, tmp_path):
    """Kill a run in the middle of a stage (SIGKILL, no clean-up) and rerun it: it resumes (the
    stages before the killed one are reused, the killed one runs again), and its lists equal
    the session nightly's, made in another process. The killed stage is `embed`, the Ray Data
    job; the run folder starts with the session nightly's stages before it (validate, split,
    finetune: what a run that got that far leaves), so fine-tuning is not paid twice."""
    stage, before = "embed", ["validate", "split", "finetune"]
    out = tmp_path / "killed"
    for name in before:
        shutil.copytree(nightly.run_dir / name, out / name)
    cfg_file = tmp_path / "fast.toml"
    cfg_file.write_text(NIGHTLY_TOML + "\n[tracking]\nenabled = false\n")
    cmd = [sys.executable, "-u", "-m", "recsys.cli", "nightly", "--data", str(nightly.data_dir),
           "--out", str(out), "--config", str(cfg_file)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # the run says when the stage starts: kill it then
        seen.append(line)
        count_stages(line)
        if line.startswith(f"[{stage}] running"):
            break
    assert proc.poll() is None, f"the run ended before {stage} started:\n{''.join(seen)}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert not (out / stage / "_stage.json").exists()
    assert not (out / "recommendations.parquet").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    count_stages(done.stdout)
    for name in before:
        assert f"[{name}] unchanged inputs, reusing" in done.stdout, name
    assert f"[{stage}] running" in done.stdout
    assert not list(out.glob(".*.tmp"))  # the killed run's partial folder is gone
    ref = nightly.result.recommendations
    assert _lists(out / "recommendations.parquet").equals(_lists(ref))


@pytest.mark.slow
def test_a_second_nightly_on_the_run_folder_prunes_old_bundles_and_serves_its_rules(
    nightly, tmp_path
):
    """A second nightly on the same run folder with [rules] and keep_bundles = 1: a new
    version is published, `current` points at it, the old one is pruned, and the API serving
    it applies the bundle's rules to /v1/rank and /v1/recommendations."""
    import httpx
    from servers import live_server

    from serving.app import create_app
    from serving.settings import Settings

    run = copy_run(nightly, tmp_path / "run")
    old = (run / "bundles" / "current").resolve().name
    recs = pl.read_parquet(nightly.result.recommendations)
    items = pl.read_parquet(nightly.data_dir / "items.parquet").select("item_id", "category")
    # the category the first lists hold most: excluded from now on
    banned = recs.join(items, on="item_id")["category"].mode().sort()[0]
    cfg = tmp_path / "rules.toml"
    cfg.write_text(
        NIGHTLY_TOML.replace("[pipeline]\n", "[pipeline]\nkeep_bundles = 1\n")
        + f"\n[rules]\nexclude_categories = [{banned!r}]\n[tracking]\nenabled = false\n"
    )
    second = run_nightly(nightly.data_dir, run, config_path=cfg, log=count_stages)
    versions = [p.name for p in (run / "bundles").iterdir() if not p.is_symlink()]
    assert versions == [second.bundle_dir.name] and second.bundle_dir.name != old
    assert (run / "bundles" / "current").resolve() == second.bundle_dir.resolve()
    banned_items = set(items.filter(pl.col("category") == banned)["item_id"])
    lists = pl.read_parquet(second.recommendations)
    assert lists.height > 0 and not set(lists["item_id"]) & banned_items
    settings = Settings(bundle=run / "bundles" / "current", preload_encoder=False)  # type: ignore[call-arg]
    for srv in live_server(create_app(settings)):
        model = srv.state.model
        assert model.rules.exclude_categories == (banned,)
        user = lists["user_id"][0]
        cands = [i for i in model.popular_ids if i in model.catalogue.item_category][:50]
        assert set(cands) & banned_items  # the request offers banned items
        r = httpx.post(f"{srv.url}/v1/rank", json={"user_id": user, "candidates": cands})
        ranked = [i["item_id"] for i in r.json()["items"]]
        assert r.status_code == 200 and ranked and not set(ranked) & banned_items
        r = httpx.get(f"{srv.url}/v1/recommendations/{user}", params={"k": 20})
        mine = lists.filter(pl.col("user_id") == user).sort("rank")["item_id"].to_list()
        assert [i["item_id"] for i in r.json()["items"]] == mine[:20]
        r = httpx.get(f"{srv.url}/v1/recommendations/stranger", params={"k": 20})
        fallback = [i["item_id"] for i in r.json()["items"]]
        assert r.json()["fallback"] and fallback and not set(fallback) & banned_items


def test_split_that_empties_a_side_names_the_dates(tmp_path):
    data, _ = generate(GeneratorConfig(n_items=60, n_users=30, n_shown=400, seed=1))
    write_dataset(tmp_path / "d", data)
    cfg = config_from_dict({"tracking": {"enabled": False}})
    with pytest.raises(ConfigError, match=r"empty train set.*impressions run from 2026-01-0"):
        run_nightly(tmp_path / "d", tmp_path / "r", config=cfg, split_at="2020-01-01",
                    log=lambda s: None)  # fmt: skip
    with pytest.raises(ConfigError, match="empty test set"):
        run_nightly(tmp_path / "d", tmp_path / "r", config=cfg, split_at="2030-01-01T00:00:00Z",
                    log=lambda s: None)  # fmt: skip
    with pytest.raises(ConfigError, match="not an ISO time"):
        run_nightly(tmp_path / "d", tmp_path / "r", config=cfg, split_at="yesterday",
                    log=lambda s: None)  # fmt: skip


def test_rule_naming_an_unknown_category_fails_before_any_work(tmp_path):
    data, _ = generate(GeneratorConfig(n_items=60, n_users=30, n_shown=400, seed=1))
    write_dataset(tmp_path / "d", data)
    cfg = config_from_dict(
        {"tracking": {"enabled": False}, "rules": {"exclude_categories": ["no-such-category"]}}
    )
    with pytest.raises(ConfigError, match=r"config \[rules\].*no-such-category"):
        run_nightly(tmp_path / "d", tmp_path / "r", config=cfg, log=lambda s: None)
    assert not (tmp_path / "r" / "finetune").exists()


def test_a_second_run_on_a_busy_run_folder_is_refused(tmp_path):
    import filelock

    out = tmp_path / "run"
    out.mkdir()
    busy = filelock.FileLock(out / ".nightly.lock")  # as a run in progress holds it
    with busy, pytest.raises(ConfigError, match="another nightly is running"):
        cfg = config_from_dict({"tracking": {"enabled": False}})
        run_nightly(tmp_path / "no-data", out, config=cfg, log=lambda s: None)
    assert not [p for p in out.iterdir() if p.name != ".nightly.lock"]  # nothing started


def test_missing_dataset_is_a_clear_error(tmp_path):
    cfg = config_from_dict({"tracking": {"enabled": False}})
    with pytest.raises(DataError, match=r"items\.parquet"):
        run_nightly(tmp_path / "nope", tmp_path / "r", config=cfg, log=lambda s: None)
