"""The three BGE-M3 representations of a text, for one text and for a batch.

The encoder returns an :class:`M3Output` (a batch); indexing one of its rows gives an
:class:`M3Embedding`. Stores accept both; scoring functions take one query embedding against
a batch of documents.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

#: A user's document id: kept exactly as given (a string or an int) by every store.
DocId = str | int

#: Lexical weights: token id -> weight (all weights > 0).
SparseWeights = dict[int, float]

REPRESENTATIONS = ("dense", "sparse", "colbert")


@dataclass
class M3Embedding:
    """One text's representations; a part not computed is ``None``.

    ``dense`` is ``[d]`` float32, L2-normalized; ``sparse`` maps token ids to weights > 0;
    ``colbert`` is ``[n_tokens - 1, d]`` (CLS excluded), each row L2-normalized.
    """

    dense: np.ndarray | None = None
    sparse: SparseWeights | None = None
    colbert: np.ndarray | None = None


@dataclass
class M3Output:
    """A batch of representations, one row per input text, in input order."""

    dense: np.ndarray | None = None
    sparse: list[SparseWeights] | None = None
    colbert: list[np.ndarray] | None = None

    def __post_init__(self) -> None:
        lengths = {
            name: len(part)
            for name, part in (
                ("dense", self.dense),
                ("sparse", self.sparse),
                ("colbert", self.colbert),
            )
            if part is not None
        }
        if len(set(lengths.values())) > 1:
            raise ValueError(f"M3Output parts have different lengths: {lengths}")

    def __len__(self) -> int:
        for part in (self.dense, self.sparse, self.colbert):
            if part is not None:
                return len(part)
        return 0

    @overload
    def __getitem__(self, index: int) -> M3Embedding: ...
    @overload
    def __getitem__(self, index: slice | Sequence[int] | np.ndarray) -> M3Output: ...

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        if isinstance(index, (int, np.integer)):
            return M3Embedding(
                dense=None if self.dense is None else self.dense[index],
                sparse=None if self.sparse is None else self.sparse[index],
                colbert=None if self.colbert is None else self.colbert[index],
            )
        if isinstance(index, slice):
            rows = list(range(len(self)))[index]
        else:
            rows = [int(i) for i in index]
        return M3Output(
            dense=None if self.dense is None else self.dense[rows],
            sparse=None if self.sparse is None else [self.sparse[i] for i in rows],
            colbert=None if self.colbert is None else [self.colbert[i] for i in rows],
        )

    def __iter__(self) -> Iterator[M3Embedding]:
        for i in range(len(self)):
            yield self[i]

    @property
    def parts(self) -> tuple[str, ...]:
        """Names of the representations present, in the order dense, sparse, colbert."""
        return tuple(name for name in REPRESENTATIONS if getattr(self, name) is not None)

    @classmethod
    def from_embeddings(cls, embeddings: Sequence[M3Embedding]) -> M3Output:
        """Stack single embeddings into a batch; a part is kept only if every row has it."""
        if not embeddings:
            return cls()

        def present(name: str) -> bool:
            return all(getattr(e, name) is not None for e in embeddings)

        dense = None
        if present("dense"):
            dense = np.stack([np.asarray(e.dense, dtype=np.float32) for e in embeddings])
        return cls(
            dense=dense,
            sparse=[dict(e.sparse) for e in embeddings] if present("sparse") else None,  # type: ignore[arg-type]
            colbert=[np.asarray(e.colbert) for e in embeddings] if present("colbert") else None,
        )

    @classmethod
    def concat(cls, outputs: Sequence[M3Output]) -> M3Output:
        """Concatenate batches that carry the same parts."""
        return cls.from_embeddings([row for out in outputs for row in out])


def sparse_to_string_keys(weights: Mapping[int, float]) -> dict[str, float]:
    """``{token_id: w}`` -> ``{"token_id": w}``: the form FlagEmbedding returns and
    Elasticsearch's ``sparse_vector`` stores (feature names are strings)."""
    return {str(token_id): float(w) for token_id, w in weights.items()}


def sparse_from_string_keys(weights: Mapping[str, float]) -> SparseWeights:
    """The inverse of :func:`sparse_to_string_keys`."""
    try:
        return {int(token_id): float(w) for token_id, w in weights.items()}
    except ValueError as exc:
        raise ValueError(f"sparse keys must be token ids written as integers: {exc}") from None
