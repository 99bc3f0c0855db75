"""Behavioural features (polars), point-in-time correct, one definition for training and serving.

Training rows: `point_in_time_features(requests, data, config)`. Serving and batch scoring:
`build_snapshot(data, as_of, config)` -> `FeatureSnapshot` (saved in the model bundle), then
`snapshot_features(snapshot, requests)` or, on the hot path, `snapshot_features_numpy`.
"""

from features.behavioural import features_as_of, point_in_time_features
from features.config import ALL, FeatureConfig
from features.derive import feature_names
from features.fast import SnapshotIndex, snapshot_features_numpy
from features.snapshot import FeatureSnapshot, build_snapshot, snapshot_features

__all__ = [
    "ALL",
    "FeatureConfig",
    "FeatureSnapshot",
    "SnapshotIndex",
    "build_snapshot",
    "feature_names",
    "features_as_of",
    "point_in_time_features",
    "snapshot_features",
    "snapshot_features_numpy",
]
