"""Embedding items the bundle has no vector for: a request's item texts and item events.

    embedder = Embedder(bundle, semantic=True, preload=True)
    embedder.embed(item_texts, needed) -> NewItems | None      (a request's new candidates)
    embedder.embed_events(item_events) -> NewItems | None      (items that came as events)

Text is built by `recsys.encoder.item_texts` with the bundle encoder's template and embedded by
its encoder in the CPU's fast form; rows are normalised as `ItemVectors.from_arrays` does, so a
new item's vector is the one the nightly embed job would give it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from recsys.bundle import Bundle
from recsys.vectors import ItemVectors
from serving.schemas import ItemText


@dataclass(frozen=True)
class NewItems:
    """Vectors of items embedded for one request: ids (m,), matrix (m, d) float32 unit rows,
    and `frozen` (m, d') the frozen base encoder's, when the bundle's ranker reads them."""

    ids: list[str]
    matrix: np.ndarray
    frozen: np.ndarray | None = None

    @property
    def index(self) -> dict[str, int]:
        return {i: n for n, i in enumerate(self.ids)}


class Embedder:
    """The bundle's text encoder(s), loaded at start (`preload`) or on first use. Without
    semantic features (`semantic` False) nothing is embedded."""

    def __init__(self, bundle: Bundle, *, semantic: bool, preload: bool = True) -> None:
        self.bundle = bundle
        self.vectors = bundle.vectors
        self.semantic = semantic
        self.encoder: Any = bundle.encoder("auto") if preload else None
        if preload and self.vectors.frozen is not None:
            bundle.encoder("auto", frozen=True)  # new items get both views' vectors
        self._lock = threading.Lock()

    def text_encoder(self, *, frozen: bool = False) -> Any:
        """The bundle's encoder in the CPU's fast form ("auto": int8 with VNNI/AMX, else fp32,
        as the embed job chooses on this machine), loaded on first use by one thread (requests
        run on a thread pool: two first requests must not both load it); frozen: the base
        model it was tuned from."""
        with self._lock:
            if frozen:
                return self.bundle.encoder("auto", frozen=True)
            if self.encoder is None:
                self.encoder = self.bundle.encoder("auto")
            return self.encoder

    def embed(self, items: Sequence[ItemText], needed: set[str]) -> NewItems | None:
        """Vectors of the `items` the bundle has no vector for and that `needed` names."""
        todo = [i for i in items if i.item_id in needed and i.item_id not in self.vectors.index]
        if not todo or not self.semantic:
            return None
        return self.embed_texts(todo)

    def embed_events(self, items: Sequence[dict[str, Any]]) -> NewItems | None:
        """Vectors of item events (normalised dicts), embedded as `embed` does; None without
        semantic features or items."""
        if not items or not self.semantic:
            return None
        texts = [ItemText.model_validate({k: e[k] for k in ItemText.model_fields if k in e})
                 for e in items]  # fmt: skip
        last = {t.item_id: t for t in texts}  # the latest text of an item sent twice
        return self.embed_texts(list(last.values()))

    def embed_texts(self, todo: Sequence[ItemText]) -> NewItems:
        """Vectors of `todo`, whether or not the bundle has some already."""
        from recsys.encoder import item_texts

        encoder = self.text_encoder()
        frame = pl.DataFrame(
            [i.model_dump() for i in todo],
            schema={c: pl.String for c in ("item_id", "title", "description", "category",
                                           "subcategory")},
        )  # fmt: skip
        texts, _ = item_texts(frame, encoder.template)
        ids = [i.item_id for i in todo]
        fresh = ItemVectors.from_arrays(ids, encoder.embed(texts))
        frozen = None
        if self.vectors.frozen is not None:  # the ranker reads the frozen encoder's cosines too
            frozen = ItemVectors.from_arrays(ids, self.text_encoder(frozen=True).embed(texts))
        return NewItems(fresh.ids, fresh.matrix, frozen.matrix if frozen is not None else None)
