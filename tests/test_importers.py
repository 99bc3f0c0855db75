"""Importers: hand-made samples of each source layout, with malformed rows, and known counts."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from recsys.data import SCHEMAS, read_dataset, read_rejects, validate, write_dataset
from recsys.errors import ConfigError, DataError
from recsys.importers import FORMATS, ImportResult, import_source


def _write(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _rejects(result: ImportResult, tmp_path: Path) -> list[tuple[str, int, str]]:
    """Write the dataset as the CLI does; return the rejects file as (table, row, reason)."""
    out = tmp_path / "out"
    manifest = write_dataset(out, result.validated, source={"test": True})
    rejects = read_rejects(out)
    assert manifest["rejects"] == rejects.height
    return rejects.sort("table", "row").select("table", "row", "reason").rows()


def _assert_canonical(result: ImportResult) -> None:
    for t in ("items", "interactions", "impressions"):
        assert getattr(result.validated, t).schema == SCHEMAS[t]


# --- MIND ---------------------------------------------------------------------------------------

NEWS = [
    "N1\tnews\tpolitics\tTitle one\tAbstract one\thttps://a/1\t[]\t[]",
    "N2\tsports\tfootball\tTitle two\t\thttps://a/2\t[]\t[]",  # empty abstract
    "N3\tnews\tworld\tTitle three\tAbstract three\thttps://a/3\t[]\t[]",
    "N4\tnews\tworld\t\tAbstract four\thttps://a/4\t[]\t[]",  # no title
    "N5\tnews\tworld\tT5\tA5\thttps://a/5\t[]\t[]\tsurplus",  # ragged
    "N1\tnews\tpolitics\tTitle one again\tA\thttps://a/1\t[]\t[]",  # duplicate id
]
BEHAVIORS = [
    "1\tU1\t11/15/2019 8:55:22 AM\tN1 N2\tN3-1 N1-0",
    "2\tU1\t11/15/2019 9:00:00 PM\tN1 N2\tN2-0 N3-1 N9-0",  # N9 not in the catalogue
    "3\tU2\tnot a time\tN2 N3\tN1-1",
    "4\tU2\t11/16/2019 1:02:03 AM\tN2 N3 N1\tN1 N2-1",  # N1 has no label
    "5\tU3\t11/16/2019 1:02:03 AM\t\tN3-0\tsurplus",  # ragged
    "6\t\t11/16/2019 1:02:03 AM\tN1\tN1-1",  # no user
    "7\tU4\t11/16/2019 10:00:00 AM\tN7\t",  # nothing shown; N7 not in the catalogue
    "8\tU4\t11/17/2019 10:00:00 AM\tN7\tN1-0  N1-1",  # N1 shown twice
]


def _mind(tmp_path: Path) -> Path:
    d = tmp_path / "mind"
    _write(d / "news.tsv", NEWS)
    _write(d / "behaviors.tsv", BEHAVIORS)
    return d


def test_mind_counts_and_tables(tmp_path: Path) -> None:
    r = import_source("mind", _mind(tmp_path))
    v = r.validated
    _assert_canonical(r)

    assert v.items.select("item_id", "title", "description", "category", "subcategory").rows() == [
        ("N1", "Title one", "Abstract one", "news", "politics"),
        ("N2", "Title two", None, "sports", "football"),
        ("N3", "Title three", "Abstract three", "news", "world"),
    ]
    assert v.items["published_at"].null_count() == 3

    # History: 11 ids on rows that were not rejected whole; 6 distinct (user, item) pairs, of
    # which (U4, N7) names an unknown item. Then the clicks: (U1, N3) at row 1 (its second
    # click, row 2, is the same pair), U2's click on N2 is already in U2's history (earlier),
    # and (U4, N1) at row 8, where N1 is shown twice and clicked once.
    assert v.interactions.select("user_id", "item_id").rows() == [
        ("U1", "N1"),
        ("U1", "N2"),
        ("U1", "N3"),
        ("U2", "N2"),
        ("U2", "N3"),
        ("U2", "N1"),
        ("U4", "N1"),
    ]
    # Each history item is dated just before the earliest readable row whose history lists it,
    # a click at its row's time.
    just_before = timedelta(microseconds=1)
    u1 = datetime(2019, 11, 15, 8, 55, 22, tzinfo=UTC) - just_before
    u2 = datetime(2019, 11, 16, 1, 2, 3, tzinfo=UTC) - just_before  # row 3's time is unreadable
    click1 = datetime(2019, 11, 15, 8, 55, 22, tzinfo=UTC)
    click8 = datetime(2019, 11, 17, 10, 0, 0, tzinfo=UTC)
    assert v.interactions["ts"].to_list() == [u1, u1, click1, u2, u2, u2, click8]
    assert v.interactions["weight"].to_list() == [1.0] * 7
    assert r.stats["click_interactions"] == 2
    assert r.stats["history_ids"] == 11
    assert r.stats["history_rows_deduplicated"] == 5
    assert r.stats["behavior_rows"] == 8
    assert r.stats["news_rows"] == 6

    imp = v.impressions.select("impression_id", "user_id", "item_id", "clicked", "position")
    assert imp.rows() == [
        ("1", "U1", "N3", True, 0),
        ("1", "U1", "N1", False, 1),
        ("2", "U1", "N2", False, 0),
        ("2", "U1", "N3", True, 1),
        ("4", "U2", "N2", True, 1),
        ("8", "U4", "N1", False, 0),
    ]
    assert v.impressions["ts"].to_list()[:3] == [
        datetime(2019, 11, 15, 8, 55, 22, tzinfo=UTC),
        datetime(2019, 11, 15, 8, 55, 22, tzinfo=UTC),
        datetime(2019, 11, 15, 21, 0, 0, tzinfo=UTC),
    ]


def test_mind_growing_history_never_reaches_back_in_time(tmp_path: Path) -> None:
    """EB-NeRD's week-2 rows list week-1 clicks in their history: those clicks must not count
    before the week-1 impression that recorded them (a label leak for ranker and fine-tune).
    The click itself is an interaction at its row's time (features count strictly before a
    row's time, so row 1 never sees it), not a week later where week 2 lists it."""
    d = tmp_path / "mind"
    _write(d / "news.tsv", NEWS[:3])
    _write(
        d / "behaviors.tsv",
        [
            "1\tU1\t11/15/2019 8:00:00 AM\tN1\tN2-1 N3-0",
            "2\tU1\t11/22/2019 8:00:00 AM\tN1 N2\tN3-1",  # history now holds row 1's click
        ],
    )
    inter = import_source("mind", d).validated.interactions
    ts = dict(zip(inter["item_id"].to_list(), inter["ts"].to_list(), strict=True))
    first = datetime(2019, 11, 15, 8, 0, tzinfo=UTC)
    assert ts["N1"] < first
    assert ts["N2"] == first  # the week-1 click N2 counts from its click, never before row 1
    assert ts["N3"] == datetime(2019, 11, 22, 8, 0, tzinfo=UTC)  # row 2's click
    assert inter.height == 3


