"""Ranked lists: retrieval from several sources, ranking through a bundle, business rules; and
their evaluation against what users consumed next, beside baseline lists.

The nightly job and `recsys evaluate` both build lists with `build_lists`, the same code, so the
list metrics measure what the nightly writes. For a fast catalogue (news: a live window of a week
or less) lists as of the cut-off are judged on the next day's consumption; for a slow one, on
the whole test split (`list_horizon`).
"""

from .build import (
    PRIOR_WEIGHTS,
    ListSettings,
    ListsResult,
    ScoreCache,
    block_users,
    build_lists,
    bundle_prior_weight,
    consumption,
    known_users,
    list_context,
    list_horizon,
    ranked_lists,
    retrieval_context,
    with_prior,
)
from .evaluate import (
    LIST_BASELINES,
    baseline_lists,
    evaluate_lists,
    fit_prior_weight,
    list_evaluation,
    truth_after,
)

__all__ = [
    "LIST_BASELINES",
    "PRIOR_WEIGHTS",
    "ListSettings",
    "ListsResult",
    "ScoreCache",
    "baseline_lists",
    "block_users",
    "build_lists",
    "bundle_prior_weight",
    "consumption",
    "evaluate_lists",
    "fit_prior_weight",
    "known_users",
    "list_context",
    "list_evaluation",
    "list_horizon",
    "ranked_lists",
    "retrieval_context",
    "truth_after",
    "with_prior",
]
