"""Import an event log (the API's `POST /v1/events`, `recsys.eventlog`) as canonical tables.

    import_events(LOG_DIR, base=DATASET_DIR)

Mapping (the one `features.live` counts by, so that tomorrow's training rows have the features
the API served):
  items         one row per item event's item_id, the latest (by ts, then log order) winning;
                with a base dataset, its items not in the events are kept.
  impressions   one row per item of each impression event: impression_id = request_id,
                position = its place in the list, clicked = a click event of the same user on
                that item names this request_id.
  interactions  one row per click event: user_id, item_id, ts, weight 1.0 (a click extends the
                history).
With `base`, its three tables come first (the catalogue and the earlier log); an impression id
that is already there is a duplicate and goes to the rejects, like any row that breaks a
contract (an item the catalogue does not know, ...). Events repeated under one event_id count
once.
"""

from __future__ import annotations

import os
from datetime import datetime

import polars as pl

from recsys.data import validate
from recsys.data.dataset import read_dataset
from recsys.data.schema import IMPRESSIONS, INTERACTIONS, ITEMS, TS, conform
from recsys.errors import DataError
from recsys.eventlog import PREFIX, SUFFIX, EventLog
from recsys.importers.base import ImportResult, require_dir

FIRST_SEGMENT = f"{PREFIX}{0:012d}{SUFFIX}"
LAYOUT = (
    f"the events format expects the API's event log folder (RECSYS_EVENT_LOG): {PREFIX}<n>"
    f"{SUFFIX} segments of JSON events, the first {FIRST_SEGMENT}"
)
_ITEM_FIELDS = ("item_id", "title", "description", "category", "subcategory", "published_at")


def import_events(
    src: str | os.PathLike[str], base: str | os.PathLike[str] | None = None
) -> ImportResult:
    """Read the event log folder `src` (read only) and validate it, on top of `base`.

    Raises `DataError` naming the folder or the first segment when it is missing."""
    d = require_dir(src, LAYOUT)
    log = EventLog(d, writer=False)
    if not log.segments():
        raise DataError(f"{d / FIRST_SEGMENT}: file missing; {LAYOUT}")
    seen: set[str] = set()
    items, shows, clicks = [], [], []
    n = 0
    for n, e in enumerate(log.read(), 1):
        event_id = str(e.get("event_id"))
        if event_id in seen:
            continue
        seen.add(event_id)
        kind = e.get("type")
        if kind == "item":
            items.append({k: e.get(k) for k in ("ts", *_ITEM_FIELDS)} | {"__seq": n})
        elif kind == "impression":
            for pos, item in enumerate(e.get("items", [])):
                shows.append({"impression_id": e["request_id"], "user_id": e["user_id"],
                              "ts": e["ts"], "item_id": item, "position": pos})  # fmt: skip
        elif kind == "click":
            clicks.append({"user_id": e["user_id"], "item_id": e["item_id"], "ts": e["ts"],
                           "request_id": e.get("request_id")})  # fmt: skip

    def frame(rows: list[dict[str, object]], schema: dict[str, pl.DataType]) -> pl.DataFrame:
        for row in rows:  # the API wrote these with datetime.isoformat, so they parse back
            for c in ("ts", "published_at"):
                if isinstance(row.get(c), str):
                    row[c] = datetime.fromisoformat(str(row[c]))
        return pl.DataFrame(rows, schema=schema)

    item_df = frame(items, {"ts": TS, **{k: pl.String() for k in _ITEM_FIELDS},
                            "published_at": TS, "__seq": pl.Int64()})  # fmt: skip
    item_df = item_df.sort("ts", "__seq").unique("item_id", keep="last", maintain_order=True)
    text = pl.String()
    shown = frame(shows, {"impression_id": text, "user_id": text, "ts": TS, "item_id": text,
                          "position": pl.Int64()})  # fmt: skip
    click_df = frame(clicks, {"user_id": text, "item_id": text, "ts": TS, "request_id": text})
    clicked = (
        click_df.filter(pl.col("request_id").is_not_null())
        .select(pl.col("request_id").alias("impression_id"), "user_id", "item_id")
        .unique()
        .with_columns(pl.lit(True).alias("clicked"))
    )
    shown = shown.join(clicked, on=["impression_id", "user_id", "item_id"], how="left")
    shown = shown.with_columns(pl.col("clicked").fill_null(False))
    tables = {
        ITEMS: conform(ITEMS, item_df),
        IMPRESSIONS: conform(IMPRESSIONS, shown),
        INTERACTIONS: conform(INTERACTIONS, click_df.with_columns(pl.lit(1.0).alias("weight"))),
    }
    if base is not None:
        prior = read_dataset(base)
        fresh = tables[ITEMS]["item_id"].implode()
        tables[ITEMS] = pl.concat([prior.items.filter(~pl.col("item_id").is_in(fresh)),
                                   tables[ITEMS]])  # fmt: skip
        tables[IMPRESSIONS] = pl.concat([prior.impressions, tables[IMPRESSIONS]])
        tables[INTERACTIONS] = pl.concat([prior.interactions, tables[INTERACTIONS]])
    validated = validate(tables[ITEMS], tables[INTERACTIONS], tables[IMPRESSIONS])
    stats: dict[str, int | float | str] = {
        "events_read": n,
        "events_repeated": n - len(seen),
        "item_events": len(items),
        "impression_events": len({s["impression_id"] for s in shows}),
        "click_events": len(clicks),
    }
    return ImportResult(validated, stats)