def test_mind_static_histories_predate_the_whole_log(tmp_path: Path) -> None:
    """MIND's histories are the clicks of the weeks before the log, the same on every row of a
    user: every item is dated before the log's first row, so a user first seen after a cut-off
    has a history at the cut-off (as the API's requests carry it). One user whose history
    changes (EB-NeRD's growing histories) keeps the earliest-row rule for everyone (the test
    above)."""
    d = tmp_path / "mind"
    _write(d / "news.tsv", NEWS[:3])
    _write(
        d / "behaviors.tsv",
        [
            "1\tU1\t11/15/2019 8:00:00 AM\tN1\tN2-1 N3-0",
            "2\tU1\t11/16/2019 8:00:00 AM\tN1\tN3-1",  # the same history again
            "3\tU2\t11/20/2019 9:30:00 AM\tN2 N3\tN1-1",  # first seen on the last day
            "4\tU3\t11/20/2019 9:40:00 AM\t\tN1-0",  # no history
        ],
    )
    r = import_source("mind", d)
    inter = r.validated.interactions
    start = datetime(2019, 11, 15, 8, 0, tzinfo=UTC) - timedelta(microseconds=1)
    day = datetime(2019, 11, 15, 8, 0, tzinfo=UTC)
    assert sorted(inter.select("user_id", "item_id", "ts").rows()) == [
        ("U1", "N1", start),
        ("U1", "N2", day),  # the clicks, at their rows' times
        ("U1", "N3", day + timedelta(days=1)),
        ("U2", "N1", datetime(2019, 11, 20, 9, 30, tzinfo=UTC)),
        ("U2", "N2", start),
        ("U2", "N3", start),
    ]
    assert r.stats["history_dating"] == "before the log"
    grown = import_source("mind", _mind(tmp_path))  # U2's history grows between its rows
    assert grown.stats["history_dating"] == "before the earliest row listing it"


