"""Ranking routes: POST /v1/rank and GET /v1/recommendations/{user_id}. Ranking runs on a
thread pool (at most RECSYS_RANK_THREADS at once), off the event loop."""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from recsys.errors import ConfigError
from serving.responses import ERROR_RESPONSES, error_response, json_response
from serving.rules import request_rules
from serving.schemas import RankRequest, RankResponse, RecommendationsResponse
from serving.state import ready_model, serving_state


async def rank(body: RankRequest, request: Request) -> Response:
    """Rank `candidates` (1 to 1,000 distinct ids) and return the top `k`.

    A user id is ranked with its profile (stored, or live with events; none for a user never
    seen), extended by `history`; a request without a user id with its `history`; with
    neither, by the popularity prior. With events on, features come from the live state as
    of `at` (default now) and the online ranker ranks; without events, or when the live state
    has heard no event for longer than its limit before that moment (a silent feed), the
    batch ranker ranks on features as of the cut-off (`at` is checked, nothing later counts).
    Candidates the bundle does not know but whose text is in `items` are embedded on the
    spot; unknown ones without text get the model's prior for an unseen item and are listed
    in `unknown_items`. `explain` adds each item's top feature contributions.
    """
    state = serving_state(request)
    model = ready_model(state)  # read the reference once: a reload cannot change it under us
    try:  # events keep the state fresh: as of `at`, default now (a stale one: batch)
        at_us = model.moment(body.at, events=state.events is not None)
    except ValueError as e:
        return error_response(422, str(e))
    if at_us is None and state.events is not None:  # the feed is silent: ranked as batch
        state.metrics.stale_rank()
    # Without events nothing after the cut-off is counted: the batch ranker on features as
    # of the cut-off, whatever `at` says (the online ranker on counts frozen at the
    # cut-off ranked EB-NeRD's next week worse than random: AUC 0.466).
    new = None
    if body.items and model.strategy(body.user_id, body.history) != "popularity":
        needed = set(body.candidates) | set(body.history)
        if any(i.item_id in needed and i.item_id not in model.vectors.index
               for i in body.items):  # fmt: skip
            new = await run_in_threadpool(model.embedder.embed, body.items, needed)
    try:  # features, LightGBM and explanations off the event loop (health stays live)
        return json_response(await state.compute(model.rank, body, new, at_us))
    except ConfigError as e:  # a rule names an unknown item or category
        return error_response(422, str(e))


async def recommendations(
    request: Request,
    user_id: str = PathParam(min_length=1, max_length=256),
    k: int = Query(10, ge=1, le=1000, description="list length"),
    exclude_items: Annotated[
        list[str] | None,
        Query(max_length=1000, description="never return these items (repeat the parameter)"),
    ] = None,
    exclude_categories: Annotated[
        list[str] | None,
        Query(max_length=100, description="never return items of these categories"),
    ] = None,
    max_per_category: int | None = Query(
        None, ge=0, le=1000, description="at most this many items per category (0 = no cap)"
    ),
    diversity: float | None = Query(
        None, ge=0.0, le=1.0, description="MMR weight (0 = pure relevance)"
    ),
) -> Response:
    """The user's nightly ranked list (top k), or popular items marked `fallback`. The
    bundle's business rules plus the request's (exclusions, a category cap, diversity)
    apply to either; a list they leave short is returned short, never padded."""
    state = serving_state(request)
    model = ready_model(state)
    asks = (exclude_items, exclude_categories, max_per_category, diversity)
    if all(a is None for a in asks):  # the list as the nightly made it
        return json_response(await state.compute(model.recommendations, user_id, k))
    try:
        rules = request_rules(
            model.rules, model.catalogue,
            exclude_items=exclude_items or (), exclude_categories=exclude_categories or (),
            max_per_category=max_per_category, diversity=diversity,
        )  # fmt: skip
    except ConfigError as e:
        return error_response(422, str(e))
    return json_response(await state.compute(model.recommendations, user_id, k, rules))


def add_routes(app: FastAPI) -> None:
    app.post("/v1/rank", response_model=RankResponse, response_model_exclude_none=True,
             responses=ERROR_RESPONSES, tags=["ranking"])(rank)  # fmt: skip
    app.get("/v1/recommendations/{user_id}", response_model=RecommendationsResponse,
            responses=ERROR_RESPONSES, tags=["ranking"])(recommendations)  # fmt: skip
