"""User counts: the user's shows, clicks, smoothed CTR and history length."""

from __future__ import annotations

import numpy as np
import polars as pl

from features.config import FeatureConfig
from features.formulas import Raw, count_expr, count_np, smoothed_ctr


class UserCounts:
    def names(self, config: FeatureConfig) -> list[str]:
        return ["user_shows", "user_clicks", "user_ctr", "user_history"]

    def exprs(self, config: FeatureConfig) -> list[pl.Expr]:
        shows, clicks = count_expr("users.shows"), count_expr("users.clicks")
        return [shows, clicks, smoothed_ctr(clicks, shows, config), count_expr("users.history")]

    def arrays(self, raw: Raw, config: FeatureConfig) -> list[np.ndarray]:
        shows, clicks = count_np(raw, "users.shows"), count_np(raw, "users.clicks")
        history = count_np(raw, "users.history")
        return [shows, clicks, smoothed_ctr(clicks, shows, config), history]