def test_mind_malformed_rows_land_in_rejects_with_reasons(tmp_path: Path) -> None:
    r = import_source("mind", _mind(tmp_path))
    assert _rejects(r, tmp_path) == [
        ("impressions", 1, "unknown item_id"),
        ("impressions", 2, "unparseable time"),
        ("impressions", 3, "impression without click label"),
        ("impressions", 4, "more than 5 tab-separated fields"),
        ("impressions", 5, "null required field: user_id"),
        ("impressions", 6, "empty impression list"),
        ("impressions", 7, "duplicate impression_id+item_id"),
        ("interactions", 6, "unknown item_id"),
        ("items", 3, "null required field: title"),
        ("items", 4, "more than 8 tab-separated fields"),
        ("items", 5, "duplicate item_id"),
    ]
    records = {
        (t, row): json.loads(rec)
        for t, row, rec in r.validated.rejects.select("table", "row", "record").rows()
    }
    assert records[("impressions", 2)]["time"] == "not a time"
    assert records[("impressions", 3)] | {"ts": None} == {
        "impression_id": "4",
        "user_id": "U2",
        "ts": None,
        "token": "N1",
        "position": 0,
    }
    assert records[("items", 4)]["__extra"] == "surplus"


def test_mind_empty_files_give_empty_tables(tmp_path: Path) -> None:
    d = tmp_path / "mind"
    d.mkdir()
    (d / "news.tsv").write_text("")
    (d / "behaviors.tsv").write_text("")
    r = import_source("mind", d)
    assert r.validated.counts()["items"] == {"kept": 0, "rejected": 0}
    _assert_canonical(r)


def test_mind_crlf_line_endings(tmp_path: Path) -> None:
    d = tmp_path / "mind"
    d.mkdir()
    (d / "news.tsv").write_bytes(b"N1\tc\ts\tT\tA\tu\t[]\t[]\r\n")
    (d / "behaviors.tsv").write_bytes(b"1\tU1\t11/15/2019 8:55:22 AM\tN1\tN1-1\r\n")
    v = import_source("mind", d).validated
    assert v.impressions.select("item_id", "clicked").rows() == [("N1", True)]
    assert v.rejects.height == 0


# --- MovieLens ----------------------------------------------------------------------------------

MOVIES = [
    "movieId,title,genres,tmdb_id,overview",
    '1,Toy Story (1995),Adventure|Animation|Children,862.0,"Toys, alive. ""Buzz"" lands."',
    "2,Heat (1995),Action|Crime,949.0,",
    '3,Untitled Thing,(no genres listed),,"A film',
    'over two lines"',
    "x7,Bad Id (2000),Drama,1.0,Overview",
    "4,,Drama,2.0,No title",
    "5,Extra (2001),Drama,3.0,ok,surplus",
    "1,Toy Story again (1995),Comedy,862.0,dup",
]
RATINGS = [
    "userId,movieId,rating,timestamp",
    "1,1,4.0,964982703",
    "1,2,3.5,964982704",
    "1,3,5,964982705",
    "2,1,abc,964982706",
    "2,2,4.5,yesterday",
    "2,99,4.0,964982707",
    "2,1,4.0,964982708,9",
    ",2,4.0,964982709",
    "2,3,0.5,964982710",
    "2,02,4.0,964982711",
]


