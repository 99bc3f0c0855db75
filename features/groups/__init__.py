"""The behavioural feature groups. Each group is one module that owns its feature names and
both of its evaluations side by side: polars expressions over the raw columns (training rows,
batch frames, snapshots) and the numpy twin for one request or the live state. Adding a feature
to a group is a change to that group's module only.

Raw columns (nullable; a null count means no event), named "<table>.<stat>" after the snapshot
tables (see `features.derive`):
    AT                                   moment the features describe (Datetime UTC)
    items.{shows,clicks,interactions}_{w} per window w; items.last_click_at, items.first_seen_at,
    items.published_at, items.category, items.subcategory
    users.{shows,clicks,history}
    user_category.{shows,clicks,history}, user_subcategory.{shows,clicks,history}
    user_item.{shows,history}
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import polars as pl

from features.config import FeatureConfig
from features.events import GROUPS as CATEGORY_LEVELS
from features.formulas import Raw
from features.groups.item_counts import ItemCounts
from features.groups.user_category import UserCategory
from features.groups.user_counts import UserCounts
from features.groups.user_item import UserItem

__all__ = ["GROUPS", "ITEM_GROUPS", "USER_GROUPS", "FeatureGroup"]


class FeatureGroup(Protocol):
    """One group of features: its names, and the same values from polars and from numpy."""

    def names(self, config: FeatureConfig) -> list[str]:
        """The group's feature columns, in order."""
        ...

    def exprs(self, config: FeatureConfig) -> list[pl.Expr]:
        """One polars expression per name over the raw columns (null where undefined)."""
        ...

    def arrays(self, raw: Raw, config: FeatureConfig) -> list[np.ndarray]:
        """The numpy twin of `exprs`: one (n,) float64 array per name, NaN where undefined."""
        ...


# the candidate item's own features (they depend on the item and the moment only)
ITEM_GROUPS: tuple[FeatureGroup, ...] = (ItemCounts(),)
# the user's features (and the user's with the candidate's category and with the candidate)
USER_GROUPS: tuple[FeatureGroup, ...] = (
    UserCounts(),
    *(UserCategory(level) for level in CATEGORY_LEVELS),
    UserItem(),
)
GROUPS = ITEM_GROUPS + USER_GROUPS
