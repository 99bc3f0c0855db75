"""The parity check a bundle passes before it serves: the fast feature path (serving/featurize.py)
against the shared polars featurisation (`bundle.featurize`), on probe requests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.errors import DataError
from serving.featurize import Featurizer


def self_check(featurizer: Featurizer, popular_ids: Sequence[str], tol: float = 1e-9) -> None:
    """Compare `featurizer.features` with `featurizer.reference` on probe requests (a stored
    user, an anonymous history, cold start) over the most popular items and one unknown item;
    a difference, or a non-finite score, is a DataError and the bundle is refused."""
    items = [*popular_ids[:50], "\x00unknown-item"]
    users = sorted(featurizer.histories.ptr)[:1]
    probes: list[tuple[str | None, list[str]]] = [(None, []), (None, items[:3])]
    probes += [(u, []) for u in users] + [(u, items[3:5]) for u in users]
    # the batch path (snapshot), and the live path of the online ranker at the cut-off
    online = featurizer.online is not None
    paths: list[int | None] = [None] + ([featurizer.as_of_us] if online else [])
    for at_us in paths:
        head = featurizer.head(at_us)
        for user, hist in probes:
            fast = featurizer.features(user, items, hist, at_us=at_us)
            ref = featurizer.reference(user, items, hist, head=head)
            diffs = [_max_diff(fast[:, j], ref[:, j]) for j in range(len(head.columns))]
            worst = int(np.argmax(diffs))
            if not diffs[worst] <= tol:
                path = "live" if at_us is not None else "fast"
                raise DataError(
                    f"serving features ({path} path) differ from bundle.featurize by "
                    f"{diffs[worst]:.3g} in {head.columns[worst]!r} for user {user!r}; "
                    "refusing the bundle: serving/featurize.py or features/live.py must be "
                    "fixed"
                )
            if not np.isfinite(head.ranker.predict(fast)).all():
                raise DataError("the bundle's ranker gives non-finite scores on probes")


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| where both are numbers; inf where only one is NaN or shapes differ."""
    if a.shape != b.shape:
        return float("inf")
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    if (nan_a != nan_b).any():
        return float("inf")
    if a.size == 0 or nan_a.all():
        return 0.0
    return float(np.max(np.abs(a[~nan_a] - b[~nan_b])))