def _movielens(tmp_path: Path) -> Path:
    d = tmp_path / "ml"
    _write(d / "movies_with_overview.csv", MOVIES)
    _write(d / "ratings.csv", RATINGS)
    return d


def test_movielens_counts_and_tables(tmp_path: Path) -> None:
    r = import_source("movielens", _movielens(tmp_path))
    v = r.validated
    _assert_canonical(r)
    assert v.items.rows() == [
        (
            "1",
            "Toy Story (1995)",
            'Toys, alive. "Buzz" lands.',
            "Adventure",
            "Adventure|Animation|Children",
            datetime(1995, 1, 1, tzinfo=UTC),
        ),
        ("2", "Heat (1995)", None, "Action", "Action|Crime", datetime(1995, 1, 1, tzinfo=UTC)),
        ("3", "Untitled Thing", "A film\nover two lines", None, None, None),
    ]
    assert v.interactions.rows() == [
        ("1", "1", datetime.fromtimestamp(964982703, UTC), 1.0),
        ("1", "3", datetime.fromtimestamp(964982705, UTC), 1.0),
        ("2", "2", datetime.fromtimestamp(964982711, UTC), 1.0),
    ]
    assert v.impressions.height == 0
    assert r.stats["ratings_below_threshold"] == 2
    assert r.stats["rating_rows"] == 10
    assert r.stats["movie_rows"] == 7


def test_movielens_malformed_rows_land_in_rejects_with_reasons(tmp_path: Path) -> None:
    r = import_source("movielens", _movielens(tmp_path))
    assert _rejects(r, tmp_path) == [
        ("interactions", 3, "unparseable rating"),
        ("interactions", 4, "unparseable timestamp"),
        ("interactions", 5, "unknown item_id"),
        ("interactions", 6, "more fields than the header names"),
        ("interactions", 7, "null required field: user_id"),
        ("items", 3, "unparseable movieId"),
        ("items", 4, "null required field: title"),
        ("items", 5, "more fields than the header names"),
        ("items", 6, "duplicate item_id"),
    ]
    rec = r.validated.rejects.filter(pl.col("reason") == "unparseable rating")["record"].item()
    assert json.loads(rec) == {
        "userId": "2",
        "movieId": "1",
        "rating": "abc",
        "timestamp": "964982706",
    }


def test_movielens_min_rating_is_configurable(tmp_path: Path) -> None:
    r = import_source("movielens", _movielens(tmp_path), min_rating=3.0)
    assert r.validated.interactions.height == 4
    assert r.stats["ratings_below_threshold"] == 1
    assert r.stats["min_rating"] == 3.0
    with pytest.raises(ConfigError, match="min_rating: must be a finite number"):
        import_source("movielens", _movielens(tmp_path), min_rating=float("nan"))


def test_movielens_header_without_a_column_is_a_data_error(tmp_path: Path) -> None:
    d = _movielens(tmp_path)
    _write(d / "ratings.csv", ["userId,movieId,score,timestamp", "1,1,4.0,964982703"])
    with pytest.raises(DataError, match=r"ratings\.csv: header lacks column\(s\) rating"):
        import_source("movielens", d)


def test_movielens_unterminated_quote_is_a_data_error_naming_the_file(tmp_path: Path) -> None:
    """A stray quote makes the rest of the file one field: no row boundary can be trusted."""
    d = _movielens(tmp_path)
    _write(d / "movies_with_overview.csv", [*MOVIES[:2], '9,"Broken (2001),Drama,1.0,ok'])
    with pytest.raises(DataError, match=r"movies_with_overview\.csv: cannot read \(.*escaped"):
        import_source("movielens", d)


# --- H&M ----------------------------------------------------------------------------------------


def _hm(tmp_path: Path, *, article_ids: pl.Series, t_dat: pl.Series) -> Path:
    d = tmp_path / "hm"
    d.mkdir(parents=True)
    pl.DataFrame(
        {
            "article_id": article_ids,
            "product_code": [108775, 108775, 200000],
            "prod_name": ["Strap top", "Strap top (1)", " "],
            "product_type_name": ["Vest top", "Vest top", "Sock"],
            "product_group_name": ["Garment Upper body", "Garment Upper body", "Socks"],
            "detail_desc": ["Jersey top", None, "Socks"],
        }
    ).write_parquet(d / "articles.parquet")
    pl.DataFrame(
        {
            "t_dat": t_dat,
            "customer_id": ["c1", "c2", "c1", "c3"],
            "article_id": ["108775015", "108775044", "108775015", "999"],
            "price": [0.05, 0.03, 0.05, 0.01],
            "sales_channel_id": [2, 1, 2, 2],
        }
    ).write_parquet(d / "transactions.parquet")
    return d


