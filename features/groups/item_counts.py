"""Item counts: per window, the item's shows, clicks, smoothed CTR and interactions; its age
and the hours since its last click; the share of its clicks that came in the shortest window."""

from __future__ import annotations

import numpy as np
import polars as pl

from features.config import FeatureConfig
from features.events import AT
from features.formulas import (
    HOURS_PER_US,
    Raw,
    count_expr,
    count_np,
    hours_since_expr,
    share_expr,
    share_np,
    smoothed_ctr,
)

TIME_FEATURES = ("item_age_hours", "item_hours_since_click")


def window_names(window: str) -> list[str]:
    return [f"item_{s}_{window}" for s in ("shows", "clicks", "ctr", "interactions")]


def _share_windows(config: FeatureConfig) -> list[tuple[str, str]]:
    """(recent, whole): the first and the last configured window ("1h" of "all" by default);
    none with a single window."""
    w = config.windows
    return [(w[0], w[-1])] if len(w) > 1 else []


class ItemCounts:
    def names(self, config: FeatureConfig) -> list[str]:
        windows = (n for w in config.windows for n in window_names(w))
        shares = (f"item_click_share_{recent}" for recent, _ in _share_windows(config))
        return [*windows, *TIME_FEATURES, *shares]

    def exprs(self, config: FeatureConfig) -> list[pl.Expr]:
        out: list[pl.Expr] = []
        for w in config.windows:
            shows, clicks = count_expr(f"items.shows_{w}"), count_expr(f"items.clicks_{w}")
            out += [shows, clicks, smoothed_ctr(clicks, shows, config)]
            out.append(count_expr(f"items.interactions_{w}"))
        born = pl.coalesce("items.published_at", "items.first_seen_at")
        age = (pl.col(AT) - born).dt.total_microseconds().cast(pl.Float64) * HOURS_PER_US
        shares = [
            share_expr(count_expr(f"items.clicks_{recent}"), count_expr(f"items.clicks_{whole}"))
            for recent, whole in _share_windows(config)
        ]
        return [*out, age, hours_since_expr("items.last_click_at"), *shares]

    def arrays(self, raw: Raw, config: FeatureConfig) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for w in config.windows:
            shows, clicks = count_np(raw, f"items.shows_{w}"), count_np(raw, f"items.clicks_{w}")
            out += [shows, clicks, smoothed_ctr(clicks, shows, config)]
            out.append(count_np(raw, f"items.interactions_{w}"))
        published = raw["items.published_at"]
        born = np.where(np.isnan(published), raw["items.first_seen_at"], published)
        at = raw[AT]
        out += [(at - born) * HOURS_PER_US, (at - raw["items.last_click_at"]) * HOURS_PER_US]
        for recent, whole in _share_windows(config):
            clicks = count_np(raw, f"items.clicks_{recent}")
            out.append(share_np(clicks, count_np(raw, f"items.clicks_{whole}")))
        return out
