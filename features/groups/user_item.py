"""The user with the candidate itself: how often it was shown to them, and how often it is in
their history."""

from __future__ import annotations

import numpy as np
import polars as pl

from features.config import FeatureConfig
from features.formulas import Raw, count_expr, count_np


class UserItem:
    def names(self, config: FeatureConfig) -> list[str]:
        return ["user_item_shows", "user_item_history"]

    def exprs(self, config: FeatureConfig) -> list[pl.Expr]:
        return [count_expr("user_item.shows"), count_expr("user_item.history")]

    def arrays(self, raw: Raw, config: FeatureConfig) -> list[np.ndarray]:
        return [count_np(raw, "user_item.shows"), count_np(raw, "user_item.history")]
