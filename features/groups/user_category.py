"""The user with the candidate's category (or subcategory): shows, clicks, smoothed CTR, and
its share of the user's history. Undefined (null / NaN) when the candidate has none."""

from __future__ import annotations

import numpy as np
import polars as pl

from features.config import FeatureConfig
from features.formulas import Raw, count_expr, count_np, share_expr, share_np, smoothed_ctr


def table_of(level: str) -> str:
    """The snapshot table of a level: category -> user_category."""
    return f"user_{level}"


class UserCategory:
    def __init__(self, level: str) -> None:
        self.level = level  # "category" or "subcategory"
        self.table = table_of(level)

    def names(self, config: FeatureConfig) -> list[str]:
        return [f"{self.table}_{s}" for s in ("shows", "clicks", "ctr", "share")]

    def exprs(self, config: FeatureConfig) -> list[pl.Expr]:
        t = self.table
        known = pl.col(f"items.{self.level}").is_not_null()
        shows, clicks = count_expr(f"{t}.shows"), count_expr(f"{t}.clicks")
        share = share_expr(count_expr(f"{t}.history"), count_expr("users.history"))
        values = (shows, clicks, smoothed_ctr(clicks, shows, config), share)
        return [pl.when(known).then(e) for e in values]

    def arrays(self, raw: Raw, config: FeatureConfig) -> list[np.ndarray]:
        t = self.table
        known = raw[f"items.{self.level}"].astype(bool)
        shows, clicks = count_np(raw, f"{t}.shows"), count_np(raw, f"{t}.clicks")
        share = share_np(count_np(raw, f"{t}.history"), count_np(raw, "users.history"))
        values = (shows, clicks, smoothed_ctr(clicks, shows, config), share)
        return [np.where(known, e, np.nan) for e in values]
