"""The store contract: what writing to and searching a store means.

Every store (the in-memory reference, Qdrant, Milvus, Elasticsearch) implements
:class:`M3Store` (and :class:`AsyncM3Store`) and gives the same answers as the reference store
on the same data: the same ids in the same order, with scores on the scales of
:mod:`m3connect.scoring`.

A search runs in three steps (see :class:`SearchParams`):

1. **legs**: each representation in ``legs`` retrieves its top ``candidates`` documents by its
   exact score (``dense``: dot product; ``sparse``: lexical score, documents sharing at least
   one token; ``colbert``: mean MaxSim);
2. **fusion** of the legs' rankings, when there are several: ``rrf`` (``1/(rrf_k + rank)``),
   ``dbsf``, or ``weighted`` (the weighted mean of the legs' exact scores; a leg's score is
   computed for the candidates it missed, never taken as 0);
3. **re-rank** of the top ``candidates`` fused documents, if asked: ``colbert`` (the ColBERT
   score) or ``all`` (the weighted combination of the three exact scores, the paper's "All").

The top ``k`` come back as :class:`Hit` s, each with the exact score of every representation
the search used in ``Hit.scores``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import (
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from m3connect.filters import FilterLike, RawFilter, parse_filter
from m3connect.fingerprint import ModelFingerprint
from m3connect.fusion import DEFAULT_RRF_K
from m3connect.scoring import DEFAULT_WEIGHTS
from m3connect.types import DocId, M3Embedding, M3Output

if TYPE_CHECKING:
    from m3connect.encoder import M3Encoder

Mode = Literal["dense", "sparse", "colbert", "hybrid"]
FusionName = Literal["rrf", "weighted", "dbsf"]
RerankName = Literal["colbert", "all"]
LEG_NAMES = ("dense", "sparse", "colbert")
#: Sparse token ids are unsigned 32-bit integers (every database stores them so).
MAX_TOKEN_ID = 2**32 - 1
#: Metadata ints are signed 64-bit (JSON numbers beyond it are refused by the databases).
INT64_RANGE = (-(2**63), 2**63 - 1)
_METADATA_MAX_DEPTH = 32

logger = logging.getLogger(__name__)


class StoreError(ValueError):
    """Bad input to a store, or a collection that does not fit; nothing was written."""


@dataclass(frozen=True)
class SearchParams:
    """What a search means. Every store returns the same answer for the same parameters.

    ``weights`` are ``(dense, sparse, colbert)``: weighted fusion uses the legs' entries,
    ``rerank="all"`` all three; both divide by the sum of the weights used.
    """

    mode: Mode = "hybrid"
    k: int = 10
    candidates: int = 100
    hybrid_legs: tuple[str, ...] = ("dense", "sparse")
    fusion: FusionName = "rrf"
    rrf_k: float = DEFAULT_RRF_K
    weights: tuple[float, float, float] = DEFAULT_WEIGHTS
    rerank: RerankName | None = None
    filter: FilterLike = None

    def __post_init__(self) -> None:
        if self.mode not in ("dense", "sparse", "colbert", "hybrid"):
            raise StoreError(f"mode must be dense, sparse, colbert or hybrid, got {self.mode!r}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise StoreError(f"k must be a positive integer, got {self.k!r}")
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise StoreError(f"candidates must be a positive integer, got {self.candidates!r}")
        if self.fusion not in ("rrf", "weighted", "dbsf"):
            raise StoreError(f"fusion must be rrf, weighted or dbsf, got {self.fusion!r}")
        if self.rerank not in (None, "colbert", "all"):
            raise StoreError(f"rerank must be None, 'colbert' or 'all', got {self.rerank!r}")
        legs = tuple(self.hybrid_legs)
        if len(legs) < 2 or len(set(legs)) != len(legs) or not set(legs) <= set(LEG_NAMES):
            raise StoreError(f"hybrid_legs must name two or three of {LEG_NAMES}, got {legs!r}")
        object.__setattr__(self, "hybrid_legs", legs)
        weights = tuple(float(w) for w in self.weights)
        if len(weights) != 3 or any(not math.isfinite(w) or w < 0 for w in weights):
            raise StoreError(f"weights are (dense, sparse, colbert) >= 0, got {self.weights!r}")
        object.__setattr__(self, "weights", weights)
        if self.mode == "hybrid" and self.fusion == "weighted" and sum(self.leg_weights) <= 0:
            raise StoreError(f"weighted fusion needs a positive weight on one of {legs}")
        if self.rerank == "all" and sum(weights) <= 0:
            raise StoreError("rerank='all' needs a positive weight")
        if not (isinstance(self.rrf_k, (int, float)) and self.rrf_k >= 0):
            raise StoreError(f"rrf_k must be >= 0, got {self.rrf_k!r}")
        object.__setattr__(self, "filter", parse_filter(self.filter))

    @property
    def legs(self) -> tuple[str, ...]:
        """The representations that retrieve candidates."""
        return self.hybrid_legs if self.mode == "hybrid" else (self.mode,)

    @property
    def leg_weights(self) -> tuple[float, ...]:
        return tuple(self.weights[LEG_NAMES.index(leg)] for leg in self.legs)

    @property
    def leg_limit(self) -> int:
        """How many documents each leg retrieves: ``k`` when its ranking is the answer."""
        if len(self.legs) == 1 and self.rerank is None:
            return self.k
        return max(self.candidates, self.k)

    @property
    def scored_parts(self) -> tuple[str, ...]:
        """The representations whose exact scores each hit carries."""
        parts = set(self.legs)
        if self.rerank == "colbert":
            parts.add("colbert")
        elif self.rerank == "all":
            parts.update(LEG_NAMES)
        return tuple(name for name in LEG_NAMES if name in parts)

    def with_overrides(self, **overrides: Any) -> SearchParams:
        return replace(self, **overrides) if overrides else self


@dataclass
class Hit:
    """One search result. ``scores`` holds the exact score of each representation the search
    used (keys ``dense``, ``sparse``, ``colbert``); ``score`` is the final (fused or
    re-ranked) score that orders the hits."""

    id: DocId
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    text: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    """A stored document, as :meth:`M3Store.get` returns it."""

    id: DocId
    text: str | None
    metadata: dict[str, Any]
    embedding: M3Embedding | None = None


@dataclass
class PreparedBatch:
    """A validated batch ready to write: what :meth:`M3Store.prepare_batch` returns."""

    ids: list[DocId]
    embeddings: M3Output
    texts: list[str | None]
    metadatas: list[dict[str, Any]]


class StoreBase:
    """What sync and async stores share: the encoder, the fingerprint, ColBERT size controls
    and input validation."""

    def __init__(
        self,
        encoder: M3Encoder | None = None,
        *,
        fingerprint: ModelFingerprint | None = None,
        colbert_dtype: Literal["float32", "float16"] = "float32",
        max_colbert_vectors: int | None = None,
    ) -> None:
        if colbert_dtype not in ("float32", "float16"):
            raise StoreError(f"colbert_dtype must be float32 or float16, got {colbert_dtype!r}")
        if max_colbert_vectors is not None and max_colbert_vectors < 1:
            raise StoreError(f"max_colbert_vectors must be >= 1, got {max_colbert_vectors}")
        self.encoder = encoder
        if fingerprint is None and encoder is not None:
            fingerprint = encoder.fingerprint
        elif fingerprint is not None and encoder is not None:
            fingerprint.check_compatible(encoder.fingerprint, "the fingerprint given to this store")
        self.fingerprint = fingerprint
        self.colbert_dtype = np.dtype(colbert_dtype)
        self.max_colbert_vectors = max_colbert_vectors

    # --- encoding -------------------------------------------------------------------------

    def _require_encoder(self) -> M3Encoder:
        if self.encoder is None:
            raise StoreError(
                "this store has no encoder: pass encoder=M3Encoder.from_pretrained(...) to it, "
                "or give pre-encoded embeddings (add) and an M3Embedding query (search)"
            )
        return self.encoder

    def _encode_texts(self, texts: Sequence[str]) -> M3Output:
        _check_texts(texts)
        return self._require_encoder().encode(list(texts))

    def _encode_query(self, query: str | M3Embedding) -> M3Embedding:
        if isinstance(query, M3Embedding):
            return query
        if not isinstance(query, str):
            raise StoreError(f"a query is a string or an M3Embedding, got {type(query).__name__}")
        return self._require_encoder().encode_queries([query])[0]

    @staticmethod
    def _resolve_params(params: SearchParams | None, overrides: Mapping[str, Any]) -> SearchParams:
        if params is None:
            return SearchParams(**overrides)
        return params.with_overrides(**overrides)

    # --- validation -----------------------------------------------------------------------

    def prepare_batch(
        self,
        ids: Sequence[DocId],
        embeddings: M3Output,
        texts: Sequence[str | None] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> PreparedBatch:
        """Validate a batch before anything is written, apply the ColBERT size controls, and
        learn the fingerprint from the first batch when the store has none.

        This is the one validation of every store: whatever a database would refuse (a
        non-finite number, a metadata value JSON cannot hold, an int beyond 64 bits, a sparse
        token id outside ``[0, 2**32)``) is a :class:`StoreError` here, before any write."""
        ids = id_list(ids)
        n = len(ids)
        if not isinstance(embeddings, M3Output):
            raise StoreError(f"embeddings must be an M3Output, got {type(embeddings).__name__}")
        missing = [p for p in ("dense", "sparse", "colbert") if getattr(embeddings, p) is None]
        if missing:
            raise StoreError(f"embeddings lack {', '.join(missing)}: a store keeps all three")
        if len(embeddings) != n:
            raise StoreError(f"{n} ids but {len(embeddings)} embeddings")
        for doc_id in ids:
            check_id(doc_id)
        seen: set[tuple[type, DocId]] = set()
        for doc_id in ids:
            key = (type(doc_id), doc_id)
            if key in seen:
                raise StoreError(f"id {doc_id!r} occurs twice in one batch")
            seen.add(key)
        text_list: list[str | None] = [None] * n if texts is None else list(texts)
        if len(text_list) != n:
            raise StoreError(f"{n} ids but {len(text_list)} texts")
        if texts is not None:
            _check_texts(text_list)
        if isinstance(metadatas, Mapping):
            raise StoreError("metadatas must be a list of mappings (one per id), not one mapping")
        raw_metas = list(metadatas) if metadatas is not None else [None] * n
        if len(raw_metas) != n:
            raise StoreError(f"{n} ids but {len(raw_metas)} metadatas")
        meta_list = [check_metadata(doc_id, m) for doc_id, m in zip(ids, raw_metas)]

        dense = np.asarray(embeddings.dense, dtype=np.float32)
        if dense.ndim != 2:
            raise StoreError(f"dense must be [n, d], got shape {dense.shape}")
        if not np.isfinite(dense).all():
            bad = ids[int(np.where(~np.isfinite(dense).all(axis=1))[0][0])]
            raise StoreError(f"dense vector of id {bad!r} is not finite")
        colbert: list[np.ndarray] = []
        for doc_id, matrix in zip(ids, embeddings.colbert):  # type: ignore[arg-type]
            matrix = np.asarray(matrix)
            if matrix.ndim != 2 or matrix.shape[0] == 0:
                raise StoreError(
                    f"ColBERT vectors of id {doc_id!r} must be [n >= 1, d], got {matrix.shape}"
                )
            if self.max_colbert_vectors is not None:
                matrix = matrix[: self.max_colbert_vectors]
            matrix = matrix.astype(self.colbert_dtype, copy=False)
            if not np.isfinite(matrix).all():
                raise StoreError(f"ColBERT vectors of id {doc_id!r} are not finite")
            colbert.append(matrix)
        sparse = [
            _check_sparse(doc_id, weights)
            for doc_id, weights in zip(ids, embeddings.sparse)  # type: ignore[arg-type]
        ]
        colbert_dims = {m.shape[1] for m in colbert}
        if len(colbert_dims) > 1:
            raise StoreError(
                f"ColBERT vectors of one batch have different dimensions {colbert_dims}"
            )
        if n:
            dense_dim = dense.shape[1]
            colbert_dim = colbert_dims.pop()
            if self.fingerprint is None:
                self.fingerprint = ModelFingerprint(
                    model="unknown", dense_dim=dense_dim, colbert_dim=colbert_dim
                )
            if dense_dim != self.fingerprint.dense_dim:
                raise StoreError(
                    f"dense vectors have dimension {dense_dim}; this store holds "
                    f"{self.fingerprint.dense_dim} ({self.fingerprint.model})"
                )
            if colbert_dim != self.fingerprint.colbert_dim:
                raise StoreError(
                    f"ColBERT vectors have dimension {colbert_dim}; this store holds "
                    f"{self.fingerprint.colbert_dim} ({self.fingerprint.model})"
                )
        return PreparedBatch(
            ids, M3Output(dense=dense, sparse=sparse, colbert=colbert), text_list, meta_list
        )

    def check_query(self, query: M3Embedding, params: SearchParams) -> M3Embedding:
        """Validate a query embedding for the parts ``params`` needs."""
        for part in params.scored_parts:
            if getattr(query, part) is None:
                raise StoreError(f"the query has no {part} representation, which this search needs")
        if query.sparse is not None:
            # The same rules as stored weights: a negative weight would make "shares a token"
            # differ from "scores above 0", which the sparse leg relies on.
            query = M3Embedding(
                query.dense, _check_sparse("the query", query.sparse, query=True), query.colbert
            )
        if self.fingerprint is not None:
            if query.dense is not None and np.shape(query.dense) != (self.fingerprint.dense_dim,):
                raise StoreError(
                    f"query dense vector has shape {np.shape(query.dense)}; "
                    f"this store holds dimension {self.fingerprint.dense_dim}"
                )
            if query.colbert is not None and (
                np.ndim(query.colbert) != 2
                or np.shape(query.colbert)[1] != self.fingerprint.colbert_dim
            ):
                raise StoreError(
                    f"query ColBERT vectors have shape {np.shape(query.colbert)}; "
                    f"this store holds dimension {self.fingerprint.colbert_dim}"
                )
        if isinstance(params.filter, RawFilter) and not self.accepts_raw_filter(params.filter):
            raise StoreError(
                f"{type(self).__name__} cannot use the raw filter {params.filter.value!r}"
            )
        return query

    def accepts_raw_filter(self, raw: RawFilter) -> bool:
        """Whether this store's database understands ``raw``; adapters override."""
        return False


