"""The behavioural-feature configuration: time windows and CTR smoothing, validated when built."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from recsys.errors import ConfigError

ALL = "all"  # the window with no lower bound: every event strictly before the request

# A polars duration string: one or more <integer><unit> parts, e.g. "1h", "7d", "1d12h", "1mo".
_DURATION = re.compile(r"^(?:\d+(?:ns|us|ms|s|m|h|d|w|mo|q|y))+$")
_PART = re.compile(r"(\d+)")
WINDOW_FORM = (
    f'"{ALL}" or a positive polars duration string such as "30m", "1h", "24h", "7d", "2w", "1mo"'
)


@dataclass(frozen=True)
class FeatureConfig:
    """What the behavioural features count and how CTRs are smoothed.

    windows: item counts are taken over each window [t - window, t) before a request at t;
        "all" means every event before t (history with no timestamp included).
    ctr_prior, prior_weight: smoothed CTR = (clicks + ctr_prior * prior_weight)
        / (shows + prior_weight), so an item never shown has CTR `ctr_prior`.
    """

    windows: tuple[str, ...] = ("1h", "24h", "7d", ALL)
    ctr_prior: float = 0.05
    prior_weight: float = 20.0

    def __post_init__(self) -> None:
        windows = self.windows
        if isinstance(windows, str) or not isinstance(windows, (tuple, list)):
            raise ConfigError(
                f"features: windows must be a list of window names ({WINDOW_FORM}), got {windows!r}"
            )
        # A list (as read from TOML) is accepted and stored as a tuple, keeping the config hashable.
        object.__setattr__(self, "windows", tuple(windows))
        for w in self.windows:
            if not isinstance(w, str) or not (w == ALL or valid_duration(w)):
                raise ConfigError(f"features: windows has {w!r}; each window must be {WINDOW_FORM}")
        if len(set(self.windows)) != len(self.windows):
            raise ConfigError(
                f"features: windows has duplicates {list(self.windows)}; list each once"
            )
        if not isinstance(self.ctr_prior, (int, float)) or not 0.0 <= self.ctr_prior <= 1.0:
            raise ConfigError(
                f"features: ctr_prior must be a number in [0, 1], got {self.ctr_prior!r}"
            )
        if not isinstance(self.prior_weight, (int, float)) or not self.prior_weight > 0.0:
            raise ConfigError(
                f"features: prior_weight must be a number > 0, got {self.prior_weight!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FeatureConfig:
        """Build from a mapping (a TOML table, snapshot.json); an unknown key is a ConfigError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"features: unknown key(s) {unknown}; allowed keys {sorted(known)}")
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["windows"] = list(self.windows)
        return d


def valid_duration(w: str) -> bool:
    return bool(_DURATION.match(w)) and any(int(n) > 0 for n in _PART.findall(w))
