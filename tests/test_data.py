"""The data contracts: canonical schemas, validation with rejects, atomic dataset IO."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from recsys.data import (
    SCHEMAS,
    Dataset,
    conform,
    dataset_fingerprint,
    make_rejects,
    read_dataset,
    read_rejects,
    validate,
    validate_dataset,
    write_dataset,
)
from recsys.errors import DataError
from recsys.io import atomic_path, write_parquet

T0 = datetime(2024, 1, 1, 12, tzinfo=UTC)


def _items() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": ["a", "b", "c", "b", "d"],
            "title": ["A", "B", "C", "B again", None],
            "description": ["about a", None, "about c", None, "about d"],
        }
    )


def _interactions() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", None, "u3", "u3"],
            "item_id": ["a", "b", "zzz", "a", "c", "c"],
            "ts": [T0, None, T0, T0, T0, T0],
            "weight": [1.0, 2.0, 1.0, 1.0, math.nan, math.inf],
        }
    )


def _impressions() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "impression_id": ["i1", "i1", "i1", "i2", "i2"],
            "user_id": ["u1", "u1", "u1", "u2", "u2"],
            "ts": [T0] * 5,
            "item_id": ["a", "b", "a", "c", "d"],
            "clicked": [True, False, False, False, True],
            "position": [0, 1, 2, 0, 1],
        }
    )


def _reasons(rejects: pl.DataFrame, table: str) -> list[tuple[int, str]]:
    rows = rejects.filter(pl.col("table") == table).sort("row")
    return list(zip(rows["row"].to_list(), rows["reason"].to_list(), strict=True))


# --- schema -------------------------------------------------------------------------------------


def test_conform_orders_casts_fills_and_drops_columns() -> None:
    df = pl.DataFrame(
        {
            "extra": [1],
            "title": ["T"],
            "item_id": ["x"],
            "published_at": [datetime(2020, 5, 1)],  # naive: taken as UTC
        }
    )
    out = conform("items", df)
    assert out.schema == SCHEMAS["items"]
    assert out.row(0) == ("x", "T", None, None, None, datetime(2020, 5, 1, tzinfo=UTC))

    imp = conform(
        "impressions",
        pl.DataFrame(
            {
                "impression_id": ["1"],
                "user_id": ["u"],
                "ts": [T0],
                "item_id": ["x"],
                "clicked": [True],
                "position": pl.Series([3], dtype=pl.Int64),
            }
        ),
    )
    assert imp.schema["position"] == pl.Int32


def test_conform_missing_required_column_is_a_data_error() -> None:
    with pytest.raises(DataError, match=r"interactions: missing required column\(s\) \['weight'\]"):
        conform("interactions", pl.DataFrame({"user_id": ["u"], "item_id": ["a"]}))


# --- validate -----------------------------------------------------------------------------------


def test_validate_splits_rows_with_reasons_and_row_numbers() -> None:
    v = validate(_items(), _interactions(), _impressions())

    assert v.items["item_id"].to_list() == ["a", "b", "c"]
    assert _reasons(v.rejects, "items") == [
        (3, "duplicate item_id"),
        (4, "null required field: title"),
    ]
    assert v.interactions.select("user_id", "item_id").rows() == [("u1", "a"), ("u1", "b")]
    assert _reasons(v.rejects, "interactions") == [
        (2, "unknown item_id"),
        (3, "null required field: user_id"),
        (4, "non-finite weight"),
        (5, "non-finite weight"),
    ]
    assert v.impressions.select("impression_id", "item_id").rows() == [
        ("i1", "a"),
        ("i1", "b"),
        ("i2", "c"),
    ]
    assert _reasons(v.rejects, "impressions") == [
        (2, "duplicate impression_id+item_id"),
        (4, "unknown item_id"),  # "d" was rejected from the catalogue
    ]
    assert v.counts() == {
        "items": {"kept": 3, "rejected": 2},
        "interactions": {"kept": 2, "rejected": 4},
        "impressions": {"kept": 3, "rejected": 2},
    }
    assert v.reasons().filter(pl.col("reason") == "non-finite weight")["count"].item() == 2
    for t in ("items", "interactions", "impressions"):
        assert getattr(v, t).schema == SCHEMAS[t]


def test_validate_reject_record_holds_the_row_as_json() -> None:
    v = validate(_items(), _interactions(), _impressions())
    rec = v.rejects.filter((pl.col("table") == "items") & (pl.col("row") == 4))["record"].item()
    assert json.loads(rec) == {
        "item_id": "d",
        "title": None,
        "description": "about d",
        "category": None,
        "subcategory": None,
        "published_at": None,
    }


def test_validate_reports_source_row_numbers_and_keeps_prior_rejects() -> None:
    items = _items().with_columns(pl.Series("__row", [10, 11, 12, 13, 14]))
    prior = make_rejects(
        "items",
        pl.DataFrame({"__row": [7], "raw": ["garbage"]}),
        "unparseable line",
    )
    v = validate(items, _interactions().head(2), _impressions().head(2), prior_rejects=prior)
    assert _reasons(v.rejects, "items") == [
        (7, "unparseable line"),
        (13, "duplicate item_id"),
        (14, "null required field: title"),
    ]
    assert "__row" not in v.items.columns


def test_validate_keeps_source_order_of_rows_sharing_a_source_row() -> None:
    """One source row can give several table rows (a MIND impression list): order is kept."""
    n = 5000
    items = pl.DataFrame({"item_id": [f"n{i}" for i in range(n)], "title": ["t"] * n})
    imp = pl.DataFrame(
        {
            "__row": [i // 50 for i in range(n)][::-1],  # descending source rows, ties within
            "impression_id": [str(i // 50) for i in range(n)][::-1],
            "user_id": ["u"] * n,
            "ts": [T0] * n,
            "item_id": [f"n{i}" for i in range(n)],
            "clicked": [False] * n,
            "position": [i % 50 for i in range(n)],
        }
    )
    v = validate(items, pl.DataFrame(schema=SCHEMAS["interactions"]), imp)
    expected = imp.with_row_index("i").sort("__row", "i")["item_id"].to_list()
    assert v.impressions["item_id"].to_list() == expected


def test_validate_first_duplicate_in_source_order_stays() -> None:
    items = pl.DataFrame(
        {"__row": [0, 1, 2], "item_id": ["a", "a", "a"], "title": ["first", "second", "third"]}
    )
    empty_inter = pl.DataFrame(schema=SCHEMAS["interactions"])
    empty_imp = pl.DataFrame(schema=SCHEMAS["impressions"])
    v = validate(items, empty_inter, empty_imp)
    assert v.items["title"].to_list() == ["first"]
    assert _reasons(v.rejects, "items") == [(1, "duplicate item_id"), (2, "duplicate item_id")]


# --- dataset directory --------------------------------------------------------------------------


def test_write_then_read_dataset_round_trips(tmp_path: Path) -> None:
    v = validate(_items(), _interactions(), _impressions())
    manifest = write_dataset(tmp_path / "ds", v, source={"format": "test"})

    assert manifest["counts"] == {"items": 3, "interactions": 2, "impressions": 3}
    assert manifest["rejects"] == 8
    assert manifest["source"] == {"format": "test"}
    on_disk = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert on_disk["fingerprint"] == manifest["fingerprint"] == dataset_fingerprint(tmp_path / "ds")

    ds = read_dataset(tmp_path / "ds")
    assert ds.items.equals(v.items)
    assert ds.interactions.equals(v.interactions)
    assert ds.impressions.equals(v.impressions)
    assert ds.counts() == {"items": 3, "interactions": 2, "impressions": 3}
    assert read_rejects(tmp_path / "ds").equals(v.rejects)
    # A clean dataset validates with no rejects.
    assert validate_dataset(ds).rejects.height == 0


def test_write_dataset_accepts_a_dataset_and_writes_empty_rejects(tmp_path: Path) -> None:
    v = validate(_items(), _interactions(), _impressions())
    manifest = write_dataset(tmp_path, Dataset.from_validated(v))
    assert manifest["rejects"] == 0
    assert read_rejects(tmp_path).height == 0


def test_fingerprint_changes_with_the_data(tmp_path: Path) -> None:
    v = validate(_items(), _interactions(), _impressions())
    write_dataset(tmp_path / "a", v)
    write_dataset(tmp_path / "b", v)
    assert dataset_fingerprint(tmp_path / "a") == dataset_fingerprint(tmp_path / "b")
    write_dataset(tmp_path / "b", Dataset(v.items.head(2), v.interactions, v.impressions))
    assert dataset_fingerprint(tmp_path / "a") != dataset_fingerprint(tmp_path / "b")


def test_atomic_path_failure_keeps_old_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "table.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("partial new cont")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.txt"]


def test_write_parquet_failure_mid_write_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "items.parquet"
    old = pl.DataFrame({"x": [1, 2]})
    write_parquet(old, target)

    def half_write(self: pl.DataFrame, file: Path, **kwargs: object) -> None:
        Path(file).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_parquet(pl.DataFrame({"x": [3]}), target)
    monkeypatch.undo()
    assert pl.read_parquet(target).equals(old)
    assert [p.name for p in tmp_path.iterdir()] == ["items.parquet"]


def test_read_dataset_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope: no such directory; a dataset directory holds"):
        read_dataset(tmp_path / "nope")


def test_read_dataset_missing_file_names_it(tmp_path: Path) -> None:
    write_dataset(tmp_path, validate(_items(), _interactions(), _impressions()))
    (tmp_path / "interactions.parquet").unlink()
    with pytest.raises(DataError, match=r"interactions\.parquet: file missing; .*recsys import"):
        read_dataset(tmp_path)


def test_read_dataset_unreadable_or_mistyped_file_names_it(tmp_path: Path) -> None:
    write_dataset(tmp_path, validate(_items(), _interactions(), _impressions()))
    (tmp_path / "items.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"items\.parquet: cannot read as the canonical items"):
        read_dataset(tmp_path)
    pl.DataFrame({"item_id": ["a"]}).write_parquet(tmp_path / "items.parquet")
    with pytest.raises(DataError, match=r"missing required column\(s\) \['title'\]"):
        read_dataset(tmp_path)


def test_publish_version_flips_current_and_keeps_the_newest(tmp_path: Path) -> None:
    from recsys.io import publish_version

    root = tmp_path / "bundles"
    calls: list[str] = []

    def build(text: str):
        def fill(folder: Path) -> None:
            calls.append(text)
            (folder / "sub").mkdir()
            (folder / "sub" / "file.txt").write_text(text)

        return fill

    for name in ("v1", "v2", "v3"):
        out = publish_version(build(name), root, name, keep=2)
        assert out == root / name and (root / "current").resolve() == out.resolve()
        assert (root / "current" / "sub" / "file.txt").read_text() == name
    assert sorted(p.name for p in root.iterdir()) == ["current", "v2", "v3"]  # v1 pruned
    # the same name again is the same version: reused, not rebuilt; current moves back to it
    publish_version(build("other"), root, "v2", keep=2)
    assert calls == ["v1", "v2", "v3"] and (root / "current").resolve() == (root / "v2").resolve()

    # a failing build leaves no folder behind and current where it was
    def broken(folder: Path) -> None:
        (folder / "half").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        publish_version(broken, root, "v4", keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["current", "v2", "v3"]
    assert (root / "current").resolve() == (root / "v2").resolve()
