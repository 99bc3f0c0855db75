"""The model bundle: one folder that the nightly job writes and the batch lists and the API load.

    BUNDLE/manifest.json            versions, data fingerprint, feature names, metrics, as_of
    BUNDLE/encoder/                 encoder.json + adapter weights (safetensors)
    BUNDLE/item_vectors.parquet     item_id, vector, text_hash, encoder_id
    BUNDLE/item_vectors_frozen.parquet  the same from the frozen base encoder, when the ranker
                                    reads its cosines too (FeatureSpec.frozen_semantic)
    BUNDLE/features/                feature snapshot as of the cut-off (Parquet per table)
    BUNDLE/history.parquet          user_id, item_id, ts: each user's history before the cut-off
    BUNDLE/popular.parquet          item_id, score: the popularity prior (cold start, fallback)
    BUNDLE/ranker/                  LightGBM model (text) + feature names: features as of the
                                    cut-off (batch: the nightly lists, an API without events)
    BUNDLE/ranker_online/           the ranker trained on online features (as of each request:
                                    an API fed events); optional, manifest "online" says its spec
    BUNDLE/recommendations.parquet  the nightly ranked lists (added after they are produced)

`write_bundle` builds the folder under a temporary name and renames it into place, so a bundle
folder is either complete or absent. `Bundle.load` checks every part and raises `DataError`
naming what is missing or broken.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from features import FeatureConfig, FeatureSnapshot
from features.events import live_lag_seconds
from recsys.errors import DataError
from recsys.featurize import ONLINE, FeatureSpec, matrix, snapshot_frame
from recsys.io import atomic_dir, json_digest, write_json
from recsys.ranker import Ranker
from recsys.vectors import ItemVectors

BUNDLE_FORMAT = 1
MANIFEST = "manifest.json"
FROZEN_VECTORS = "item_vectors_frozen.parquet"


def write_bundle(
    out: str | os.PathLike[str],
    *,
    encoder_dir: str | os.PathLike[str],
    vectors_path: str | os.PathLike[str],
    snapshot: FeatureSnapshot,
    history: pl.DataFrame,
    popular: pl.DataFrame,
    ranker: Ranker,
    spec: FeatureSpec,
    manifest: dict[str, Any],
    online: tuple[Ranker, FeatureSpec] | None = None,
    frozen_vectors_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write a complete bundle at `out` atomically (build beside it, then rename). `online`:
    the ranker for online features and its spec (same config and history, refresh online).
    frozen_vectors_path: the frozen base encoder's item vectors, needed when a spec has
    `frozen_semantic`."""
    target = Path(out)
    frozen = spec.frozen_semantic or (online is not None and online[1].frozen_semantic)
    if frozen and frozen_vectors_path is None:
        raise DataError("write_bundle: a spec reads the frozen encoder's cosines; pass its vectors")
    with atomic_dir(target) as tmp:
        shutil.copytree(encoder_dir, tmp / "encoder")
        shutil.copy2(vectors_path, tmp / "item_vectors.parquet")
        if frozen:
            assert frozen_vectors_path is not None
            shutil.copy2(frozen_vectors_path, tmp / FROZEN_VECTORS)
        snapshot.save(tmp / "features")
        history.select("user_id", "item_id", "ts").write_parquet(tmp / "history.parquet")
        popular.select("item_id", "score").write_parquet(tmp / "popular.parquet")
        ranker.save(tmp / "ranker")
        extra: dict[str, Any] = {}
        if online is not None:
            online[0].save(tmp / "ranker_online")
            extra = {"feature_names": online[1].columns, "use_semantic": online[1].use_semantic,
                     "frozen_semantic": online[1].frozen_semantic}  # fmt: skip
        full = {
            "bundle_format": BUNDLE_FORMAT,
            "created_at": datetime.now(UTC).isoformat(),
            "as_of": snapshot.as_of.isoformat(),
            "feature_names": spec.columns,
            "use_semantic": spec.use_semantic,
            "frozen_semantic": spec.frozen_semantic,
            "max_history": spec.max_history,
            "half_life_days": spec.half_life_days,
            "stable_features": spec.stable,
            "refresh": spec.refresh,
            **manifest,
        }
        if extra:
            full["online"] = {**manifest.get("online", {}), **extra}
        full.setdefault("model_version", json_digest(full)[:12])
        write_json(full, tmp / MANIFEST)
    return target