class M3Store(StoreBase, ABC):
    """A store of BGE-M3 documents: dense, sparse and ColBERT vectors plus text and metadata."""

    # --- writing --------------------------------------------------------------------------

    def add_texts(
        self,
        texts: Sequence[str],
        ids: Sequence[DocId] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[DocId]:
        """Encode ``texts`` (one pass for all three representations) and upsert them.
        Without ``ids``, new UUID strings are generated. Returns the ids."""
        _check_texts(texts)
        ids = _ids_or_new(ids, len(texts))
        self.add(ids, self._encode_texts(texts), texts=texts, metadatas=metadatas)
        return ids

    @abstractmethod
    def add(
        self,
        ids: Sequence[DocId],
        embeddings: M3Output,
        texts: Sequence[str | None] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        """Upsert pre-encoded documents: an existing id is replaced in every field. The batch
        lands whole or not at all: bad input is a :class:`StoreError` before any write, and a
        database error part way is undone (:func:`write_or_roll_back`)."""

    @abstractmethod
    def get(self, ids: Sequence[DocId], *, with_vectors: bool = False) -> list[Record]:
        """The stored documents among ``ids``, in the order asked; unknown ids are skipped.
        A bare string or int is one id (see :func:`id_list`)."""

    @abstractmethod
    def delete(self, ids: Sequence[DocId] | None = None, *, filter: FilterLike = None) -> None:
        """Delete by ids, by filter, or both (documents matching either). Unknown ids are
        ignored; a bare string or int is one id (``delete("abc")`` deletes ``"abc"`` only)."""

    @abstractmethod
    def count(self, *, filter: FilterLike = None) -> int:
        """How many documents are stored (matching ``filter``)."""

    def clear(self) -> None:
        """Delete every document; the collection and its settings stay."""
        self.delete(filter={})

    def iter_records(
        self, *, filter: FilterLike = None, with_vectors: bool = False, batch_size: int = 256
    ) -> Iterator[Record]:
        """Every stored document (matching ``filter``), read ``batch_size`` at a time, in the
        database's order; no search, so no cap on how many. Adapters implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its documents yet")

    # --- searching ------------------------------------------------------------------------

    def search(
        self, query: str | M3Embedding, params: SearchParams | None = None, **overrides: Any
    ) -> list[Hit]:
        """Search with :class:`SearchParams` (or its fields as keyword arguments)."""
        params = self._resolve_params(params, overrides)
        embedding = self.check_query(self._encode_query(query), params)
        return self._search(embedding, params)

    def search_within(
        self,
        ids: Sequence[DocId],
        query: str | M3Embedding,
        params: SearchParams | None = None,
        **overrides: Any,
    ) -> list[Hit]:
        """The search restricted to the documents ``ids`` (unknown ids are skipped): the
        contract's exact answer over them, computed from their stored vectors."""
        params = self._resolve_params(params, overrides)
        embedding = self.check_query(self._encode_query(query), params)
        return search_records(self.get(_unique_ids(ids), with_vectors=True), embedding, params)

    @abstractmethod
    def _search(self, query: M3Embedding, params: SearchParams) -> list[Hit]:
        """Run a validated search."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the database connection, if the store owns one."""

    def finish(self) -> None:  # noqa: B027 - optional hook
        """The end of a write job (the indexing job calls it once): where a store defers work
        (flushing, segment optimization), it does it now instead of on every ``add``."""

    def __enter__(self) -> M3Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncM3Store(StoreBase, ABC):
    """The async form of :class:`M3Store`: the same methods as coroutines."""

    async def add_texts(
        self,
        texts: Sequence[str],
        ids: Sequence[DocId] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[DocId]:
        _check_texts(texts)
        ids = _ids_or_new(ids, len(texts))
        # Encoding is CPU/GPU-bound: keep the event loop free while it runs.
        embeddings = await asyncio.to_thread(self._encode_texts, texts)
        await self.add(ids, embeddings, texts=texts, metadatas=metadatas)
        return ids

    @abstractmethod
    async def add(
        self,
        ids: Sequence[DocId],
        embeddings: M3Output,
        texts: Sequence[str | None] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None: ...

    @abstractmethod
    async def get(self, ids: Sequence[DocId], *, with_vectors: bool = False) -> list[Record]: ...

    @abstractmethod
    async def delete(
        self, ids: Sequence[DocId] | None = None, *, filter: FilterLike = None
    ) -> None: ...

    @abstractmethod
    async def count(self, *, filter: FilterLike = None) -> int: ...

    async def clear(self) -> None:
        """Delete every document; the collection and its settings stay."""
        await self.delete(filter={})

    def iter_records(
        self, *, filter: FilterLike = None, with_vectors: bool = False, batch_size: int = 256
    ) -> AsyncIterator[Record]:
        """Every stored document (matching ``filter``), as an async iterator (see
        :meth:`M3Store.iter_records`). Adapters implement it."""
        raise NotImplementedError(f"{type(self).__name__} cannot list its documents yet")

    async def search(
        self, query: str | M3Embedding, params: SearchParams | None = None, **overrides: Any
    ) -> list[Hit]:
        params = self._resolve_params(params, overrides)
        embedding = self.check_query(await self._encode_query_async(query), params)
        return await self._search(embedding, params)

    async def _encode_query_async(self, query: str | M3Embedding) -> M3Embedding:
        if isinstance(query, M3Embedding):
            return query
        # Encoding is CPU/GPU-bound: keep the event loop free while it runs.
        return await asyncio.to_thread(self._encode_query, query)

    async def search_within(
        self,
        ids: Sequence[DocId],
        query: str | M3Embedding,
        params: SearchParams | None = None,
        **overrides: Any,
    ) -> list[Hit]:
        """See :meth:`M3Store.search_within`."""
        params = self._resolve_params(params, overrides)
        embedding = self.check_query(await self._encode_query_async(query), params)
        records = await self.get(_unique_ids(ids), with_vectors=True)
        return search_records(records, embedding, params)

    @abstractmethod
    async def _search(self, query: M3Embedding, params: SearchParams) -> list[Hit]: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the database connection, if the store owns one."""

    async def __aenter__(self) -> AsyncM3Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncStoreAdapter(AsyncM3Store):
    """The async form of any sync store: each call runs in a worker thread.

    For stores whose database client has no async form (the in-memory reference store).
    """

    def __init__(self, store: M3Store) -> None:
        self.sync = store

    def __getattr__(self, name: str) -> Any:
        # encoder, fingerprint and the size controls are the sync store's.
        if name == "sync":
            raise AttributeError(name)
        return getattr(self.sync, name)

    async def add_texts(
        self,
        texts: Sequence[str],
        ids: Sequence[DocId] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[DocId]:
        return await asyncio.to_thread(self.sync.add_texts, texts, ids, metadatas)

    async def add(self, ids, embeddings, texts=None, metadatas=None) -> None:  # type: ignore[no-untyped-def]
        await asyncio.to_thread(self.sync.add, ids, embeddings, texts, metadatas)

    async def get(self, ids: Sequence[DocId], *, with_vectors: bool = False) -> list[Record]:
        return await asyncio.to_thread(self.sync.get, ids, with_vectors=with_vectors)

    async def delete(
        self, ids: Sequence[DocId] | None = None, *, filter: FilterLike = None
    ) -> None:
        await asyncio.to_thread(self.sync.delete, ids, filter=filter)

    async def count(self, *, filter: FilterLike = None) -> int:
        return await asyncio.to_thread(self.sync.count, filter=filter)

    async def clear(self) -> None:
        await asyncio.to_thread(self.sync.clear)

    async def iter_records(  # type: ignore[override]
        self, *, filter: FilterLike = None, with_vectors: bool = False, batch_size: int = 256
    ) -> AsyncIterator[Record]:
        records = self.sync.iter_records(
            filter=filter, with_vectors=with_vectors, batch_size=batch_size
        )
        done = object()
        while (record := await asyncio.to_thread(next, records, done)) is not done:
            yield record  # type: ignore[misc]

    async def search_within(
        self,
        ids: Sequence[DocId],
        query: str | M3Embedding,
        params: SearchParams | None = None,
        **overrides: Any,
    ) -> list[Hit]:
        return await asyncio.to_thread(self.sync.search_within, ids, query, params, **overrides)

    async def search(
        self, query: str | M3Embedding, params: SearchParams | None = None, **overrides: Any
    ) -> list[Hit]:
        return await asyncio.to_thread(self.sync.search, query, params, **overrides)

    async def _search(self, query: M3Embedding, params: SearchParams) -> list[Hit]:
        return await asyncio.to_thread(self.sync._search, query, params)

    async def close(self) -> None:
        await asyncio.to_thread(self.sync.close)


# --- helpers shared by the adapters -----------------------------------------------------------


def check_delete_target(ids: Sequence[DocId] | None, filter: FilterLike) -> None:
    """``delete`` needs ids or a filter: deleting everything must be asked for explicitly."""
    if ids is None and filter is None:
        raise StoreError("delete needs ids or a filter (to delete everything, pass filter={})")


def id_list(ids: DocId | Iterable[DocId]) -> list[DocId]:
    """The ids a call names, as a list. A bare ``str`` or ``int`` is that one id (never a
    sequence of characters: ``delete("abc")`` deletes the document ``"abc"``); any other
    iterable (list, tuple, set, generator) is its elements. ``bytes``, a mapping, ``None`` or a
    non-iterable are refused. Every store's ``get``/``delete``/``add`` and the integrations
    pass their ids through here, so they all read the same call the same way."""
    if isinstance(ids, bool):
        raise StoreError(f"ids must be strings or ints, got {ids!r}")
    if isinstance(ids, (str, int)):
        return [ids]
    if isinstance(ids, (bytes, bytearray, memoryview)):
        raise StoreError(
            f"ids must be strings or ints (or a list of them), got {type(ids).__name__}: "
            "decode bytes to str first"
        )
    if ids is None or isinstance(ids, Mapping) or not isinstance(ids, Iterable):
        raise StoreError(
            f"ids must be a string, an int, or a list of them, got {type(ids).__name__}"
        )
    return list(ids)


def check_metadata(doc_id: DocId, metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """A JSON-safe copy of one document's metadata, or :class:`StoreError` naming what no
    store can keep: keys that are not strings, NaN/inf, ints beyond 64 bits, and values JSON
    has no type for (``datetime``, ``set``, ``bytes``, objects). Tuples become lists and numpy
    scalars/arrays plain numbers/lists, as every database gives them back."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise StoreError(
            f"metadata of id {doc_id!r} must be a mapping, got {type(metadata).__name__}"
        )
    return _json_value(doc_id, metadata, "", 0)


def _json_value(doc_id: DocId, value: Any, path: str, depth: int) -> Any:
    where = f"metadata{path} of id {doc_id!r}"
    if depth > _METADATA_MAX_DEPTH:
        raise StoreError(f"{where} is nested deeper than {_METADATA_MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        number = int(value)
        if not INT64_RANGE[0] <= number <= INT64_RANGE[1]:
            raise StoreError(f"{where} is {number}: metadata ints must fit in 64 bits (signed)")
        return number
    if isinstance(value, float):
        if not math.isfinite(value):
            raise StoreError(f"{where} is {value!r}: metadata numbers must be finite")
        return value
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise StoreError(f"metadata keys must be strings ({where}: {key!r})")
            out[key] = _json_value(doc_id, item, f"{path}[{key!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(doc_id, v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
    raise StoreError(
        f"{where} is a {type(value).__name__} ({value!r:.60}): metadata values are JSON "
        "(str, int, float, bool, None, lists and dicts of them); convert it first "
        "(e.g. a datetime to an ISO string, a set to a sorted list)"
    )


def search_records(
    records: Sequence[Record], query: M3Embedding, params: SearchParams
) -> list[Hit]:
    """The contract's exact search over ``records`` (read with their vectors), by the
    reference store's arithmetic: what a search restricted to some ids answers."""
    from m3connect.stores.memory import InMemoryStore  # the reference store imports this module

    if not records:
        return []
    subset = InMemoryStore()
    subset.add(
        [r.id for r in records],
        M3Output.from_embeddings([r.embedding for r in records]),  # type: ignore[misc]
        texts=[r.text for r in records],
        metadatas=[r.metadata for r in records],
    )
    return subset._search(query, params)


def _unique_ids(ids: DocId | Iterable[DocId]) -> list[DocId]:
    # "1" and 1 are different ids: dedupe by type and value.
    return [i for _, i in dict.fromkeys((type(i), i) for i in id_list(ids))]


def check_id(doc_id: Any) -> DocId:
    """A document id is a non-empty string or an int (not a bool)."""
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        raise StoreError(f"ids must be strings or ints, got {doc_id!r} ({type(doc_id).__name__})")
    if isinstance(doc_id, str) and not doc_id:
        raise StoreError("ids must not be empty strings")
    if isinstance(doc_id, int) and not -(2**63) <= doc_id < 2**63:
        raise StoreError(f"int ids must fit in 64 bits, got {doc_id}")
    return doc_id


def _check_texts(texts: Sequence[Any]) -> None:
    if isinstance(texts, str):
        raise StoreError("texts must be a list of strings, not one string")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise StoreError(f"text {i} is {text!r}: every text must be a string")


def _check_sparse(
    doc_id: DocId, weights: Mapping[Any, Any], *, query: bool = False
) -> dict[int, float]:
    if not isinstance(weights, Mapping):
        raise StoreError(
            f"sparse weights of id {doc_id!r} must map token ids to weights, "
            f"got {type(weights).__name__}"
        )
    out: dict[int, float] = {}
    for token, weight in weights.items():
        if isinstance(token, numbers.Integral) and not isinstance(token, bool):
            token_id = int(token)
        elif isinstance(token, str) and token.isascii() and token.isdigit():
            token_id = int(token)  # a JSON round trip makes keys strings
        else:
            raise StoreError(f"sparse token ids of id {doc_id!r} must be ints, got {token!r}")
        if not 0 <= token_id <= MAX_TOKEN_ID:
            if query:  # no document holds such a token: it matches nothing
                continue
            raise StoreError(
                f"sparse token id {token_id} of id {doc_id!r} is outside [0, 2**32): "
                "token ids are unsigned 32-bit"
            )
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise StoreError(
                f"sparse weight {weight!r} of token {token!r} (id {doc_id!r}) is not a number"
            ) from None
        if not math.isfinite(w) or w < 0:
            raise StoreError(
                f"sparse weight {weight!r} of token {token!r} (id {doc_id!r}) must be >= 0 and finite"
            )
        if w > 0:  # a zero weight changes no score; databases reject it
            out[token_id] = w
    return out


def _ids_or_new(ids: Sequence[DocId] | None, n: int) -> list[DocId]:
    if ids is None:
        import uuid

        return [str(uuid.uuid4()) for _ in range(n)]
    ids = id_list(ids)
    if len(ids) != n:
        raise StoreError(f"{n} texts but {len(ids)} ids")
    return ids


# --- the write protocol ----------------------------------------------------------------------

#: A step of a store's I/O, as the write protocol's handlers yield it: the store's driver runs
#: it (a database call) and sends the result back. Sync stores whose handlers call the database
#: directly yield nothing.
WriteSteps = Generator[Any, Any, Any]


def records_batch(records: Sequence[Record]) -> PreparedBatch:
    """The batch that writes ``records`` (read with vectors) back as they were."""
    embeddings = [r.embedding for r in records]
    if any(e is None for e in embeddings):
        raise StoreError("records_batch needs records read with_vectors=True")
    return PreparedBatch(
        ids=[r.id for r in records],
        embeddings=M3Output(
            dense=np.stack([np.asarray(e.dense, dtype=np.float32) for e in embeddings])  # type: ignore[union-attr]
            if records
            else np.zeros((0, 0), dtype=np.float32),
            sparse=[dict(e.sparse or {}) for e in embeddings],  # type: ignore[union-attr]
            colbert=[np.asarray(e.colbert) for e in embeddings],  # type: ignore[union-attr]
        ),
        texts=[r.text for r in records],
        metadatas=[dict(r.metadata) for r in records],
    )


def write_or_roll_back(
    batch: PreparedBatch,
    write: Callable[[PreparedBatch], WriteSteps],
    read: Callable[[list[DocId]], WriteSteps],
    remove: Callable[[list[DocId]], WriteSteps],
    *,
    atomic: bool,
) -> WriteSteps:
    """The write protocol of every store: an ``add`` either lands whole or leaves the store as
    it was.

    ``atomic``: the adapter writes this batch in one request that the database applies whole
    or not at all; nothing more is needed. Otherwise (several requests, or a request whose
    items can fail one by one) the documents the batch replaces are read first (``read``:
    their records with vectors), and when any write fails the call undoes itself: the ids it
    added are removed (``remove``) and the replaced documents are written back (``write``),
    then the original error is raised. Each handler is a generator function whose yields pass
    through to the store's driver (see :func:`m3connect.search.drive_steps`).
    """
    if atomic or not batch.ids:
        yield from write(batch)
        return
    before: list[Record] = yield from read(list(batch.ids))
    try:
        yield from write(batch)
    except Exception as exc:
        kept = {(type(r.id), r.id) for r in before}
        added = [i for i in batch.ids if (type(i), i) not in kept]
        try:
            if added:
                yield from remove(added)
            if before:
                yield from write(records_batch(before))
        except Exception as undo_error:
            logger.error(
                "an add of %d documents failed (%s) and undoing it failed too (%s): "
                "the store may hold part of the batch",
                len(batch.ids),
                type(exc).__name__,
                undo_error,
            )
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"undoing the partial write failed too: {undo_error}")
        else:
            logger.warning(
                "an add of %d documents failed (%s); what it wrote was undone",
                len(batch.ids),
                type(exc).__name__,
            )
        raise


def direct(fn: Callable[..., Any]) -> Callable[..., WriteSteps]:
    """A protocol handler of a plain function (a store that calls its database directly)."""

    def handler(*args: Any) -> WriteSteps:
        return fn(*args)
        yield  # unreachable: makes this a generator that yields nothing

    return handler


def awaited(fn: Callable[..., Any]) -> Callable[..., WriteSteps]:
    """A protocol handler of a coroutine function: yields the awaitable to
    :func:`run_awaiting`, which sends back its result."""

    def handler(*args: Any) -> WriteSteps:
        return (yield fn(*args))

    return handler


async def run_awaiting(steps: WriteSteps) -> Any:
    """Run a protocol whose handlers yield awaitables (async stores): each is awaited and its
    result (or exception) goes back into the protocol."""
    send: Callable[[Any], Any] = steps.send
    value: Any = None
    while True:
        try:
            step = send(value)
        except StopIteration as done:
            return done.value
        try:
            value, send = await step, steps.send
        except Exception as exc:
            value, send = exc, steps.throw


def run_direct(steps: WriteSteps) -> Any:
    """Run a protocol whose handlers call the database themselves (they yield nothing)."""
    try:
        step = next(steps)
    except StopIteration as done:
        return done.value
    raise RuntimeError(f"a direct write handler yielded {step!r}")