@pytest.mark.parametrize(
    "article_ids",
    [
        pl.Series([108775015, 108775044, 200000001], dtype=pl.Int64),
        pl.Series(["0108775015", "0108775044", "0200000001"]),
    ],
    ids=["int-ids", "padded-string-ids"],
)
def test_hm_counts_tables_and_rejects(tmp_path: Path, article_ids: pl.Series) -> None:
    t_dat = pl.Series(["2020-09-16", "2020-09-17", "16/09/2020", "2020-09-18"])
    r = import_source("hm", _hm(tmp_path, article_ids=article_ids, t_dat=t_dat))
    v = r.validated
    _assert_canonical(r)
    assert v.items.rows() == [
        ("0108775015", "Strap top", "Jersey top", "Garment Upper body", "Vest top", None),
        ("0108775044", "Strap top (1)", None, "Garment Upper body", "Vest top", None),
    ]
    assert v.interactions.rows() == [
        ("c1", "0108775015", datetime(2020, 9, 16, tzinfo=UTC), 1.0),
        ("c2", "0108775044", datetime(2020, 9, 17, tzinfo=UTC), 1.0),
    ]
    assert v.impressions.height == 0
    assert r.stats == {"article_rows": 3, "transaction_rows": 4}
    assert _rejects(r, tmp_path) == [
        ("interactions", 2, "unparseable t_dat"),
        ("interactions", 3, "unknown item_id"),
        ("items", 2, "null required field: title"),
    ]


def test_hm_reads_dates_and_datetimes(tmp_path: Path) -> None:
    ids = pl.Series([108775015, 108775044, 200000001])
    days = [date(2020, 9, 16), date(2020, 9, 17), None, date(2020, 9, 18)]
    r = import_source("hm", _hm(tmp_path / "d", article_ids=ids, t_dat=pl.Series(days)))
    assert r.validated.interactions["ts"].to_list() == [
        datetime(2020, 9, 16, tzinfo=UTC),
        datetime(2020, 9, 17, tzinfo=UTC),
    ]
    assert ("interactions", 2, "unparseable t_dat") in _rejects(r, tmp_path / "d")

    stamps = pl.Series([datetime(2020, 9, 16, d) for d in range(4)])
    r = import_source("hm", _hm(tmp_path / "dt", article_ids=ids, t_dat=stamps))
    assert r.validated.interactions["ts"].to_list() == [
        datetime(2020, 9, 16, 0, tzinfo=UTC),
        datetime(2020, 9, 16, 1, tzinfo=UTC),
        datetime(2020, 9, 16, 2, tzinfo=UTC),
    ]


def test_hm_missing_column_names_file_and_column(tmp_path: Path) -> None:
    d = _hm_default(tmp_path)
    pl.read_parquet(d / "articles.parquet").drop("detail_desc").write_parquet(
        d / "articles.parquet"
    )
    with pytest.raises(DataError, match=r"articles\.parquet: missing column\(s\) detail_desc"):
        import_source("hm", d)


# --- canonical Parquet --------------------------------------------------------------------------


def _canonical(tmp_path: Path) -> Path:
    t0 = datetime(2024, 3, 1, tzinfo=UTC)
    items = pl.DataFrame({"item_id": ["a", "b"], "title": ["A", "B"]})
    inter = pl.DataFrame({"user_id": ["u"], "item_id": ["a"], "ts": [t0], "weight": [1.0]})
    imp = pl.DataFrame(
        {
            "impression_id": ["1", "1"],
            "user_id": ["u", "u"],
            "ts": [t0, t0],
            "item_id": ["a", "b"],
            "clicked": [True, False],
            "position": [0, 1],
        }
    )
    write_dataset(tmp_path / "ds", validate(items, inter, imp))
    return tmp_path / "ds"


