"""Why an item ranks where it does: each row's largest LightGBM feature contributions."""

from __future__ import annotations

from typing import Any

import numpy as np

from serving.featurize import Head
from serving.schemas import EXPLAIN_TOP


def explain(head: Head, x: np.ndarray, top: int = EXPLAIN_TOP) -> list[list[dict[str, Any]]]:
    """Each row's `top` features by |contribution| to `head`'s ranker (LightGBM pred_contrib,
    bias left out): [{feature, value (None = missing), contribution}] per row of x (n, F)."""
    if x.shape[0] == 0:
        return []
    contrib = head.ranker.contributions(x)[:, :-1]  # (n, F), bias dropped
    order = np.argsort(-np.abs(contrib), axis=1, kind="stable")[:, :top]
    return [
        [
            {
                "feature": head.columns[c],
                "value": None if np.isnan(x[row, c]) else float(x[row, c]),
                "contribution": float(contrib[row, c]),
            }
            for c in cols
        ]
        for row, cols in enumerate(order.tolist())
    ]
