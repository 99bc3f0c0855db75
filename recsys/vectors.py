"""Item vectors: one unit-length float32 row per item id, with a vectorised id lookup.

The encoder writes `item_vectors.parquet` (item_id str, vector list[float32], text_hash,
encoder_id); `ItemVectors.from_parquet` reads the first two columns. Everything downstream
(semantic features, candidate retrieval) works on `ItemVectors.matrix` rows, so cosine
similarity is a plain dot product.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from recsys.errors import DataError

__all__ = ["ItemVectors"]


@dataclass(frozen=True, eq=False)
class ItemVectors:
    """Unit-length item vectors.

    ids:    list[str] (n,), unique item ids
    matrix: np.ndarray (n, d) float32, each row of L2 norm 1
    index:  dict[str, int], item id -> row of `matrix`
    frozen: the same items' vectors from the frozen base encoder, row for row (ids equal),
            when the ranker also reads semantic features of the frozen encoder; else None

    Build one with `from_arrays` (normalises the rows) or `from_parquet`, and `with_frozen`;
    the constructor only checks that the fields agree.
    """

    ids: list[str]
    matrix: np.ndarray
    index: dict[str, int]
    frozen: ItemVectors | None = field(default=None, repr=False, compare=False)
    _frame: pl.DataFrame = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.matrix.ndim != 2:
            raise DataError(
                f"item vectors: matrix must be 2-D (n_items, dim), got shape {self.matrix.shape}"
            )
        if not (len(self.ids) == self.matrix.shape[0] == len(self.index)):
            raise DataError(
                f"item vectors: {len(self.ids)} ids, {self.matrix.shape[0]} matrix rows and "
                f"{len(self.index)} index entries must agree; build with ItemVectors.from_arrays"
            )
        if self.frozen is not None and (
            self.frozen.ids != self.ids or self.frozen.frozen is not None
        ):
            raise DataError(
                "item vectors: the frozen encoder's vectors must hold the same items in the same "
                "order; build them with ItemVectors.with_frozen"
            )
        frame = pl.DataFrame(
            {"item_id": pl.Series(self.ids, dtype=pl.String), "__row": np.arange(len(self.ids))},
            schema={"item_id": pl.String, "__row": pl.Int64},
        )
        object.__setattr__(self, "_frame", frame)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_arrays(cls, ids: Sequence[str], matrix: np.ndarray) -> ItemVectors:
        """Item vectors from ids (n,) and a matrix (n, d); rows are L2-normalised to float32.

        Raises DataError for duplicate or null ids, a shape mismatch, or a row that is all zeros
        or holds NaN/inf (such a row has no direction: re-encode that item).
        """
        id_list = [str(i) if i is not None else None for i in ids]
        mat = np.asarray(matrix, dtype=np.float32)
        if mat.ndim != 2 or mat.shape[0] != len(id_list):
            raise DataError(
                f"item vectors: need a matrix of shape ({len(id_list)}, dim) for "
                f"{len(id_list)} ids, got {mat.shape}"
            )
        if any(i is None for i in id_list):
            raise DataError("item vectors: item_id has nulls; every vector needs an item id")
        index = {i: n for n, i in enumerate(id_list)}  # type: ignore[misc]
        if len(index) != len(id_list):
            dup = pl.Series(id_list).filter(pl.Series(id_list).is_duplicated()).unique()
            raise DataError(
                f"item vectors: {len(id_list) - len(index)} duplicate item ids "
                f"(e.g. {dup.head(3).to_list()}); keep one vector per item"
            )
        norms = np.linalg.norm(mat.astype(np.float64), axis=1)
        bad = ~np.isfinite(norms) | (norms == 0.0)
        if bad.any():
            first = id_list[int(np.flatnonzero(bad)[0])]
            raise DataError(
                f"item vectors: {int(bad.sum())} vectors are zero or not finite (e.g. item "
                f"{first!r}); re-encode those items"
            )
        unit = (mat / norms[:, None]).astype(np.float32)
        return cls(ids=id_list, matrix=unit, index=index)  # type: ignore[arg-type]

    @classmethod
    def from_parquet(cls, path: str | os.PathLike[str]) -> ItemVectors:
        """Read `item_vectors.parquet` (item_id str, vector list[float32]; others ignored)."""
        p = Path(path)
        if not p.is_file():
            raise DataError(
                f"item vectors: no file at {p}; run the embedding step to write "
                "item_vectors.parquet"
            )
        try:
            df = pl.read_parquet(p, columns=["item_id", "vector"])
        except Exception as exc:  # polars raises several error types for bad files
            raise DataError(
                f"item vectors: cannot read {p} ({exc}); it needs columns item_id and vector"
            ) from exc
        if df.height == 0:
            return cls.from_arrays([], np.zeros((0, 0), dtype=np.float32))
        vec = df["vector"]
        if vec.null_count():
            raise DataError(f"item vectors: {vec.null_count()} null vectors in {p}; re-encode them")
        if isinstance(vec.dtype, pl.List):
            lengths = vec.list.len().unique()
            if lengths.len() != 1:
                raise DataError(
                    f"item vectors: vectors in {p} have different lengths "
                    f"{sorted(lengths.to_list())[:5]}; all must have the encoder's dimension"
                )
            vec = vec.list.to_array(int(lengths[0]))
        mat = vec.cast(pl.Array(pl.Float32, vec.dtype.size)).to_numpy()  # type: ignore[attr-defined]
        return cls.from_arrays(df["item_id"].to_list(), mat)

    def lookup(
        self, item_ids: Sequence[str] | pl.Series | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows of `item_ids` in `matrix`.

        Returns (rows int64 (m,), found bool (m,)); where found is False (unknown or null id) the
        row is -1, so mask with `found` before indexing `matrix`.
        """
        s = pl.Series("item_id", item_ids, dtype=pl.String)
        joined = pl.DataFrame({"item_id": s}).join(
            self._frame, on="item_id", how="left", maintain_order="left"
        )
        rows = joined["__row"]
        found = rows.is_not_null().to_numpy()
        return rows.fill_null(-1).to_numpy().astype(np.int64, copy=False), found

    def with_frozen(self, frozen: ItemVectors) -> ItemVectors:
        """These vectors with `frozen` (the base encoder's vectors of the same catalogue) as
        their `frozen` companion, its rows put in this order; a DataError when it lacks items."""
        rows, found = frozen.lookup(self.ids)
        if not found.all():
            missing = [i for i, f in zip(self.ids, found, strict=True) if not f][:3]
            raise DataError(
                f"item vectors: the frozen encoder's vectors lack {int((~found).sum())} items "
                f"(e.g. {missing}); embed the catalogue with both encoders"
            )
        matrix = frozen.matrix[rows] if len(self.ids) else frozen.matrix[:0]
        return ItemVectors(self.ids, self.matrix, self.index,
                           ItemVectors(self.ids, matrix, self.index))  # fmt: skip

    def extended(self, ids: Sequence[str], matrix: np.ndarray,
                 frozen: np.ndarray | None = None) -> ItemVectors:  # fmt: skip
        """These vectors followed by rows for new `ids` (unit rows (m, d), and the frozen
        encoder's (m, d') when these have a frozen companion)."""
        every = [*self.ids, *ids]
        index = {i: n for n, i in enumerate(every)}
        companion = None
        if self.frozen is not None:
            if frozen is None:
                raise DataError("item vectors: new items need the frozen encoder's vectors too")
            companion = ItemVectors(every, np.vstack([self.frozen.matrix, frozen]), index)
        return ItemVectors(every, np.vstack([self.matrix, matrix]), index, companion)