@dataclass
class Bundle:
    """A loaded model bundle: everything the batch lists and the API need, in memory."""

    path: Path
    manifest: dict[str, Any]
    spec: FeatureSpec
    ranker: Ranker
    snapshot: FeatureSnapshot
    vectors: ItemVectors
    history: pl.DataFrame
    popular: pl.DataFrame
    recommendations: pl.DataFrame | None = None
    online_ranker: Ranker | None = None  # ranker_online/, with online_spec (refresh online)
    online_spec: FeatureSpec | None = None
    _encoders: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def model_version(self) -> str:
        return str(self.manifest["model_version"])

    @property
    def max_event_lag_s(self) -> float | None:
        """How long a live server may go without an impression or click event before its
        state is stale (manifest online.max_event_lag_s, from the log's own quiet spells; a
        bundle made before it: from its history's times), None when the log cannot say."""
        online = self.manifest.get("online")
        if isinstance(online, dict) and "max_event_lag_s" in online:
            lag = online["max_event_lag_s"]
            return None if lag is None else float(lag)
        return live_lag_seconds(self.history["ts"], self.snapshot.as_of)

    @property
    def encoder_dir(self) -> Path:
        return self.path / "encoder"

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Bundle:
        """Load and check a bundle folder; `DataError` names the missing or broken part."""
        p = Path(path)
        mpath = p / MANIFEST
        if not mpath.is_file():
            raise DataError(f"{p}: not a model bundle (no {MANIFEST}); run `recsys nightly` first")
        try:
            manifest = json.loads(mpath.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{mpath}: unreadable bundle manifest ({e})") from e
        if manifest.get("bundle_format") != BUNDLE_FORMAT:
            raise DataError(
                f"{mpath}: bundle format {manifest.get('bundle_format')!r}, expected "
                f"{BUNDLE_FORMAT}; rebuild it with `recsys nightly`"
            )
        for part in ("encoder", "item_vectors.parquet", "features", "history.parquet",
                     "popular.parquet", "ranker"):  # fmt: skip
            if not (p / part).exists():
                raise DataError(f"{p / part}: missing from the bundle; rebuild it")
        try:
            snapshot = FeatureSnapshot.load(p / "features")
            ranker = Ranker.load(p / "ranker")
            vectors = ItemVectors.from_parquet(p / "item_vectors.parquet")
            if (p / FROZEN_VECTORS).is_file():
                vectors = vectors.with_frozen(ItemVectors.from_parquet(p / FROZEN_VECTORS))
            history = pl.read_parquet(p / "history.parquet")
            popular = pl.read_parquet(p / "popular.parquet")
            recs_path = p / "recommendations.parquet"
            recs = pl.read_parquet(recs_path) if recs_path.is_file() else None
        except DataError:
            raise
        except Exception as e:  # any broken part: name it, never crash with a trace
            raise DataError(f"{p}: broken bundle ({type(e).__name__}: {e})") from e
        spec = FeatureSpec(
            config=snapshot.config
            if isinstance(snapshot.config, FeatureConfig)
            else FeatureConfig(),
            use_semantic=bool(manifest.get("use_semantic", True)),
            max_history=int(manifest.get("max_history", 50)),
            half_life_days=float(manifest.get("half_life_days", 7.0)),
            # bundles written before the stable column set ranked on every raw column
            stable=bool(manifest.get("stable_features", False)),
            refresh=str(manifest.get("refresh", "online")),
            frozen_semantic=bool(manifest.get("frozen_semantic", False)),
        )
        if list(ranker.feature_names) != spec.columns:
            raise DataError(
                f"{p}: the ranker's features {ranker.feature_names} differ from the bundle's "
                f"{spec.columns}; rebuild the bundle"
            )
        online_ranker, online_spec = None, None
        if isinstance(manifest.get("online"), dict) and (p / "ranker_online").exists():
            try:
                online_ranker = Ranker.load(p / "ranker_online")
            except Exception as e:
                raise DataError(f"{p}: broken online ranker ({type(e).__name__}: {e})") from e
            online_spec = dataclasses.replace(
                spec,
                use_semantic=bool(manifest["online"].get("use_semantic", spec.use_semantic)),
                frozen_semantic=bool(manifest["online"].get("frozen_semantic", False)),
                refresh=ONLINE,
            )
            if list(online_ranker.feature_names) != online_spec.columns:
                raise DataError(
                    f"{p}: the online ranker's features differ from its spec's "
                    f"{online_spec.columns}; rebuild the bundle"
                )
        needs_frozen = spec.use_semantic and spec.frozen_semantic
        if online_spec is not None:
            needs_frozen |= online_spec.use_semantic and online_spec.frozen_semantic
        if needs_frozen and vectors.frozen is None:
            raise DataError(f"{p / FROZEN_VECTORS}: missing from the bundle; rebuild it")
        return cls(p, manifest, spec, ranker, snapshot, vectors, history, popular, recs,
                   online_ranker, online_spec)  # fmt: skip

    def featurize(
        self,
        requests: pl.DataFrame,
        *,
        extra_history: pl.DataFrame | None = None,
        vectors: ItemVectors | None = None,
        spec: FeatureSpec | None = None,
    ) -> pl.DataFrame:
        """Features of (user_id, item_id) pairs as of the bundle's cut-off, for `spec` (default
        the bundle's; `online_spec` for the online ranker's columns)."""
        spec = spec or self.spec
        users = requests["user_id"].unique()
        history = self.history.filter(pl.col("user_id").is_in(users.implode()))
        return snapshot_frame(
            spec,
            self.snapshot,
            requests,
            history,
            (vectors or self.vectors) if spec.use_semantic else None,
            extra_history=extra_history,
        )

    def score(
        self,
        requests: pl.DataFrame,
        *,
        extra_history: pl.DataFrame | None = None,
        vectors: ItemVectors | None = None,
    ) -> np.ndarray:
        """Ranker scores (n,) of (user_id, item_id) pairs; higher ranks first."""
        frame = self.featurize(requests, extra_history=extra_history, vectors=vectors)
        return self.ranker.predict(matrix(frame, self.spec.columns))

    def encoder(self, quantize: str = "auto", *, frozen: bool = False) -> Any:
        """The bundle's text encoder (loaded on first use), for items not in the bundle;
        frozen: the base model it was tuned from (the `item_vectors_frozen` encoder)."""
        key = f"{quantize}{'/frozen' if frozen else ''}"
        if key not in self._encoders:
            from recsys.encoder import TextEncoder
            from recsys.encoder.store import base_model_dir, is_encoder_dir, read_manifest

            cfg = self.manifest.get("config", {})
            path = self.encoder_dir
            if frozen and is_encoder_dir(path):
                path = base_model_dir(read_manifest(path))
            self._encoders[key] = TextEncoder.load(
                path,
                quantize=quantize,
                max_length=int(cfg.get("encoder.max_length", 64)),
                template=cfg.get("encoder.template"),
            )
        return self._encoders[key]
