"""Request and response models of the ranking API (the OpenAPI schema at /docs comes from here).

Requests are strict: unknown fields, wrong JSON types (a string for `k`, a number for an item id)
and out-of-range values are rejected with a message naming the field; nothing is coerced.
Responses are separate models so the wire format of answers is documented and tested on its own.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    model_validator,
)

MAX_CANDIDATES = 1000
MAX_HISTORY = 1000
MAX_NEW_ITEMS = 100  # items embedded per request (the int8 encoder costs ~ms per item)
MAX_K = 1000
MAX_EXCLUDED_CATEGORIES = 100
MAX_EVENTS = 1000
EXPLAIN_TOP = 5

ItemId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Text = Annotated[str, StringConstraints(max_length=10_000)]

_STRICT = ConfigDict(extra="forbid", strict=True)


def _duplicates(values: list[str]) -> list[str]:
    seen: set[str] = set()
    dup: dict[str, None] = {}
    for v in values:
        if v in seen:
            dup[v] = None
        seen.add(v)
    return list(dup)


class ItemText(BaseModel):
    """Text of an item the bundle may not know; embedded on the spot when it does not."""

    model_config = _STRICT

    item_id: ItemId
    title: Annotated[str, StringConstraints(min_length=1, max_length=2_000)]
    description: Text | None = None
    category: Annotated[str, StringConstraints(max_length=256)] | None = None
    subcategory: Annotated[str, StringConstraints(max_length=256)] | None = None


class RankRequest(BaseModel):
    """Candidates to rank for a user (stored profile), a history, both, or neither (cold start)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "user_id": "u1",
                    "history": ["i3"],
                    "candidates": ["i1", "i2", "new-1"],
                    "k": 2,
                    "explain": True,
                    "items": [{"item_id": "new-1", "title": "A telescope finds a comet"}],
                }
            ]
        },
    )

    user_id: ItemId | None = Field(
        default=None,
        description="a user id; a user the bundle knows is ranked with their stored profile",
    )
    history: list[ItemId] = Field(
        default_factory=list,
        max_length=MAX_HISTORY,
        description="item ids the user consumed, most recent last; they extend the stored profile",
    )
    candidates: list[ItemId] = Field(
        min_length=1,
        max_length=MAX_CANDIDATES,
        description=f"distinct item ids to rank (1 to {MAX_CANDIDATES})",
    )
    k: int | None = Field(
        default=None, ge=1, le=MAX_K, description="how many to return (default: all candidates)"
    )
    explain: bool = Field(
        default=False,
        description=f"add each returned item's top {EXPLAIN_TOP} feature contributions",
    )
    items: list[ItemText] = Field(
        default_factory=list,
        max_length=MAX_NEW_ITEMS,
        description="text of candidates (or history items) the bundle may not know",
    )
    exclude_items: list[ItemId] = Field(
        default_factory=list,
        max_length=MAX_CANDIDATES,
        description="never return these items (added to the bundle's rules)",
    )
    exclude_categories: list[Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=list,
        max_length=MAX_EXCLUDED_CATEGORIES,
        description="never return items of these categories (added to the bundle's rules)",
    )
    max_per_category: int | None = Field(
        default=None, ge=0, le=MAX_K, description="at most this many items per category; 0 = no cap"
    )
    at: AwareDatetime | None = Field(
        default=None,
        strict=False,  # an ISO 8601 string in JSON (strict mode would want a datetime object)
        description="the moment the features describe (ISO 8601 with a time zone, at or after "
        "the cut-off; default now) when the server takes events; without events features are "
        "as of the cut-off and the batch ranker ranks (nothing later is counted)",
    )
    diversity: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="MMR weight: 0 = pure relevance, higher trades score for dissimilar items",
    )

    @model_validator(mode="after")
    def _distinct(self) -> RankRequest:
        dup = _duplicates(self.candidates)
        if dup:
            raise ValueError(
                f"candidates must be distinct; repeated: {dup[:10]}; send each item id once"
            )
        dup = _duplicates([i.item_id for i in self.items])
        if dup:
            raise ValueError(f"items must have distinct item_id; repeated: {dup[:10]}")
        return self


# ------------------------------------------------------------------ events

_Category = Annotated[str, StringConstraints(max_length=256)]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    event_id: Annotated[str, StringConstraints(min_length=1, max_length=256)] = Field(
        description="unique per event: a repeated id is counted once"
    )
    ts: datetime = Field(description="when it happened (ISO 8601; without a zone: UTC)")

    @model_validator(mode="after")
    def _utc(self) -> _Event:
        for name in ("ts", "published_at"):
            # the field's value, or None for a type without it: getattr on a missing field goes
            # through pydantic's __getattr__ and an AttributeError, measured at 14% of the CPU
            # of ingesting events (bench_api's ingestion table)
            value = self.__dict__.get(name)
            if isinstance(value, datetime):
                fixed = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
                object.__setattr__(self, name, fixed)
        return self


