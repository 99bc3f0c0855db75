"""The CLI: help everywhere, one-line errors with exit code 2."""

import subprocess
import sys

import pytest

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
    assert "usage: recsys " + command in capsys.readouterr().out


def test_generate_writes_a_dataset(tmp_path, capsys):
    assert main(["generate", "--out", str(tmp_path / "d"), "--items", "50", "--users", "20",
                 "--shown", "200"]) == 0  # fmt: skip
    for t in ("items", "interactions", "impressions", "rejects"):
        assert (tmp_path / "d" / f"{t}.parquet").is_file()
    assert "impressions" in capsys.readouterr().out


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
