"""The CLI: help everywhere, one-line errors with exit code 2."""

import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import copy_run

from recsys.cli import build_parser, main

COMMANDS = ["demo", "generate", "import", "finetune", "embed", "nightly", "evaluate", "serve",
            "compare"]  # fmt: skip


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for c in COMMANDS:
        assert c in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: recsys " + command in out
    assert "--verbose" in out and "--quiet" in out


def test_log_level_from_the_flags_or_the_environment(monkeypatch, tmp_path, capsys):
    import logging

    from recsys import logs

    root = logging.getLogger()  # main() configures the process: undone after the test
    for name, value in (("level", root.level), ("handlers", list(root.handlers))):
        monkeypatch.setattr(root, name, value)
    monkeypatch.setattr(logs, "_configured", False)
    monkeypatch.setenv(logs.ENV, "warning")
    assert logs.level_from() == logging.WARNING
    assert logs.level_from(verbose=True) == logging.DEBUG  # the flag wins
    monkeypatch.delenv(logs.ENV)
    assert logs.level_from() == logging.INFO
    assert logs.level_from(quiet=True) == logging.WARNING
    # a level no one can mean: one line, exit 2, before any work
    monkeypatch.setenv(logs.ENV, "LOUD")
    assert main(["generate", "--out", str(tmp_path / "d"), "--items", "5"]) == 2
    assert "RECSYS_LOG_LEVEL='LOUD': give one of DEBUG, INFO, WARNING, ERROR" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "d").exists()
    with pytest.raises(SystemExit):  # argparse: not both
        build_parser().parse_args(["generate", "--out", "x", "-v", "-q"])
    # the level reaches processes started later (Ray workers follow RECSYS_LOG_LEVEL)
    monkeypatch.setenv(logs.ENV, "INFO")
    assert main(["generate", "--out", str(tmp_path / "q"), "--items", "20", "--users", "5",
                 "--shown", "50", "--quiet"]) == 0  # fmt: skip
    assert os.environ[logs.ENV] == "WARNING" and not logs.progress()


def test_generate_writes_a_dataset_of_the_sizes_asked_for(tmp_path, capsys):
    from recsys.data import read_dataset

    assert main(["generate", "--out", str(tmp_path / "d"), "--items", "50", "--users", "20",
                 "--shown", "200"]) == 0  # fmt: skip
    data = read_dataset(tmp_path / "d")
    assert data.items.height == data.items["item_id"].n_unique() == 50
    assert data.impressions.height == 200  # impression rows (items shown)
    users = set(data.interactions["user_id"]) | set(data.impressions["user_id"])
    assert len(users) == 20
    assert set(data.impressions["item_id"]) <= set(data.items["item_id"])
    assert re.search(r"^impressions\s+200\b", capsys.readouterr().out, re.M)


def test_missing_source_is_one_line_exit_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "recsys.cli", "import", "--format", "movielens",
         str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0] and "Traceback" not in out.stderr


def test_missing_dataset_dir_for_nightly(tmp_path, capsys):
    code = main(["nightly", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    assert code == 2
    err = capsys.readouterr().err
    assert "missing" in err and "items.parquet" in err


def test_unknown_format_is_rejected_by_the_parser():
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["import", "--format", "csv", "x", "--out", "y"])
    assert e.value.code == 2


STAGES = ["validate", "split", "finetune", "embed", "features", "rank", "evaluate", "bundle",
          "lists"]  # fmt: skip


@pytest.mark.slow
def test_demo_command_prints_the_run(nightly, tmp_path, capsys):
    """`recsys demo` as a user types it, on the session nightly's small catalogue (the session
    ran the same `run_demo`; here, on a copy of its folder, every stage is reused): the stage
    table, both evaluation tables, the shipped rankers, the lists and where things are."""
    out = tmp_path / "demo"
    shutil.copytree(nightly.data_dir, out / "data")
    copy_run(nightly, out / "run")
    assert main(nightly.demo_args(out, f"sqlite:///{tmp_path / 'mlflow.db'}")) == 0
    text = capsys.readouterr().out
    assert "Generating" not in text  # the data was there: kept
    for stage in STAGES:
        assert re.search(rf"^{stage}\s+reused\b", text, re.M), stage
    for mode in ("batch", "online"):
        assert f"Evaluation on the test split, {mode} features" in text
        assert f"{mode}: shipped ranker lgbm_full" in text
    assert "Ranked lists (top 20" in text and "Top 5 for " in text
    assert f"Ranked lists: {out / 'run' / 'recommendations.parquet'}" in text
    assert "no champion yet" in text  # a new MLflow store: this version becomes champion


@pytest.mark.slow
def test_evaluate_command_reproduces_the_nightly_figures(nightly, capsys):
    """`recsys evaluate` of the shipped bundle on its own data and split gives the AUC the
    nightly printed for the shipped ranker, in both freshness modes."""
    result = nightly.result
    assert main(["evaluate", "--data", str(nightly.data_dir), "--bundle",
                 str(result.bundle_dir)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    batch = {r["model"]: r for r in result.evaluation}
    online = {r["model"]: r for r in result.online["test"]}
    blocks = text.split("Evaluation of ")[1:]
    assert [b.split("(")[-1].split(")")[0] for b in (b.splitlines()[0] for b in blocks)] == [
        "batch",
        "online",
    ]
    for block, table in zip(blocks, (batch, online), strict=True):
        auc = re.search(r"^bundle\s+(\S+)", block, re.M)
        assert auc and auc.group(1) == f"{table['lgbm_full']['auc']:.4f}", block[:600]
    assert "Candidate retrieval by source" in text and "Ranked lists" in text


@pytest.mark.slow
def test_compare_command_shows_the_tracked_runs(nightly, capsys):
    assert main(["compare", "--tracking-uri", nightly.tracking_uri]) == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    # one column per config (other tests of the session may have added theirs): the latest
    # run of the session's config
    col = rows["figure"].index("nightly")
    fig = {k: v[col] for k, v in rows.items() if len(v) > col}
    test = {r["model"]: r for r in nightly.result.evaluation}["lgbm_full"]
    assert fig["test.ndcg_at_10"] == f"{test['ndcg@10']:.4f}", text  # lgbm_full's
    online = {r["model"]: r for r in nightly.result.online["test"]}["lgbm_full"]
    assert fig["test_online.ndcg_at_10"] == f"{online['ndcg@10']:.4f}", text
    assert fig["shipped"] == fig["shipped_online"] == "lgbm_full", text
    assert float(fig["wall_s"]) >= float(fig["finetune_s"]) >= 0, text  # a rerun reuses all
    code = main(["compare", "--tracking-uri", nightly.tracking_uri, "--experiment", "nope"])
    assert code == 2 and "no MLflow experiment 'nope'" in capsys.readouterr().err