def test_parquet_round_trip_revalidates(tmp_path: Path) -> None:
    d = _canonical(tmp_path)
    r = import_source("parquet", d)
    ds = read_dataset(d)
    assert r.validated.items.equals(ds.items)
    assert r.validated.interactions.equals(ds.interactions)
    assert r.validated.impressions.equals(ds.impressions)
    assert r.validated.rejects.height == 0
    assert r.stats == {"items_rows": 2, "interactions_rows": 1, "impressions_rows": 2}


def test_parquet_bad_values_land_in_rejects(tmp_path: Path) -> None:
    d = _canonical(tmp_path)
    pl.DataFrame(
        {
            "impression_id": ["1", "1", "2", "3"],
            "user_id": ["u", "u", "u", "u"],
            "ts": [
                "2024-03-01T00:00:00Z",
                "2024-03-01T00:00:00Z",
                "someday",
                "2024-03-02T00:00:00Z",
            ],
            "item_id": ["a", "b", "a", "z"],
            "clicked": [True, False, True, False],
            "position": ["0", "x", "0", "0"],
            "extra": [1, 2, 3, 4],
        }
    ).write_parquet(d / "impressions.parquet")
    r = import_source("parquet", d)
    assert r.validated.impressions.select("impression_id", "item_id", "position").rows() == [
        ("1", "a", 0)
    ]
    assert _rejects(r, tmp_path) == [
        ("impressions", 1, "unparseable position"),
        ("impressions", 2, "unparseable ts"),
        ("impressions", 3, "unknown item_id"),
    ]


def test_parquet_uncastable_column_is_a_data_error(tmp_path: Path) -> None:
    d = _canonical(tmp_path)
    pl.DataFrame({"item_id": [["a"]], "title": ["A"]}).write_parquet(d / "items.parquet")
    with pytest.raises(DataError, match=r"items\.parquet: column item_id has type List"):
        import_source("parquet", d)


# --- errors common to every format --------------------------------------------------------------

FIRST_FILE = {
    "mind": "news.tsv",
    "movielens": "movies_with_overview.csv",
    "hm": "articles.parquet",
    "parquet": "items.parquet",
    "events": "events-000000000000.jsonl",
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_folder_and_file_errors_name_them(tmp_path: Path, fmt: str) -> None:
    with pytest.raises(DataError, match=rf"nowhere: no such directory; the {fmt} format expects"):
        import_source(fmt, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        import_source(fmt, tmp_path / "empty")
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "empty" / FIRST_FILE[fmt]) + ": file missing; ")
    assert f"the {fmt} format expects" in msg
    assert "\n" not in msg


def _hm_default(tmp_path: Path) -> Path:
    ids = pl.Series([108775015, 108775044, 200000001])
    return _hm(tmp_path, article_ids=ids, t_dat=pl.Series(["2020-09-16"] * 4))


@pytest.mark.parametrize(
    ("fmt", "make", "missing"),
    [
        ("mind", _mind, "behaviors.tsv"),
        ("movielens", _movielens, "ratings.csv"),
        ("hm", _hm_default, "transactions.parquet"),
        ("parquet", _canonical, "impressions.parquet"),
    ],
)
def test_second_file_missing_is_named(
    tmp_path: Path, fmt: str, make: Callable[[Path], Path], missing: str
) -> None:
    d = make(tmp_path)
    (d / missing).unlink()
    with pytest.raises(DataError, match=re.escape(f"{d / missing}: file missing; ")):
        import_source(fmt, d)


def test_unreadable_file_is_a_data_error_naming_it(tmp_path: Path) -> None:
    d = _hm_default(tmp_path)
    (d / "transactions.parquet").write_bytes(b"definitely not parquet")
    with pytest.raises(DataError, match=r"transactions\.parquet: cannot read as Parquet \(.*\); "):
        import_source("hm", d)


def test_unknown_format_lists_the_formats(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match="unknown import format 'csv'; choose one of mind, movielens"
    ):
        import_source("csv", tmp_path)