class ItemEvent(_Event):
    """A new or changed item: embedded with the bundle's encoder, it joins the live catalogue."""

    type: Literal["item"]
    item_id: ItemId
    title: Annotated[str, StringConstraints(min_length=1, max_length=2_000)]
    description: Text | None = None
    category: _Category | None = None
    subcategory: _Category | None = None
    published_at: datetime | None = None


class ImpressionEvent(_Event):
    """A shown list, in order (request_id: the list's id, which clicks refer to)."""

    type: Literal["impression"]
    user_id: ItemId
    request_id: ItemId
    items: list[ItemId] = Field(min_length=1, max_length=MAX_CANDIDATES)

    @model_validator(mode="after")
    def _distinct(self) -> ImpressionEvent:
        dup = _duplicates(self.items)
        if dup:
            raise ValueError(f"items must be distinct; repeated: {dup[:10]}")
        return self


class ClickEvent(_Event):
    """A click; it also extends the user's history. With the request_id of an impression that
    showed the item, it is that shown row's click."""

    type: Literal["click"]
    user_id: ItemId
    item_id: ItemId
    request_id: ItemId | None = None


Event = Annotated[ItemEvent | ImpressionEvent | ClickEvent, Field(discriminator="type")]
EVENT = TypeAdapter(Event)


class EventsRequest(BaseModel):
    """Up to 1,000 events. Each is checked on its own: bad ones are rejected with a reason and
    the others are accepted."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "events": [
                        {"event_id": "e1", "type": "item", "ts": "2026-12-01T08:00:00Z",
                         "item_id": "n9", "title": "Comet seen", "category": "science"},
                        {"event_id": "e2", "type": "impression", "ts": "2026-12-01T08:01:00Z",
                         "user_id": "u1", "request_id": "r1", "items": ["n9", "n3"]},
                        {"event_id": "e3", "type": "click", "ts": "2026-12-01T08:01:09Z",
                         "user_id": "u1", "item_id": "n9", "request_id": "r1"},
                    ]
                }
            ]
        },
    )  # fmt: skip

    events: list[Event] = Field(max_length=MAX_EVENTS)


class Rejected(BaseModel):
    index: int = Field(description="position of the event in the request's list")
    reason: str


class EventsResponse(BaseModel):
    accepted: int = Field(description="events written to the event log and applied")
    duplicates: int = Field(description="events whose event_id was seen before (not counted)")
    rejected: list[Rejected]


class Contribution(BaseModel):
    feature: str
    value: float | None = Field(description="the feature's value (null: missing)")
    contribution: float = Field(description="its additive share of the score (SHAP-style)")


class RankedItem(BaseModel):
    item_id: str
    score: float
    rank: int
    explanation: list[Contribution] | None = None


Strategy = Literal["profile", "history", "profile+history", "popularity"]


class RankResponse(BaseModel):
    model_version: str
    strategy: Strategy = Field(
        description="profile: the stored user; history: the given history; popularity: neither"
    )
    items: list[RankedItem]
    unknown_items: list[str] = Field(
        description="candidates the bundle does not know and that came without text"
    )


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    rank: int


class RecommendationsResponse(BaseModel):
    """A user's list; with rules (exclusions, category cap) it may hold fewer than k items."""

    model_version: str
    user_id: str
    fallback: bool = Field(description="true: no nightly list for this user; popular items")
    generated_at: str | None = Field(default=None, description="when the nightly list was made")
    items: list[RecommendedItem]


class ReloadRequest(BaseModel):
    """Where to load the new bundle from; empty = the source the server started with."""

    model_config = _STRICT

    bundle: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None
    model_uri: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ReloadRequest:
        if self.bundle is not None and self.model_uri is not None:
            raise ValueError("give bundle or model_uri, not both")
        return self


class ReloadResponse(BaseModel):
    model_version: str
    previous_model_version: str | None
    source: str
    seconds: float
    workers_follow: bool = Field(
        description="true: other worker processes load the same source within a few seconds"
    )


class ErrorDetail(BaseModel):
    loc: str
    msg: str


class ErrorResponse(BaseModel):
    error: str
    detail: list[ErrorDetail] = Field(default_factory=list)


class Health(BaseModel):
    status: str
    model_version: str | None = None
    ranker: str | None = Field(default=None, description="the ranker /v1/rank uses")
    freshness: str | None = Field(
        default=None, description="the features it reads: the live state (events) or batch"
    )
    live: str | None = Field(
        default=None,
        description="the shared live state (Redis): in step, or stale and why (absent in process)",
    )
    stale: bool | None = Field(
        default=None,
        description="with events: the live state heard no impression or click for longer than "
        "max_event_lag_s before the latest moment asked, so /v1/rank ranks as the batch path",
    )
    last_event: datetime | None = Field(
        default=None, description="with events: the newest impression or click (or the cut-off)"
    )
    stale_since: datetime | None = Field(
        default=None, description="when stale: the moment the silence passed the limit"
    )
    max_event_lag_s: float | None = Field(
        default=None, description="with events: the limit of silence (absent: never stale)"
    )
    detail: str | None = None
