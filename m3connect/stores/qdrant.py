"""BGE-M3 in Qdrant's native fields: a named dense vector, a named sparse vector and a named
ColBERT multivector, searched, fused and re-ranked by the Qdrant engine.

Three stores share one translation (schema checks, points, filters, query plans):

- :class:`QdrantStore` over a :class:`qdrant_client.QdrantClient`: a server URL, Qdrant Cloud,
  or local mode (``QdrantClient(":memory:")`` / ``QdrantClient(path=...)``);
- :class:`AsyncQdrantStore` over an :class:`qdrant_client.AsyncQdrantClient` (native async);
- :class:`QdrantEdgeStore` over a ``qdrant_edge.EdgeShard``: the real Qdrant engine in-process.

::

    from qdrant_client import QdrantClient
    from m3connect.stores.qdrant import QdrantStore

    store = QdrantStore(QdrantClient("http://localhost:6333"), "docs", encoder)
    store.add_texts(["first passage", "second passage"], metadatas=[{"lang": "en"}, {"lang": "en"}])
    hits = store.search("a question", mode="hybrid", rerank="colbert", k=5)

How the contract maps onto Qdrant (every ranking is **one** ``query_points`` call):

- legs are ``Prefetch`` es (``NearestQuery`` on the dense / sparse / ColBERT vector);
- RRF is ``RrfQuery``: Qdrant scores ``1 / (k + rank - 1)`` with ranks from 1, so the store asks
  for ``k = rrf_k + 1``; a fractional ``rrf_k`` uses Qdrant's weighted RRF
  (``w / (rank + w (k - 1))`` with ``k = 2``, ``w = rrf_k``), which is ``rrf_k`` times the
  contract's score, and divides it back;
- DBSF is ``FusionQuery(DBSF)`` (the same definition as the core's);
- weighted fusion and ``rerank="all"`` are ``FormulaQuery`` s over prefetches that re-score the
  union of the candidates with each representation, so every candidate gets each exact score
  (a missed sparse candidate shares no token: its lexical score is the formula's default 0);
- a ColBERT re-rank is the outer ``NearestQuery`` on the multivector over the fused prefetch;
- Qdrant's ``MAX_SIM`` is a *sum* over query vectors; the contract's ColBERT score is the
  *mean*, so the store divides by the number of query vectors (inside formulas too).

``Hit.scores`` holds each representation's exact score: the final score where it is one; the
others come from one batch call (``query_batch_points``, ``EdgeShard.query_batch``) that has
the engine score just the ``k`` hits by id, one request per representation (tiny answers: a ColBERT matrix is 100 x 1024 floats per
hit). So a search is one call, or two when the hits need scores that are not the final one.
Local mode scores every point for any request, so there the hits' vectors come back with them
instead (``with_vectors``) and the core's scoring computes those scores.

With ``colbert_dtype="float16"`` a real engine (server, Cloud, qdrant-edge; not local mode)
stores half floats and rounds the *query* to float16 too, so its MaxSim is slightly off the
float32 reference. Scores within :data:`HALF_MAXSIM_TOLERANCE` (1e-4) of it count as exact
(issue 11): for BGE-M3's 1024-dim unit rows the engine stays well inside (measured: < 1e-5,
benchmarks/bench_scale.py), so its MaxSim is used as is — no ColBERT matrix leaves the engine.
Where a query's rounding could move a score by more (small dimensions, rows of large norm; see
:meth:`_QdrantBase._half_maxsim_within_tolerance`) and ``exact_float16=True`` (the default), the
store re-scores the hits exactly from their ColBERT vectors (``k + 3`` matrices come back in
the same request, scored by :func:`m3connect.scoring.colbert_scores` in one batch) and re-sorts
them where the ColBERT score makes the final score (ColBERT search or re-rank,
``rerank="all"``, weighted fusion); a ColBERT *leg* inside RRF / DBSF keeps the engine's
ranking. ``exact_float16=False`` keeps the engine's scores everywhere.

Payload layout: ``{"doc_id": str, "doc_id_type": "str" | "int", "text": ..., "metadata": {...}}``.
Point ids are ``uuid5`` of the typed user id, so ``"1"`` and ``1`` are two documents. Filters on
metadata key ``k`` become conditions on the payload path ``metadata.k`` (write ``RawFilter``
conditions against that layout). qdrant-edge-py 0.9 cannot match booleans (its ``MatchValue(True)``
becomes ``MatchValue(1)``), so :class:`QdrantEdgeStore` also writes ``metadata_bools``: the
boolean values of each key as ``"true"`` / ``"false"`` strings, which its filters match instead.

The model fingerprint lives in the collection's ``metadata`` (servers that keep collection
metadata, and local mode); where that is not available (older servers, qdrant-edge) in a
reserved point without vectors, which searches never see and counts and deletes leave out.

Search is exact where Qdrant is: sparse and ColBERT (HNSW off by default) always; dense only with
``exact=True`` (brute force), otherwise through HNSW, approximate on large collections.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
import weakref
from collections.abc import AsyncIterator, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from m3connect.filters import (
    And,
    Eq,
    Filter,
    FilterLike,
    In,
    Not,
    Or,
    Range,
    RawFilter,
    parse_filter,
)
from m3connect.fingerprint import ModelFingerprint
from m3connect.scoring import colbert_scores, combine_scores, dense_scores, lexical_scores
from m3connect.store import (
    LEG_NAMES,
    AsyncM3Store,
    Hit,
    M3Store,
    PreparedBatch,
    Record,
    SearchParams,
    StoreBase,
    StoreError,
    awaited,
    check_delete_target,
    direct,
    id_list,
    run_awaiting,
    run_direct,
    write_or_roll_back,
)
from m3connect.stores.colbert_rows import ROWS_KEY, ColbertRowFile
from m3connect.types import DocId, M3Embedding, M3Output

if TYPE_CHECKING:
    from qdrant_client import AsyncQdrantClient, QdrantClient

    from m3connect.encoder import M3Encoder

__all__ = ["AsyncQdrantStore", "QdrantEdgeStore", "QdrantStore", "point_id"]

#: Namespace of the point ids (``uuid5(NAMESPACE, "str:<id>" | "int:<id>")``).
NAMESPACE = uuid.UUID("3c0b8f0e-6d7a-5b7e-9a43-6d33636f6e6e")
#: The point that keeps the fingerprint where collection metadata is not available.
RESERVED_POINT_ID = str(uuid.uuid5(NAMESPACE, "m3connect:collection-info"))
logger = logging.getLogger(__name__)

METADATA_KEY = "m3connect"
_FORMAT = 1
_MAX_EXACT_FLOAT_INT = 2**53
_MAX_TOKEN_ID = 2**32 - 1
#: Extra hits asked for where the client re-sorts the engine's half-precision ColBERT ranking.
_HALF_MARGIN = 3
#: How far (absolute, on the mean-MaxSim score) the engine's half-precision MaxSim may be from the
#: float32 reference and still count as exact (issue 11's rule for float16 storage).
HALF_MAXSIM_TOLERANCE = 1e-4


def point_id(doc_id: DocId) -> str:
    """The Qdrant point id of a user id: a UUID derived from the id *and its type*."""
    kind = "int" if isinstance(doc_id, int) else "str"
    return str(uuid.uuid5(NAMESPACE, f"{kind}:{doc_id}"))


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise StoreError(f"batch_size must be a positive integer, got {batch_size!r}")


def _valid_id(doc_id: Any) -> bool:
    return (isinstance(doc_id, str) and doc_id != "") or (
        isinstance(doc_id, int) and not isinstance(doc_id, bool)
    )


# --- the query plan: what to ask Qdrant, independent of the client that sends it ------------


@dataclass
class _Nearest:
    part: str  # "dense" | "sparse" | "colbert": nearest to the query's vector of that part


@dataclass
class _Fuse:
    method: Literal["rrf", "dbsf"]
    k: int | None = None
    weights: list[float] | None = None


@dataclass
class _Formula:
    #: ``sum(coefficient * $score[index])`` over the stage's sources.
    terms: list[tuple[int, float]]


@dataclass
class _Stage:
    """One level of a ``query_points`` request: a query over its sources (prefetches)."""

    query: _Nearest | _Fuse | _Formula
    sources: list[_Stage] = field(default_factory=list)
    limit: int = 10


@dataclass
class _Plan:
    top: _Stage
    #: The representation whose score the final score is (after ``scale``), if any.
    final_part: str | None
    #: Factor from Qdrant's final score to the contract's.
    scale: float
    #: Representations whose vectors come back with the hits (to compute their exact scores).
    fetch_parts: tuple[str, ...]
    #: Recompute the final score on the client from the exact scores and re-sort, keeping
    #: ``k``: ``("part", name)``, ``("weighted", legs, weights)`` or ``("all", weights)``.
    recompute: tuple[Any, ...] | None = None
    k: int = 10
    #: Representations the engine scores for the hits in a second, small request (by id):
    #: cheaper than transferring their vectors (ColBERT matrices are large).
    by_id: tuple[str, ...] = ()


@dataclass
class _QueryVectors:
    """The query's vectors in request form, converted on first use (a ColBERT query is
    32 x 1024 floats: only the parts a request uses are converted)."""

    query: M3Embedding
    sparse: tuple[list[int], list[float]] | None  # None: no token with a non-zero weight
    n_colbert: int
    _lists: dict[str, Any] = field(default_factory=dict)

    def as_list(self, part: str) -> Any:
        if part not in self._lists:
            value = getattr(self.query, part)
            if value is None:
                raise StoreError(f"the query has no {part} representation, which this search needs")
            self._lists[part] = np.asarray(value, dtype=np.float32).tolist()
        return self._lists[part]

    def usable(self, part: str) -> bool:
        """Whether ``part`` can match anything (a query without a sparse token cannot)."""
        return part != "sparse" or self.sparse is not None

    def factor(self, part: str) -> float:
        """From the engine's score of ``part`` to the contract's (MaxSim is a sum)."""
        return 1.0 / self.n_colbert if part == "colbert" else 1.0


def _rescore(
    qv: _QueryVectors, parts_weights: Sequence[tuple[str, float]], sources: list[_Stage], limit: int
) -> _Stage:
    """Each exact score of every document of ``sources`` (their union), combined."""
    total = float(sum(w for _, w in parts_weights))
    scored = [(p, w) for p, w in parts_weights if w > 0 and qv.usable(p)]
    stages = [_Stage(_Nearest(p), sources, limit) for p, _ in scored]
    if not any(p != "sparse" for p, _ in scored):
        # A sparse re-score drops documents that share no token: add another one so the
        # union keeps every candidate (its term is not in the formula).
        keeper = next(p for p, _ in parts_weights if p != "sparse")
        stages.append(_Stage(_Nearest(keeper), sources, limit))
    terms = [(i, w / total * qv.factor(p)) for i, (p, w) in enumerate(scored)]
    return _Stage(_Formula(terms), stages)


# --- the collection's schema, as both APIs describe it -----------------------------------------


@dataclass
class _VectorSpec:
    size: int
    distance: str  # lower case: "dot", "cosine", ...
    comparator: str | None = None  # "max_sim" for a multivector
    datatype: str | None = None


@dataclass
class _Schema:
    vectors: dict[str, _VectorSpec]
    sparse: dict[str, str | None]  # name -> modifier ("idf" or None)
    unnamed: bool = False


def _lower(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value)).lower()


class _QdrantBase(StoreBase):
    """What the Qdrant stores share: schema, points, filters, plans, hits (no I/O)."""

    #: Either spelling of Qdrant's API; set by the concrete store.
    _dialect: _Dialect

    def __init__(
        self,
        collection: str,
        encoder: M3Encoder | None = None,
        *,
        fingerprint: ModelFingerprint | None = None,
        colbert_dtype: Literal["float32", "float16"] = "float32",
        max_colbert_vectors: int | None = None,
        dense_name: str = "dense",
        sparse_name: str = "sparse",
        colbert_name: str = "colbert",
        sparse_idf: bool = False,
        colbert_hnsw: bool = False,
        exact: bool = False,
        hnsw_ef: int | None = None,
        exact_float16: bool = True,
        batch_size: int = 64,
        batch_max_floats: int = 1_000_000,
    ) -> None:
        super().__init__(
            encoder,
            fingerprint=fingerprint,
            colbert_dtype=colbert_dtype,
            max_colbert_vectors=max_colbert_vectors,
        )
        names = {"dense": dense_name, "sparse": sparse_name, "colbert": colbert_name}
        if (
            any(not isinstance(n, str) or not n for n in names.values())
            or len(set(names.values())) != 3
        ):
            raise StoreError(f"vector names must be three different non-empty strings, got {names}")
        if batch_size < 1 or batch_max_floats < 1:
            raise StoreError("batch_size and batch_max_floats must be positive")
        self.collection = collection
        self.names = names
        self.sparse_idf = bool(sparse_idf)
        self.colbert_hnsw = bool(colbert_hnsw)
        self.exact = bool(exact)
        self.hnsw_ef = hnsw_ef
        self.exact_float16 = bool(exact_float16)
        self.batch_size = batch_size
        self.batch_max_floats = batch_max_floats
        #: The collection exists and fits.
        self._ready = False
        #: The fingerprint is kept in the reserved point (counts and deletes leave it out).
        self._reserved = False
        #: The fingerprint was given or stored (not guessed from the schema's dimensions).
        self._fingerprint_known = fingerprint is not None or encoder is not None
        #: The engine scores the ColBERT vectors in half precision (float16 storage): it
        #: rounds the query to float16, so its MaxSim differs from the reference by ~1e-5.
        self._half_colbert = False
        #: The largest ColBERT row norm this store wrote (BGE-M3's rows are unit vectors).
        self._colbert_row_norm = 1.0
        self._stored_colbert_dtype = np.dtype(np.float32)

    # --- schema ---------------------------------------------------------------------------

    def _where(self) -> str:
        return f"Qdrant collection {self.collection!r}"

    def _check_schema(self, schema: _Schema) -> None:
        """Raise :class:`StoreError` naming everything in the collection that does not fit."""
        problems: list[str] = []
        if schema.unnamed:
            problems.append("it has an unnamed vector; m3connect needs named vectors")
        dense_name, sparse_name, colbert_name = (self.names[p] for p in LEG_NAMES)
        have = sorted(schema.vectors)
        dense = schema.vectors.get(dense_name)
        colbert = schema.vectors.get(colbert_name)
        if dense is None:
            problems.append(f"it has no dense vector {dense_name!r} (dense vectors: {have})")
        else:
            if dense.comparator is not None:
                problems.append(f"vector {dense_name!r} is a multivector, not a dense vector")
            if dense.distance != "dot":
                problems.append(
                    f"dense vector {dense_name!r} uses distance {dense.distance}, not Dot"
                )
        if colbert is None:
            problems.append(
                f"it has no ColBERT multivector {colbert_name!r} (dense vectors: {have})"
            )
        else:
            if colbert.comparator != "max_sim":
                problems.append(
                    f"vector {colbert_name!r} has comparator {colbert.comparator}, not a "
                    "multivector with MAX_SIM"
                )
            if colbert.distance != "dot":
                problems.append(
                    f"ColBERT vector {colbert_name!r} uses distance {colbert.distance}, not Dot"
                )
        if sparse_name not in schema.sparse:
            problems.append(
                f"it has no sparse vector {sparse_name!r} (sparse vectors: {sorted(schema.sparse)})"
            )
        else:
            modifier = schema.sparse[sparse_name]
            if self.sparse_idf and modifier != "idf":
                problems.append(
                    f"sparse vector {sparse_name!r} has no IDF modifier, but sparse_idf=True"
                )
            if not self.sparse_idf and modifier == "idf":
                problems.append(
                    f"sparse vector {sparse_name!r} has the IDF modifier (scores would not be "
                    "the lexical scores); open it with sparse_idf=True"
                )
        fp = self.fingerprint
        if fp is not None and dense is not None and dense.size != fp.dense_dim:
            problems.append(
                f"dense vector {dense_name!r} has dimension {dense.size}, the model {fp.dense_dim}"
            )
        if fp is not None and colbert is not None and colbert.size != fp.colbert_dim:
            problems.append(
                f"ColBERT vector {colbert_name!r} has dimension {colbert.size}, the model {fp.colbert_dim}"
            )
        if problems:
            raise StoreError(f"{self._where()} does not fit this store: " + "; ".join(problems))
        if fp is None and dense is not None and colbert is not None:
            # Nothing says which model wrote it: at least refuse vectors of other dimensions.
            self.fingerprint = ModelFingerprint("unknown", dense.size, colbert.size)
        #: What the engine keeps of a ColBERT value (a copy elsewhere must keep the same).
        self._stored_colbert_dtype = np.dtype(
            np.float16
            if colbert is not None
            and colbert.datatype == "float16"
            and self._engine_uses_datatype()
            else np.float32
        )
        self._half_colbert = self.exact_float16 and self._stored_colbert_dtype == np.float16

    def _engine_uses_datatype(self) -> bool:
        return True

    def _adopt_fingerprint(self, stored: ModelFingerprint | None) -> bool:
        """Check the stored fingerprint against this store's; returns whether to store ours."""
        if stored is None:
            return self.fingerprint is not None and self._fingerprint_known
        if self.fingerprint is not None and self._fingerprint_known:
            self.fingerprint.check_compatible(stored, self._where())
        else:
            self.fingerprint = stored
            self._fingerprint_known = True
        return False

    def _info_payload(self) -> dict[str, Any]:
        assert self.fingerprint is not None
        return {
            "format": _FORMAT,
            "fingerprint": self.fingerprint.to_dict(),
            "vectors": dict(self.names),
        }

    @staticmethod
    def _fingerprint_from(info: Any) -> ModelFingerprint | None:
        if not isinstance(info, Mapping) or not isinstance(info.get("fingerprint"), Mapping):
            return None
        try:
            return ModelFingerprint.from_dict(info["fingerprint"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"unreadable m3connect fingerprint in the collection: {exc}") from None

    # --- writing --------------------------------------------------------------------------

    def _payload(self, doc_id: DocId, text: str | None, metadata: dict[str, Any]) -> dict[str, Any]:
        return {
            "doc_id": str(doc_id),
            "doc_id_type": "int" if isinstance(doc_id, int) else "str",
            "text": text,
            "metadata": metadata,
            **self._dialect.extra_payload(metadata),
        }

    def _prepare(self, ids, embeddings, texts, metadatas) -> PreparedBatch:  # type: ignore[no-untyped-def]
        """Validate everything the database could refuse, before anything is written: the
        core's validation (JSON metadata, 64-bit ints, token ids in [0, 2^32)) covers Qdrant."""
        return self.prepare_batch(ids, embeddings, texts, metadatas)

    def _one_request(self, batch: PreparedBatch) -> bool:
        """Whether ``batch`` is written in one request (applied whole or not at all)."""
        chunks = self._chunks(batch)
        next(chunks, None)
        return next(chunks, None) is None

    def _chunks(self, batch: PreparedBatch) -> Iterator[list[int]]:
        """Row indices of each write request: at most ``batch_size`` points and about
        ``batch_max_floats`` vector components (a larger point travels alone)."""
        dense_dim = batch.embeddings.dense.shape[1] if len(batch.ids) else 0  # type: ignore[union-attr]
        chunk: list[int] = []
        floats = 0
        for i, matrix in enumerate(batch.embeddings.colbert or []):
            size = dense_dim + matrix.size + 2 * len(batch.embeddings.sparse[i])  # type: ignore[index]
            if chunk and (len(chunk) >= self.batch_size or floats + size > self.batch_max_floats):
                yield chunk
                chunk, floats = [], 0
            chunk.append(i)
            floats += size
        if chunk:
            yield chunk

    def _points(
        self,
        batch: PreparedBatch,
        rows: Sequence[int],
        extras: Sequence[Mapping[str, Any]] | None = None,
        colbert: Sequence[np.ndarray] | None = None,
    ) -> list[Any]:
        """The points of ``rows``; ``extras`` adds to each one's payload; ``colbert`` gives
        their ColBERT matrices already in float32."""
        d = self._dialect
        emb = batch.embeddings
        points = []
        for j, i in enumerate(rows):
            weights = emb.sparse[i]  # type: ignore[index]
            # Nested lists of Python floats are the fastest input the clients take (a numpy
            # array is read element by element through the sequence protocol, ~2x slower).
            matrix = (
                colbert[j] if colbert is not None else emb.colbert[i].astype(np.float32)  # type: ignore[index]
            )
            if len(matrix):
                squares = np.einsum("ij,ij->i", matrix, matrix)
                self._colbert_row_norm = max(self._colbert_row_norm, float(squares.max()) ** 0.5)
            vectors: dict[str, Any] = {
                self.names["dense"]: emb.dense[i].tolist(),  # type: ignore[index]
                self.names["colbert"]: matrix.tolist(),
            }
            if weights:  # an empty sparse part is no sparse vector (Qdrant refuses empty ones)
                vectors[self.names["sparse"]] = d.sparse_vector(
                    list(weights), list(weights.values())
                )
            doc_id = batch.ids[i]
            payload = self._payload(doc_id, batch.texts[i], batch.metadatas[i])
            if extras is not None:
                payload.update(extras[j])
            points.append(d.point(point_id(doc_id), vectors, payload))
        return points

    # --- reading --------------------------------------------------------------------------

    def _vector_names(self, parts: Sequence[str]) -> list[str]:
        return [self.names[p] for p in parts]

    def _embedding(self, vectors: Mapping[str, Any] | None) -> M3Embedding:
        vectors = vectors or {}
        colbert = np.asarray(vectors[self.names["colbert"]], dtype=np.float32)
        return M3Embedding(
            dense=np.asarray(vectors[self.names["dense"]], dtype=np.float32),
            sparse=_sparse_dict(vectors.get(self.names["sparse"])),
            colbert=colbert.astype(self.colbert_dtype, copy=False),
        )

    @staticmethod
    def _doc_id(payload: Mapping[str, Any]) -> DocId:
        raw = payload["doc_id"]
        return int(raw) if payload.get("doc_id_type") == "int" else str(raw)

    def _record(self, payload: Mapping[str, Any], vectors: Any, with_vectors: bool) -> Record:
        return Record(
            self._doc_id(payload),
            payload.get("text"),
            dict(payload.get("metadata") or {}),
            self._embedding(vectors) if with_vectors else None,
        )

    def _records(
        self, ids: Sequence[DocId], found: Sequence[Any], with_vectors: bool
    ) -> list[Record]:
        by_point = {}
        for point in found:
            payload = point.payload or {}
            if "doc_id" in payload:
                by_point[point_id(self._doc_id(payload))] = (payload, point.vector)
        records = []
        for doc_id in ids:
            hit = by_point.get(point_id(doc_id)) if _valid_id(doc_id) else None
            if hit is not None:
                records.append(self._record(hit[0], hit[1], with_vectors))
        return records

    def _scrolled(self, points: Sequence[Any], with_vectors: bool) -> Iterator[Record]:
        """Records of scrolled points (the reserved point, without ``doc_id``, left out)."""
        for point in points:
            payload = point.payload or {}
            if "doc_id" in payload:
                yield self._record(payload, point.vector, with_vectors)

    @staticmethod
    def _point_ids(ids: Sequence[DocId]) -> list[str]:
        return list(dict.fromkeys(point_id(i) for i in ids if _valid_id(i)))

    # --- filters --------------------------------------------------------------------------

    def accepts_raw_filter(self, raw: RawFilter) -> bool:
        return self._dialect.is_filter(raw.value)

    def _filter(self, spec: FilterLike, *, everything: bool = False, search: bool = False) -> Any:
        """The database filter of ``spec`` (``None``: no condition). ``everything``: an empty
        filter means all documents (delete). Counts and deletes leave the reserved point out;
        searches never see it (it has no vectors)."""
        d = self._dialect
        node = parse_filter(spec)
        if isinstance(node, RawFilter):
            if not self.accepts_raw_filter(node):
                raise StoreError(f"{type(self).__name__} cannot use the raw filter {node.value!r}")
            condition = node.value
        else:
            condition = None if node is None else translate_filter(node, d)
        if self._reserved and not search:
            return d.filter(
                must=[condition] if condition is not None else [],
                must_not=[d.has_id([RESERVED_POINT_ID])],
            )
        if condition is None and everything:
            return d.filter()
        if condition is not None and not d.is_filter(condition):
            condition = d.filter(must=[condition])
        return condition

    # --- searching ------------------------------------------------------------------------

    def _query_vectors(self, query: M3Embedding, params: SearchParams) -> _QueryVectors:
        """The query's vectors as the request needs them (only the parts it uses)."""
        sparse = None
        if query.sparse is not None and "sparse" in params.scored_parts:
            items = [(int(t), float(w)) for t, w in query.sparse.items() if float(w) != 0.0]
            bad = [t for t, _ in items if not 0 <= t <= _MAX_TOKEN_ID]
            if bad:
                raise StoreError(
                    f"sparse token ids of the query must be in [0, 2^32), got {bad[:3]}"
                )
            if items:
                sparse = ([t for t, _ in items], [w for _, w in items])
        n_colbert = 0 if query.colbert is None else int(np.shape(query.colbert)[0])
        return _QueryVectors(query, sparse, n_colbert)

    def _ranker(
        self, params: SearchParams, qv: _QueryVectors
    ) -> tuple[_Stage, str | None, float] | None:
        """The stage that ranks the legs' documents (fused where there are several), the part
        whose score its score is (if one), and the factor from its score to the contract's;
        ``None`` where no leg can match (sparse alone, and a query without a token)."""
        legs = [leg for leg in params.legs if qv.usable(leg)]
        if not legs:
            return None
        if len(params.legs) == 1:
            return _Stage(_Nearest(legs[0])), legs[0], qv.factor(legs[0])
        sources = [_Stage(_Nearest(leg), limit=params.leg_limit) for leg in legs]
        if params.fusion == "rrf":
            k = float(params.rrf_k)
            if k.is_integer():
                return _Stage(_Fuse("rrf", k=int(k) + 1), sources), None, 1.0
            # Qdrant's weighted RRF with k=2 is w / (rank + w): w = rrf_k gives rrf_k times
            # the contract's 1 / (rrf_k + rank).
            return _Stage(_Fuse("rrf", k=2, weights=[k] * len(sources)), sources), None, 1.0 / k
        if params.fusion == "dbsf":
            return _Stage(_Fuse("dbsf"), sources), None, 1.0
        union = params.leg_limit * len(sources)
        weights = list(zip(params.legs, params.leg_weights, strict=False))
        return _rescore(qv, weights, sources, union), None, 1.0

    def _plan(self, params: SearchParams, qv: _QueryVectors) -> _Plan | None:
        """The one request that answers ``params`` (``None``: nothing can match)."""
        usable, colbert_factor = qv.usable, qv.factor
        ranked = self._ranker(params, qv)
        if ranked is None:
            return None
        ranker, final_part, scale = ranked

        if params.rerank is None:
            ranker.limit = params.k
            top = ranker
        else:
            ranker.limit = params.candidates
            scale = 1.0
            if params.rerank == "colbert":
                top = _Stage(_Nearest("colbert"), [ranker], params.k)
                final_part, scale = "colbert", colbert_factor("colbert")
            else:
                top = _rescore(
                    qv,
                    list(zip(LEG_NAMES, params.weights, strict=False)),
                    [ranker],
                    params.candidates,
                )
                top.limit = params.k
                final_part = None
        known = {final_part} if final_part is not None else set()
        if self.sparse_idf:
            known.discard("sparse")  # Qdrant's IDF-weighted score is not the lexical score
        recompute = None
        # Where the engine's half-precision MaxSim is within the tolerance for this query, it
        # is the exact score (no vectors fetched); else the hits are re-scored here.
        rescore_half = self._half_colbert and not self._half_maxsim_within_tolerance(qv)
        if rescore_half:
            # The engine's MaxSim is that of the float16-rounded query: where it makes the final
            # score, score the hits exactly here, re-sort, and ask for a few more to re-sort.
            if final_part == "colbert":
                recompute = ("part", "colbert")
            elif params.rerank == "all" and params.weights[2] > 0:
                recompute = ("all", params.weights)
            elif (
                params.rerank is None
                and len(params.legs) > 1
                and params.fusion == "weighted"
                and dict(zip(params.legs, params.leg_weights, strict=False)).get("colbert", 0) > 0
            ):
                recompute = ("weighted", params.legs, params.leg_weights)
            if recompute is not None:
                known.discard("colbert")
                top.limit = params.k + _HALF_MARGIN
        needed = [p for p in params.scored_parts if p not in known]
        # A real engine's half-precision MaxSim within the tolerance is scored by id as well.
        half_ok = self._half_colbert and not rescore_half
        by_id = tuple(
            p
            for p in needed
            if (self._score_by_id(p) or (p == "colbert" and half_ok)) and usable(p)
        )
        fetch = tuple(p for p in needed if p not in by_id)
        return _Plan(top, final_part, scale, fetch, recompute, params.k, by_id)

    def _half_maxsim_within_tolerance(self, qv: _QueryVectors) -> bool:
        """Whether the engine's MaxSim with the query rounded to float16 stays within
        :data:`HALF_MAXSIM_TOLERANCE` of the float32 reference.

        Rounding query row ``q`` to float16 leaves a residual ``r``; each similarity moves by
        ``r . d``, and the score (a mean of maxima) by no more than the largest such move. For
        a document row ``d`` of norm ``R`` in ``D`` dimensions, ``r . d`` has a standard
        deviation of about ``|r| R / sqrt(D)`` (the residual's direction is unrelated to the
        document's): the engine counts as exact when six of them fit in the tolerance. With
        BGE-M3 (D = 1024, unit rows) that is ~3e-5 (measured errors: below 1e-5); with a
        dozen dimensions it is not, and the hits are re-scored.
        """
        colbert = qv.query.colbert
        if colbert is None or qv.n_colbert == 0:
            return True
        q = np.asarray(colbert, dtype=np.float32)
        residual = q - q.astype(np.float16).astype(np.float32)
        spread = float(np.linalg.norm(residual, axis=1).max()) * self._colbert_row_norm
        return 6.0 * spread / np.sqrt(q.shape[1]) <= HALF_MAXSIM_TOLERANCE

    def _score_by_id(self, part: str) -> bool:
        """Whether the engine gives ``part`` 's exact score of a few ids cheaply: not the
        IDF-weighted sparse score, not half-precision MaxSim (local mode: never, it scores
        every point of the collection for any request)."""
        if part == "sparse":
            return not self.sparse_idf
        if part == "colbert":
            return not self._half_colbert
        return True

    def _by_id_requests(self, plan: _Plan, qv: _QueryVectors, points: Sequence[Any]) -> list[Any]:
        """The second requests of a plan (sent as one batch): each ``by_id`` part's score of
        the hits, scored by the engine over just their ids (tiny answers, no vectors)."""
        if not plan.by_id:
            return []
        ids = [str(point.id) for point in points]
        if not ids:
            return []
        only = self._dialect.filter(must=[self._dialect.has_id(ids)])
        return [
            self._dialect.batch_item(
                _Stage(_Nearest(part), limit=len(ids)),
                qv,
                self.names,
                only,
                self._dialect.search_params(True, None) if self._params_allowed() else None,
            )
            for part in plan.by_id
        ]

    def _request(self, plan: _Plan, qv: _QueryVectors, query_filter: Any) -> Any:
        return self._stage_request(plan.top, qv, query_filter, plan.fetch_parts)

    def _stage_request(
        self, top: _Stage, qv: _QueryVectors, query_filter: Any, fetch_parts: Sequence[str] = ()
    ) -> Any:
        """The query request for ``top``, returning the vectors of ``fetch_parts``."""
        params = (
            self._dialect.search_params(self.exact, self.hnsw_ef) if self._use_params() else None
        )
        return self._dialect.request(
            top, qv, self.names, query_filter, params, self._vector_names(fetch_parts)
        )

    def _use_params(self) -> bool:
        return self._params_allowed() and (self.exact or self.hnsw_ef is not None)

    def _params_allowed(self) -> bool:
        return True

    def _hits(
        self,
        query: M3Embedding,
        params: SearchParams,
        plan: _Plan,
        points: Sequence[Any],
        by_id: Sequence[Sequence[Any]] = (),
        known: Mapping[str, Sequence[float]] | None = None,
    ) -> list[Hit]:
        """Hits from the engine's points; ``known`` holds parts' exact scores of the points
        computed already (ColBERT from a row file)."""
        if not points:
            return []
        payloads = [point.payload or {} for point in points]
        scored_parts = params.scored_parts
        ids = [self._doc_id(payload) for payload in payloads]
        finals = [float(point.score) * plan.scale for point in points]
        # Each hit's exact score of every part: the final score where it is one, else the
        # engine's score of the hit by id, else the core's scoring of the hit's vectors.
        parts: dict[str, list[float]] = {p: list(v) for p, v in (known or {}).items()}
        if plan.final_part is not None and plan.final_part not in plan.fetch_parts:
            parts[plan.final_part] = finals
        if plan.fetch_parts:
            vectors = [point.vector or {} for point in points]
            for part in plan.fetch_parts:
                parts[part] = self._part_scores(query, part, vectors)
        point_ids = [str(point.id) for point in points] if plan.by_id else []
        for part, answer in zip(plan.by_id, by_id, strict=True):
            factor = 1.0 / len(query.colbert) if part == "colbert" else 1.0  # type: ignore[arg-type]
            engine = {str(p.id): float(p.score) * factor for p in answer}
            if part == "sparse":  # a document that shares no token is not returned: score 0
                parts[part] = [engine.get(pid, 0.0) for pid in point_ids]
                continue
            try:
                parts[part] = [engine[pid] for pid in point_ids]
            except KeyError:
                raise StoreError("a document vanished from the store during the search") from None
        table = {doc_id: {p: parts[p][i] for p in scored_parts} for i, doc_id in enumerate(ids)}
        order = range(len(ids))
        if plan.recompute is not None:
            finals = [_recompute(plan.recompute, table[doc_id]) for doc_id in ids]
            order = sorted(order, key=lambda i: -finals[i])[: plan.k]
        return [
            Hit(
                ids[i],
                finals[i],
                table[ids[i]],
                payloads[i].get("text"),
                dict(payloads[i].get("metadata") or {}),
            )
            for i in order
        ]

    def _part_scores(
        self, query: M3Embedding, part: str, vectors: Sequence[Mapping[str, Any]]
    ) -> list[float]:
        """The core's exact ``part`` score of each returned vector set."""
        if not vectors:
            return []
        name = self.names[part]
        if part == "dense":
            matrix = np.asarray([v[name] for v in vectors], dtype=np.float32)
            values = dense_scores(query.dense, matrix)  # type: ignore[arg-type]
        elif part == "sparse":
            docs = [_sparse_dict(v.get(name)) for v in vectors]
            values = lexical_scores(query.sparse, docs)  # type: ignore[arg-type]
        else:
            matrices = [np.asarray(v[name], dtype=np.float32) for v in vectors]
            values = colbert_scores(query.colbert, matrices)  # type: ignore[arg-type]
        return [float(x) for x in values]


def _sparse_dict(vector: Any) -> dict[int, float]:
    if vector is None:
        return {}
    return dict(zip(vector.indices, vector.values, strict=True))


def _recompute(how: tuple[Any, ...], scores: Mapping[str, float]) -> float:
    if how[0] == "part":
        return scores[how[1]]
    if how[0] == "all":
        return float(combine_scores(scores["dense"], scores["sparse"], scores["colbert"], how[1]))
    legs, weights = how[1], how[2]
    return sum(w * scores[leg] for leg, w in zip(legs, weights, strict=False) if w > 0) / float(
        sum(weights)
    )


# --- filter translation ------------------------------------------------------------------------


def metadata_path(key: str, root: str = "metadata") -> str:
    """The payload path of metadata key ``key``: ``metadata.key``, quoted when needed."""
    if all(c.isalnum() or c in "_-" for c in key):
        return f"{root}.{key}"
    if '"' in key:
        raise StoreError(f"Qdrant cannot filter on a metadata key with a double quote: {key!r}")
    return f'{root}."{key}"'


def translate_filter(node: Filter, d: _Dialect) -> Any:
    """The core filter tree as Qdrant conditions, with the reference semantics of
    :func:`m3connect.filters.matches` (a stored list matches when any element does)."""
    if isinstance(node, Eq):
        return _equal(metadata_path(node.key), node.value, d)
    if isinstance(node, In):
        path = metadata_path(node.key)
        # Deduplicate by type and value: 1, 1.0 and True are one dict key in Python.
        values = list({(type(v), v): v for v in node.values}.values())
        strings = [v for v in values if isinstance(v, str)]
        others = [v for v in values if not isinstance(v, str)]
        conditions = [d.match_any(path, strings)] if strings else []
        conditions += [_equal(path, v, d) for v in others]
        return conditions[0] if len(conditions) == 1 else d.filter(should=conditions)
    if isinstance(node, Range):
        return d.range(metadata_path(node.key), gt=node.gt, gte=node.gte, lt=node.lt, lte=node.lte)
    if isinstance(node, And):
        return d.filter(must=[translate_filter(c, d) for c in node.filters])
    if isinstance(node, Or):
        return d.filter(should=[translate_filter(c, d) for c in node.filters])
    if isinstance(node, Not):
        return d.filter(must_not=[translate_filter(node.filter, d)])
    raise StoreError(f"not a filter node: {node!r}")


def _equal(path: str, value: Any, d: _Dialect) -> Any:
    # Qdrant matches strings, ints and bools exactly (bool and int apart), never floats; a
    # closed range on a number matches ints and floats alike, as 1 == 1.0 in the reference.
    if isinstance(value, bool):
        return d.match_bool(path, value)
    if isinstance(value, str):
        return d.match_value(path, value)
    if isinstance(value, int) and abs(value) > _MAX_EXACT_FLOAT_INT:
        return d.match_value(path, value)  # a range would round it to a float
    return d.range(path, gte=value, lte=value)


# --- the two spellings of the API ------------------------------------------------------------


class _Dialect:
    """How one Qdrant API spells conditions, vectors, points and query requests."""

    def match_value(self, key: str, value: Any) -> Any:
        raise NotImplementedError

    def match_bool(self, path: str, value: bool) -> Any:
        return self.match_value(path, value)

    def extra_payload(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        """Payload fields besides the document's own (none, unless filters need them)."""
        return {}

    def match_any(self, key: str, values: list[str]) -> Any:
        raise NotImplementedError

    def range(self, key: str, **bounds: float | None) -> Any:
        raise NotImplementedError

    def has_id(self, ids: list[str]) -> Any:
        raise NotImplementedError

    def filter(
        self, must: list | None = None, should: list | None = None, must_not: list | None = None
    ) -> Any:
        raise NotImplementedError

    def is_filter(self, value: Any) -> bool:
        raise NotImplementedError

    def sparse_vector(self, indices: list[int], values: list[float]) -> Any:
        raise NotImplementedError

    def point(self, pid: str, vectors: dict[str, Any], payload: dict[str, Any]) -> Any:
        raise NotImplementedError

    def search_params(self, exact: bool, hnsw_ef: int | None) -> Any:
        raise NotImplementedError

    def request(
        self,
        top: _Stage,
        qv: _QueryVectors,
        names: Mapping[str, str],
        query_filter: Any,
        params: Any,
        with_vectors: list[str],
    ) -> Any:
        raise NotImplementedError

    def batch_item(
        self,
        top: _Stage,
        qv: _QueryVectors,
        names: Mapping[str, str],
        query_filter: Any,
        params: Any,
    ) -> Any:
        """A request of a batch, answered with ids and scores only."""
        raise NotImplementedError

    @staticmethod
    def _vector(part: str, qv: _QueryVectors, sparse_vector: Any) -> Any:
        if part != "sparse":
            return qv.as_list(part)
        assert qv.sparse is not None
        return sparse_vector(*qv.sparse)


class _ClientDialect(_Dialect):
    """qdrant-client's pydantic models (server, Cloud and local mode)."""

    def __init__(self) -> None:
        from qdrant_client import models

        self.m = models

    def match_value(self, key, value):  # type: ignore[no-untyped-def]
        return self.m.FieldCondition(key=key, match=self.m.MatchValue(value=value))

    def match_any(self, key, values):  # type: ignore[no-untyped-def]
        return self.m.FieldCondition(key=key, match=self.m.MatchAny(any=values))

    def range(self, key, **bounds):  # type: ignore[no-untyped-def]
        return self.m.FieldCondition(key=key, range=self.m.Range(**bounds))

    def has_id(self, ids):  # type: ignore[no-untyped-def]
        return self.m.HasIdCondition(has_id=ids)

    def filter(self, must=None, should=None, must_not=None):  # type: ignore[no-untyped-def]
        return self.m.Filter(must=must or None, should=should or None, must_not=must_not or None)

    def is_filter(self, value):  # type: ignore[no-untyped-def]
        return isinstance(value, self.m.Filter)

    def sparse_vector(self, indices, values):  # type: ignore[no-untyped-def]
        return self.m.SparseVector(indices=indices, values=values)

    def point(self, pid, vectors, payload):  # type: ignore[no-untyped-def]
        return self.m.PointStruct(id=pid, vector=vectors, payload=payload)

    def search_params(self, exact, hnsw_ef):  # type: ignore[no-untyped-def]
        return self.m.SearchParams(exact=exact, hnsw_ef=hnsw_ef)

    def _query(
        self, stage: _Stage, qv: _QueryVectors, names: Mapping[str, str]
    ) -> tuple[Any, str | None]:
        m = self.m
        q = stage.query
        if isinstance(q, _Nearest):
            vector = self._vector(q.part, qv, self.sparse_vector)
            return m.NearestQuery(nearest=vector), names[q.part]
        if isinstance(q, _Fuse):
            if q.method == "dbsf":
                return m.FusionQuery(fusion=m.Fusion.DBSF), None
            return m.RrfQuery(rrf=m.Rrf(k=q.k, weights=q.weights)), None
        terms = [m.MultExpression(mult=[coef, f"$score[{i}]"]) for i, coef in q.terms]
        formula = m.SumExpression(sum=terms) if terms else 0.0
        defaults = {f"$score[{i}]": 0.0 for i in range(len(stage.sources))}
        return m.FormulaQuery(formula=formula, defaults=defaults), None

    def _prefetch(self, stage, qv, names, query_filter, params):  # type: ignore[no-untyped-def]
        query, using = self._query(stage, qv, names)
        nearest = isinstance(stage.query, _Nearest)
        return self.m.Prefetch(
            query=query,
            using=using,
            prefetch=[self._prefetch(s, qv, names, query_filter, params) for s in stage.sources]
            or None,
            filter=query_filter,
            params=params if nearest else None,
            limit=stage.limit,
        )

    def request(self, top, qv, names, query_filter, params, with_vectors):  # type: ignore[no-untyped-def]
        query, using = self._query(top, qv, names)
        return {
            "query": query,
            "using": using,
            "prefetch": [self._prefetch(s, qv, names, query_filter, params) for s in top.sources]
            or None,
            "query_filter": query_filter,
            "search_params": params if isinstance(top.query, _Nearest) else None,
            "limit": top.limit,
            "with_payload": True,
            "with_vectors": with_vectors or False,
        }

    def batch_item(self, top, qv, names, query_filter, params):  # type: ignore[no-untyped-def]
        request = self.request(top, qv, names, query_filter, params, [])
        return self.m.QueryRequest(
            query=request["query"],
            using=request["using"],
            prefetch=request["prefetch"],
            filter=query_filter,
            params=request["search_params"],
            limit=top.limit,
            with_payload=False,
            with_vector=False,
        )

    # --- schema ---------------------------------------------------------------------------

    def schema(self, info: Any) -> _Schema:
        params = info.config.params
        vectors = params.vectors
        out = _Schema({}, {})
        if vectors is not None and not isinstance(vectors, Mapping):
            out.unnamed = True
            vectors = {}
        for name, spec in (vectors or {}).items():
            mv = spec.multivector_config
            out.vectors[name] = _VectorSpec(
                size=int(spec.size),
                distance=_lower(spec.distance) or "",
                comparator=_lower(mv.comparator) if mv is not None else None,
                datatype=_lower(spec.datatype),
            )
        for name, spec in (params.sparse_vectors or {}).items():
            modifier = _lower(getattr(spec, "modifier", None))
            out.sparse[name] = None if modifier in (None, "none") else modifier
        return out

    def create_kwargs(self, store: _QdrantBase) -> dict[str, Any]:
        m = self.m
        fp = store.fingerprint
        assert fp is not None
        colbert = m.VectorParams(
            size=fp.colbert_dim,
            distance=m.Distance.DOT,
            multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM),
            hnsw_config=None if store.colbert_hnsw else m.HnswConfigDiff(m=0),
            datatype=m.Datatype.FLOAT16 if store.colbert_dtype == np.float16 else None,
        )
        return {
            "vectors_config": {
                store.names["dense"]: m.VectorParams(size=fp.dense_dim, distance=m.Distance.DOT),
                store.names["colbert"]: colbert,
            },
            "sparse_vectors_config": {
                store.names["sparse"]: m.SparseVectorParams(
                    modifier=m.Modifier.IDF if store.sparse_idf else None
                )
            },
        }


class _EdgeDialect(_Dialect):
    """qdrant-edge's objects (the Qdrant engine in-process)."""

    def __init__(self) -> None:
        import qdrant_edge

        self.e = qdrant_edge

    def match_value(self, key, value):  # type: ignore[no-untyped-def]
        return self.e.FieldCondition(key, match=self.e.MatchValue(value))

    # qdrant-edge-py 0.9 turns MatchValue(True) into MatchValue(1) (which matches the int 1,
    # never a bool), so booleans are matched on a shadow field of "true" / "false" strings.
    BOOLS = "metadata_bools"

    def match_bool(self, path, value):  # type: ignore[no-untyped-def]
        shadow = self.BOOLS + path[len("metadata") :]
        return self.match_value(shadow, "true" if value else "false")

    def extra_payload(self, metadata):  # type: ignore[no-untyped-def]
        bools = {}
        for key, value in metadata.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            found = [("true" if v else "false") for v in values if isinstance(v, bool)]
            if found:
                bools[key] = found
        return {self.BOOLS: bools} if bools else {}

    def match_any(self, key, values):  # type: ignore[no-untyped-def]
        return self.e.FieldCondition(key, match=self.e.MatchAny(values))

    def range(self, key, **bounds):  # type: ignore[no-untyped-def]
        bounds = {k: None if v is None else float(v) for k, v in bounds.items()}
        return self.e.FieldCondition(key, range=self.e.RangeFloat(**bounds))

    def has_id(self, ids):  # type: ignore[no-untyped-def]
        return self.e.HasIdCondition(set(ids))

    def filter(self, must=None, should=None, must_not=None):  # type: ignore[no-untyped-def]
        return self.e.Filter(must=must or None, should=should or None, must_not=must_not or None)

    def is_filter(self, value):  # type: ignore[no-untyped-def]
        return isinstance(value, self.e.Filter)

    def sparse_vector(self, indices, values):  # type: ignore[no-untyped-def]
        return self.e.SparseVector(indices=indices, values=values)

    def point(self, pid, vectors, payload):  # type: ignore[no-untyped-def]
        return self.e.Point(pid, vectors, payload)

    def search_params(self, exact, hnsw_ef):  # type: ignore[no-untyped-def]
        return self.e.SearchParams(hnsw_ef=hnsw_ef, exact=exact)

    def _query(self, stage: _Stage, qv: _QueryVectors, names: Mapping[str, str]) -> Any:
        e = self.e
        q = stage.query
        if isinstance(q, _Nearest):
            return e.Query.Nearest(
                self._vector(q.part, qv, self.sparse_vector), using=names[q.part]
            )
        if isinstance(q, _Fuse):
            if q.method == "dbsf":
                return e.Fusion.Dbsf()
            return e.Fusion.Rrf(k=q.k, weights=q.weights)
        x = e.Expression
        terms = [x.Mult([x.Constant(coef), x.Variable(f"$score[{i}]")]) for i, coef in q.terms]
        formula = x.Sum(terms) if terms else x.Constant(0.0)
        return e.Formula(formula, defaults={f"$score[{i}]": 0.0 for i in range(len(stage.sources))})

    def _prefetch(self, stage, qv, names, query_filter, params):  # type: ignore[no-untyped-def]
        return self.e.Prefetch(
            limit=stage.limit,
            query=self._query(stage, qv, names),
            prefetches=[self._prefetch(s, qv, names, query_filter, params) for s in stage.sources]
            or None,
            params=params if isinstance(stage.query, _Nearest) else None,
            filter=query_filter,
        )

    def request(self, top, qv, names, query_filter, params, with_vectors, with_payload=True):  # type: ignore[no-untyped-def]
        return self.e.QueryRequest(
            limit=top.limit,
            query=self._query(top, qv, names),
            prefetches=[self._prefetch(s, qv, names, query_filter, params) for s in top.sources]
            or None,
            with_vector=with_vectors or False,
            with_payload=with_payload,
            filter=query_filter,
            params=params if isinstance(top.query, _Nearest) else None,
        )

    def batch_item(self, top, qv, names, query_filter, params):  # type: ignore[no-untyped-def]
        return self.request(top, qv, names, query_filter, params, [], with_payload=False)

    def schema(self, config: Mapping[str, Any]) -> _Schema:
        out = _Schema({}, {})
        vectors = config.get("vectors") or {}
        if "size" in vectors:  # a single unnamed vector
            out.unnamed = True
            vectors = {}
        for name, spec in vectors.items():
            out.vectors[name] = _VectorSpec(
                size=int(spec["size"]),
                distance=_lower(spec.get("distance")) or "",
                comparator=_lower((spec.get("multivector_config") or {}).get("comparator")),
                datatype=_lower(spec.get("datatype")),
            )
        for name, spec in (config.get("sparse_vectors") or {}).items():
            modifier = _lower((spec or {}).get("modifier"))
            out.sparse[name] = None if modifier in (None, "none") else modifier
        return out

    def config(self, store: _QdrantBase) -> Any:
        e = self.e
        fp = store.fingerprint
        assert fp is not None
        colbert = e.EdgeVectorParams(
            fp.colbert_dim,
            e.Distance.Dot,
            multivector_config=e.MultiVectorConfig(e.MultiVectorComparator.MaxSim),
            datatype=e.VectorStorageDatatype.Float16 if store.colbert_dtype == np.float16 else None,
            hnsw_config=None
            if store.colbert_hnsw
            else e.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000),
            # The ColBERT matrices are most of the bytes (128 x 1024 per chunk): memory-mapped
            # and not preloaded, so RAM does not grow with the shard.
            memory=e.Memory.Cold,
        )
        return e.EdgeConfig(
            payload_memory=e.Memory.Cold,
            vectors={
                store.names["dense"]: e.EdgeVectorParams(fp.dense_dim, e.Distance.Dot),
                store.names["colbert"]: colbert,
            },
            sparse_vectors={
                store.names["sparse"]: e.EdgeSparseVectorParams(
                    modifier=e.Modifier.Idf if store.sparse_idf else None
                )
            },
        )


# --- qdrant-client stores --------------------------------------------------------------------


def _is_local(client: Any) -> bool:
    options = getattr(client, "init_options", None) or {}
    return options.get("location") == ":memory:" or options.get("path") is not None


class _ClientStoreBase(_QdrantBase):
    _dialect: _ClientDialect

    def __init__(
        self, client: Any, collection: str = "m3connect", encoder=None, **options: Any
    ) -> None:  # type: ignore[no-untyped-def]
        super().__init__(collection, encoder, **options)
        self.client = client
        self._dialect = _ClientDialect()
        # Local mode is brute force (exact) and warns about search params it ignores.
        self._local = _is_local(client)

    def _params_allowed(self) -> bool:
        return not self._local  # local mode is brute force and warns about search params

    def _score_by_id(self, part: str) -> bool:
        return not self._local and super()._score_by_id(part)

    def _engine_uses_datatype(self) -> bool:
        return not self._local  # local mode stores float32 whatever the datatype says

    def _stored_metadata(self, info: Any) -> tuple[ModelFingerprint | None, bool]:
        """The fingerprint in the collection metadata, and whether the metadata exists at all."""
        metadata = getattr(info.config, "metadata", None)
        if not isinstance(metadata, Mapping):
            return None, False
        return self._fingerprint_from(metadata.get(METADATA_KEY)), True

    def _reserved_fingerprint(self, records: Sequence[Any]) -> ModelFingerprint | None:
        for record in records:
            info = (record.payload or {}).get(METADATA_KEY)
            fp = self._fingerprint_from(info)
            if fp is not None:
                self._reserved = True
                return fp
        return None

    def _reserved_point(self) -> Any:
        return self._dialect.point(RESERVED_POINT_ID, {}, {METADATA_KEY: self._info_payload()})


class _SyncWrites(_QdrantBase):
    """What the two sync stores (client and qdrant-edge) share: attach on first use, and an add
    under the write protocol (a failed multi-request add is undone)."""

    def _ensure(self) -> bool:
        if not self._ready:
            self._attach()
        return self._ready

    def add(
        self,
        ids: Sequence[DocId],
        embeddings: M3Output,
        texts: Sequence[str | None] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        batch = self._prepare(ids, embeddings, texts, metadatas)
        if not batch.ids:
            return
        if not self._ready:
            self._fingerprint_known = True  # learned from this batch
            self._attach()
        run_direct(
            write_or_roll_back(
                batch,
                self._write_points,  # type: ignore[attr-defined]
                direct(lambda ids: self.get(ids, with_vectors=True)),  # type: ignore[attr-defined]
                direct(self.delete),  # type: ignore[attr-defined]
                atomic=self._one_request(batch),
            )
        )


class QdrantStore(_SyncWrites, _ClientStoreBase, M3Store):
    """A BGE-M3 store in a Qdrant collection, through :class:`qdrant_client.QdrantClient`.

    ``client``: a ``QdrantClient`` (server URL, Qdrant Cloud, ``":memory:"`` or ``path=``);
    the store does not close it unless ``close_client=True``. ``collection`` is created on the
    first write (or now, when the fingerprint is known), or attached and checked when it exists
    (vector names, dimensions, distances, comparator, IDF modifier, model fingerprint).

    Options: ``fingerprint`` / ``colbert_dtype`` / ``max_colbert_vectors`` as in every store;
    ``dense_name`` / ``sparse_name`` / ``colbert_name``: the vector names (to attach to an
    existing collection); ``sparse_idf``: Qdrant's IDF modifier on the sparse vector (scores are
    then not the reference's lexical scores); ``colbert_hnsw``: build an HNSW graph for the
    multivector (off: it only re-ranks, or is searched by brute force); ``exact``: brute-force
    dense search instead of HNSW (exact answers; slow on large collections); ``hnsw_ef``;
    ``exact_float16``: re-score half-precision ColBERT exactly (see the module notes);
    ``batch_size`` / ``batch_max_floats``: points and vector components per write request
    (ColBERT matrices are large; Qdrant refuses requests over 32 MB by default).
    """

    def __init__(
        self,
        client: QdrantClient,
        collection: str = "m3connect",
        encoder: M3Encoder | None = None,
        *,
        close_client: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(client, collection, encoder, **options)
        self._close_client = close_client
        self._attach()

    # --- collection -----------------------------------------------------------------------

    def _attach(self) -> None:
        if not self.client.collection_exists(self.collection):
            if self.fingerprint is not None and self._fingerprint_known:
                self._create()
            return
        info = self.client.get_collection(self.collection)
        self._check_schema(self._dialect.schema(info))
        stored, _ = self._stored_metadata(info)
        if stored is None:
            stored = self._reserved_fingerprint(
                self.client.retrieve(self.collection, [RESERVED_POINT_ID], with_payload=True)
            )
        if self._adopt_fingerprint(stored):
            self._store_fingerprint(has_metadata_api=True)
        self._check_schema(self._dialect.schema(info))  # dimensions of the adopted fingerprint
        self._ready = True

    def _create(self) -> None:
        kwargs = self._dialect.create_kwargs(self)
        try:
            self.client.create_collection(
                self.collection, metadata={METADATA_KEY: self._info_payload()}, **kwargs
            )
        except (TypeError, AssertionError):  # a qdrant-client without collection metadata
            self.client.create_collection(self.collection, **kwargs)
        info = self.client.get_collection(self.collection)
        self._check_schema(self._dialect.schema(info))
        if self._stored_metadata(info)[0] is None:  # no metadata, or a server that drops it
            self._store_fingerprint(has_metadata_api=False)
        self._ready = True

    def _store_fingerprint(self, has_metadata_api: bool) -> None:
        if has_metadata_api:
            try:
                self.client.update_collection(
                    self.collection, metadata={METADATA_KEY: self._info_payload()}
                )
                info = self.client.get_collection(self.collection)
                if self._stored_metadata(info)[0] is not None:
                    return
            except (TypeError, AssertionError):
                pass
        self.client.upsert(self.collection, [self._reserved_point()], wait=True)
        self._reserved = True

    def _write_points(self, batch: PreparedBatch) -> Generator[Any, Any, None]:
        yield from ()
        for rows in self._chunks(batch):
            self.client.upsert(self.collection, self._points(batch, rows), wait=True)

    def get(self, ids: Sequence[DocId], *, with_vectors: bool = False) -> list[Record]:
        ids = id_list(ids)
        point_ids = self._point_ids(ids)
        if not point_ids or not self._ensure():
            return []
        found = self.client.retrieve(
            self.collection,
            point_ids,
            with_payload=True,
            with_vectors=self._vector_names(LEG_NAMES) if with_vectors else False,
        )
        return self._records(ids, found, with_vectors)

    def delete(self, ids: Sequence[DocId] | None = None, *, filter: FilterLike = None) -> None:
        from qdrant_client import models

        check_delete_target(ids, filter)
        ids = None if ids is None else id_list(ids)
        if not self._ensure():
            return
        if ids is not None:
            point_ids = self._point_ids(ids)
            if point_ids:
                self.client.delete(
                    self.collection, models.PointIdsList(points=point_ids), wait=True
                )
        if filter is not None:
            selector = models.FilterSelector(filter=self._filter(filter, everything=True))
            self.client.delete(self.collection, selector, wait=True)

    def count(self, *, filter: FilterLike = None) -> int:
        ready = self._ensure()
        query_filter = self._filter(filter)
        if not ready:
            return 0
        return int(self.client.count(self.collection, count_filter=query_filter, exact=True).count)

    def iter_records(
        self, *, filter: FilterLike = None, with_vectors: bool = False, batch_size: int = 256
    ) -> Iterator[Record]:
        _check_batch_size(batch_size)
        ready = self._ensure()
        scroll_filter = self._filter(filter)
        vectors = self._vector_names(LEG_NAMES) if with_vectors else False
        offset = None
        while ready:
            points, offset = self.client.scroll(
                self.collection,
                scroll_filter=scroll_filter,
                limit=batch_size,
                offset=offset,
                with_payload=True,
                with_vectors=vectors,
            )
            yield from self._scrolled(points, with_vectors)
            if offset is None:
                break

    # --- searching ------------------------------------------------------------------------

    def _search(self, query: M3Embedding, params: SearchParams) -> list[Hit]:
        qv = self._query_vectors(query, params)
        plan = self._plan(params, qv)
        ready = self._ensure()
        query_filter = self._filter(params.filter, search=True)
        if plan is None or not ready:
            return []
        request = self._request(plan, qv, query_filter)
        points = self.client.query_points(self.collection, **request).points
        by_id = []
        batch = self._by_id_requests(plan, qv, points)
        if batch:
            by_id = [r.points for r in self.client.query_batch_points(self.collection, batch)]
        return self._hits(query, params, plan, points, by_id)

    def close(self) -> None:
        if self._close_client:
            self.client.close()


class AsyncQdrantStore(_ClientStoreBase, AsyncM3Store):
    """:class:`QdrantStore` over an :class:`qdrant_client.AsyncQdrantClient`, natively async.

    The collection is attached (created or checked) on first use; ``await
    AsyncQdrantStore.open(client, ...)`` does it at once, so a collection that does not fit is
    refused there.
    """

    def __init__(
        self,
        client: AsyncQdrantClient,
        collection: str = "m3connect",
        encoder: M3Encoder | None = None,
        *,
        close_client: bool = False,
        **options: Any,
    ) -> None:
        import asyncio

        super().__init__(client, collection, encoder, **options)
        self._close_client = close_client
        self._lock = asyncio.Lock()

    @classmethod
    async def open(
        cls,
        client: AsyncQdrantClient,
        collection: str = "m3connect",
        encoder: M3Encoder | None = None,
        **options: Any,
    ) -> AsyncQdrantStore:
        store = cls(client, collection, encoder, **options)
        await store._ensure()
        return store

    async def _attach(self) -> None:
        if not await self.client.collection_exists(self.collection):
            if self.fingerprint is not None and self._fingerprint_known:
                await self._create()
            return
        info = await self.client.get_collection(self.collection)
        self._check_schema(self._dialect.schema(info))
        stored, _ = self._stored_metadata(info)
        if stored is None:
            stored = self._reserved_fingerprint(
                await self.client.retrieve(self.collection, [RESERVED_POINT_ID], with_payload=True)
            )
        if self._adopt_fingerprint(stored):
            await self._store_fingerprint(has_metadata_api=True)
        self._check_schema(self._dialect.schema(info))
        self._ready = True

    async def _create(self) -> None:
        kwargs = self._dialect.create_kwargs(self)
        try:
            await self.client.create_collection(
                self.collection, metadata={METADATA_KEY: self._info_payload()}, **kwargs
            )
        except (TypeError, AssertionError):
            await self.client.create_collection(self.collection, **kwargs)
        info = await self.client.get_collection(self.collection)
        self._check_schema(self._dialect.schema(info))
        if self._stored_metadata(info)[0] is None:
            await self._store_fingerprint(has_metadata_api=False)
        self._ready = True

    async def _store_fingerprint(self, has_metadata_api: bool) -> None:
        if has_metadata_api:
            try:
                await self.client.update_collection(
                    self.collection, metadata={METADATA_KEY: self._info_payload()}
                )
                info = await self.client.get_collection(self.collection)
                if self._stored_metadata(info)[0] is not None:
                    return
            except (TypeError, AssertionError):
                pass
        await self.client.upsert(self.collection, [self._reserved_point()], wait=True)
        self._reserved = True

    async def _ensure(self) -> bool:
        if not self._ready:
            async with self._lock:
                if not self._ready:
                    await self._attach()
        return self._ready

    async def add(
        self,
        ids: Sequence[DocId],
        embeddings: M3Output,
        texts: Sequence[str | None] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        batch = self._prepare(ids, embeddings, texts, metadatas)
        if not batch.ids:
            return
        if not self._ready:
            self._fingerprint_known = True
            await self._ensure()
        await run_awaiting(
            write_or_roll_back(
                batch,
                self._write_points,
                awaited(lambda ids: self.get(ids, with_vectors=True)),
                awaited(self.delete),
                atomic=self._one_request(batch),
            )
        )

    def _write_points(self, batch: PreparedBatch) -> Generator[Any, Any, None]:
        for rows in self._chunks(batch):
            yield self.client.upsert(self.collection, self._points(batch, rows), wait=True)

    async def get(self, ids: Sequence[DocId], *, with_vectors: bool = False) -> list[Record]:
        ids = id_list(ids)
        point_ids = self._point_ids(ids)
        if not point_ids or not await self._ensure():
            return []
        found = await self.client.retrieve(
            self.collection,
            point_ids,
            with_payload=True,
            with_vectors=self._vector_names(LEG_NAMES) if with_vectors else False,
        )
        return self._records(ids, found, with_vectors)

    async def delete(
        self, ids: Sequence[DocId] | None = None, *, filter: FilterLike = None
    ) -> None:
        from qdrant_client import models

        check_delete_target(ids, filter)
        ids = None if ids is None else id_list(ids)
        if not await self._ensure():
            return
        if ids is not None:
            point_ids = self._point_ids(ids)
            if point_ids:
                await self.client.delete(
                    self.collection, models.PointIdsList(points=point_ids), wait=True
                )
        if filter is not None:
            selector = models.FilterSelector(filter=self._filter(filter, everything=True))
            await self.client.delete(self.collection, selector, wait=True)

    async def iter_records(  # type: ignore[override]
        self, *, filter: FilterLike = None, with_vectors: bool = False, batch_size: int = 256
    ) -> AsyncIterator[Record]:
        _check_batch_size(batch_size)
        ready = await self._ensure()
        scroll_filter = self._filter(filter)
        vectors = self._vector_names(LEG_NAMES) if with_vectors else False
        offset = None
        while ready:
            points, offset = await self.client.scroll(
                self.collection,
                scroll_filter=scroll_filter,
                limit=batch_size,
                offset=offset,
                with_payload=True,
                with_vectors=vectors,
            )
            for record in self._scrolled(points, with_vectors):
                yield record
            if offset is None:
                break

    async def count(self, *, filter: FilterLike = None) -> int:
        ready = await self._ensure()
        query_filter = self._filter(filter)
        if not ready:
            return 0
        result = await self.client.count(self.collection, count_filter=query_filter, exact=True)
        return int(result.count)

    async def _search(self, query: M3Embedding, params: SearchParams) -> list[Hit]:
        qv = self._query_vectors(query, params)
        plan = self._plan(params, qv)
        ready = await self._ensure()
        query_filter = self._filter(params.filter, search=True)
        if plan is None or not ready:
            return []
        request = self._request(plan, qv, query_filter)
        points = (await self.client.query_points(self.collection, **request)).points
        by_id = []
        batch = self._by_id_requests(plan, qv, points)
        if batch:
            answers = await self.client.query_batch_points(self.collection, batch)
            by_id = [r.points for r in answers]
        return self._hits(query, params, plan, points, by_id)

    async def close(self) -> None:
        if self._close_client:
            await self.client.close()


# --- qdrant-edge ---------------------------------------------------------------------------------


class QdrantEdgeStore(_SyncWrites, M3Store):
    """A BGE-M3 store in a ``qdrant_edge.EdgeShard``: the Qdrant engine in this process.

    ``path`` is the shard's folder: loaded (and checked) when it holds a shard, else created on
    the first write (or now, when the fingerprint is known). The ColBERT vectors and payloads
    are memory-mapped files (``Memory.Cold``): RAM stays bounded as the shard grows, the page
    cache holds what searches touch.

    An embedded shard has one writer: the store holds an exclusive lock on
    ``<path>/.m3connect.lock`` while it is open, and a second process (or a second store in
    this one) gets a :class:`StoreError` naming the path instead of a half-opened shard. To make
    a second store over an open shard, pass it as ``shard=`` (no lock is taken then).

    Each document's ColBERT rows are also appended to a plain file beside the shard
    (``<path>/m3connect-colbert/``, :mod:`m3connect.stores.colbert_rows`), and its payload says
    where: re-ranks and ``mode="colbert"`` read the rows from there (memory-mapped) and score
    them with the core's :func:`~m3connect.scoring.colbert_scores`, several times faster than the
    engine's MaxSim and exactly the reference's arithmetic. The engine keeps its own copy in the
    native multivector field (for Qdrant's API, a fused ColBERT leg, and as the fallback for any
    document whose rows the file cannot give); a shard written before row files is scored by
    the engine as before.

    Writes go to the engine in requests of about ``batch_max_floats`` vector components
    (``batch_size`` points at most) with no flush per call; :meth:`finish` (called by the
    indexing job at its end) makes the row file durable, compacts it when dead rows (of
    replaced or deleted documents) outweigh the live ones, flushes and runs the segment
    optimizer once. The fingerprint is kept in a reserved point. Options as for
    :class:`QdrantStore`.
    """

    _dialect: _EdgeDialect
    CONFIG_FILE = "edge_config.json"
    LOCK_FILE = ".m3connect.lock"
    ROWS_FOLDER = "m3connect-colbert"

    def __init__(
        self,
        path: str | Path,
        encoder: M3Encoder | None = None,
        *,
        shard: Any = None,
        **options: Any,
    ) -> None:
        self.path = Path(path)
        # A writer sends large requests: the engine takes them whole (no 32 MB request limit
        # as on a server), and each request has a fixed cost (a WAL record, a segment lock).
        options.setdefault("batch_size", 1024)
        options.setdefault("batch_max_floats", _EDGE_REQUEST_FLOATS)
        super().__init__(str(self.path), encoder, **options)
        self._dialect = _EdgeDialect()
        self.shard = shard
        self._owns_shard = shard is None
        self._lock_file: Any = None
        #: Points written since the last :meth:`finish` (it optimizes only after writes).
        self._dirty = False
        #: The ColBERT rows beside the shard (None: a shard from before row files).
        self._rows: ColbertRowFile | None = None
        #: Vector bytes written since the last flush (see :attr:`wal_flush_bytes`).
        self._unflushed_bytes = 0
        if self._owns_shard:
            self._lock_file = _lock_shard(self.path, self._where())
        try:
            self._attach()
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases the lock
            self._lock_file = None

    def _where(self) -> str:
        return f"Qdrant edge shard {str(self.path)!r}"

    def _attach(self) -> None:
        config_file = self.path / self.CONFIG_FILE
        if self.shard is None and not config_file.exists():
            if self.fingerprint is not None and self._fingerprint_known:
                try:
                    self.shard = self._dialect.e.EdgeShard.create(
                        str(self.path), self._dialect.config(self)
                    )
                except Exception as exc:  # the engine raises plain Exceptions
                    raise StoreError(f"cannot create {self._where()}: {exc}") from exc
                self._store_fingerprint()
                if config_file.exists():
                    self._check_schema(self._dialect.schema(json.loads(config_file.read_text())))
                # float32 rows (float16 values are exact in it): BLAS multiplies them where
                # they lie in the mapped file, while float16 ones would first be converted,
                # which costs as much as the product (twice the disk for float16 stores).
                self._rows = _row_file(self._rows_folder(), self.fingerprint.colbert_dim, "float32")
                self._ready = True
            return
        if config_file.exists():
            self._check_schema(self._dialect.schema(json.loads(config_file.read_text())))
        if self.shard is None:
            try:
                self.shard = self._dialect.e.EdgeShard.load(str(self.path))
            except Exception as exc:  # the engine raises plain Exceptions
                raise StoreError(f"cannot open {self._where()}: {exc}") from exc
        stored = self._reserved_fingerprint()
        if self._adopt_fingerprint(stored):
            self._store_fingerprint()
        if config_file.exists():
            self._check_schema(self._dialect.schema(json.loads(config_file.read_text())))
        if self._rows is None and self.fingerprint is not None:
            self._rows = _row_file(self._rows_folder(), self.fingerprint.colbert_dim)
        self._ready = True

    def _rows_folder(self) -> Path:
        return self.path / self.ROWS_FOLDER

    def _reserved_fingerprint(self) -> ModelFingerprint | None:
        for record in self.shard.retrieve(
            [RESERVED_POINT_ID], with_payload=True, with_vector=False
        ):
            fp = self._fingerprint_from((record.payload or {}).get(METADATA_KEY))
            if fp is not None:
                self._reserved = True
                return fp
        return None

    def _store_fingerprint(self) -> None:
        point = self._dialect.point(RESERVED_POINT_ID, {}, {METADATA_KEY: self._info_payload()})
        self.shard.update(self._dialect.e.UpdateOperation.upsert_points([point]))
        self._reserved = True

    def _write_points(self, batch: PreparedBatch) -> Generator[Any, Any, None]:
        yield from ()
        upsert = self._dialect.e.UpdateOperation.upsert_points
        self._dirty = True
        for rows in self._chunks(batch):
            if self._rows is None:
                self.shard.update(upsert(self._points(batch, rows)))
            else:
                # The values the engine keeps (float16 storage rounds them) as float32: the
                # row file's rows and the points' lists (the engine rounds them again, to the
                # same values) come from one conversion.
                stored = self._stored_colbert_dtype
                colbert = [
                    batch.embeddings.colbert[i]  # type: ignore[index]
                    .astype(stored, copy=False)
                    .astype(np.float32, copy=False)
                    for i in rows
                ]
                # The rows are written while the points are built (the write runs without the
                # GIL), and are in the file before the points that refer to them are sent.
                spans, written = self._rows.append_later(colbert)
                extras = [{ROWS_KEY: span} for span in spans]
                points = self._points(batch, rows, extras, colbert)
                written.result()
                self.shard.update(upsert(points))
            self._unflushed_bytes += 4 * sum(
                batch.embeddings.colbert[i].size + batch.embeddings.dense.shape[1]  # type: ignore[index,union-attr]
                for i in rows
            )
            if self._unflushed_bytes >= self.wal_flush_bytes:
                # The shard alone: its flush trims the write-ahead log. The row file reaches
                # the disk in the background (and is synced by finish()); a power failure
                # before then costs speed, not answers (the engine's copy stands in).
                self.shard.flush()
                self._unflushed_bytes = 0

    #: Bytes of vectors written between two flushes of the shard. The engine's write-ahead
    #: log keeps every request (vectors as float32) until a flush: without one it held 13 GB
    #: after 30,000 chunks of 128 x 1024; with one every ~1 GiB, under 1 GB.
    wal_flush_bytes = 1 << 30

    def get(self, ids: Sequence[DocId], *, with_vectors: bool = False) -> list[Record]:
        ids = id_list(ids)
        point_ids = self._point_ids(ids)
        if not point_ids or not self._ensure():
            return []
        found = self.shard.retrieve(
            point_ids,
            with_payload=True,
            with_vector=self._engine_vectors() if with_vectors else False,
        )
        if with_vectors:
            found = self._with_colbert_rows(found)
        return self._records(ids, found, with_vectors)

    def delete(self, ids: Sequence[DocId] | None = None, *, filter: FilterLike = None) -> None:
        check_delete_target(ids, filter)
        ids = None if ids is None else id_list(ids)
        if not self._ensure():
            return
        ops = self._dialect.e.UpdateOperation
        self._dirty = True  # finish() flushes, and compacts the deleted documents' rows
        if ids is not None:
            point_ids = self._point_ids(ids)
            if point_ids:
                self.shard.update(ops.delete_points(point_ids))
        if filter is not None:
            self.shard.update(ops.delete_points_by_filter(self._filter(filter, everything=True)))

    def count(self, *, filter: FilterLike = None) -> int:
        ready = self._ensure()
        query_filter = self._filter(filter)
        if not ready:
            return 0
        return int(self.shard.count(self._dialect.e.CountRequest(exact=True, filter=query_filter)))

    def iter_records(
        self, *, filter: FilterLike = None, with_vectors: bool = False, batch_size: int = 256
    ) -> Iterator[Record]:
        _check_batch_size(batch_size)
        ready = self._ensure()
        scroll_filter = self._filter(filter)
        if not ready:
            return
        vectors = self._engine_vectors() if with_vectors else False
        for points in self._pages(scroll_filter, batch_size, True, vectors):
            if with_vectors:
                points = self._with_colbert_rows(points)
            yield from self._scrolled(points, with_vectors)

    def _pages(
        self, scroll_filter: Any, limit: int, with_payload: Any, with_vector: Any
    ) -> Iterator[list[Any]]:
        """The shard's points (matching ``scroll_filter``), ``limit`` per page."""
        offset = None
        while True:
            points, offset = self.shard.scroll(
                self._dialect.e.ScrollRequest(
                    offset=offset,
                    limit=limit,
                    filter=scroll_filter,
                    with_payload=with_payload,
                    with_vector=with_vector,
                )
            )
            yield points
            if offset is None:
                return

    def _search(self, query: M3Embedding, params: SearchParams) -> list[Hit]:
        qv = self._query_vectors(query, params)
        ready = self._ensure()
        query_filter = self._filter(params.filter, search=True)
        if not ready:
            return []
        if self._rows_score(params):
            return self._search_with_rows(query, params, qv, query_filter)
        plan = self._plan(params, qv)
        if plan is None:
            return []
        points = self.shard.query(self._request(plan, qv, query_filter))
        by_id = []
        batch = self._by_id_requests(plan, qv, points)
        if batch:
            by_id = self.shard.query_batch(self._dialect.e.QueryBatchRequest(batch))
        return self._hits(query, params, plan, points, by_id)

    # --- ColBERT scored from the row file ----------------------------------------------------

    def _rows_score(self, params: SearchParams) -> bool:
        """Whether this search's ColBERT scores come from the row file: a re-rank of the other
        legs' candidates, or ``mode="colbert"`` (every document in scope). A ColBERT leg fused
        with others stays in the engine (its candidates are the engine's nearest)."""
        if self._rows is None or self.sparse_idf:
            return False
        if params.legs == ("colbert",):
            return True
        return params.rerank is not None and "colbert" not in params.legs

    def _search_with_rows(
        self, query: M3Embedding, params: SearchParams, qv: _QueryVectors, query_filter: Any
    ) -> list[Hit]:
        """Candidates from the engine (the legs' ranking, or every document in scope for
        ``mode="colbert"``), their ColBERT scores from the row file by the core's batched
        MaxSim, the other parts' exact scores from the engine by id, then the re-rank."""
        if params.legs == ("colbert",):
            point_ids, spans = self._scan_rows(query_filter)
            scores = self._colbert_scores(query, point_ids, spans)
            top = np.argsort(-scores, kind="stable")[: params.leg_limit]
            found = {
                str(r.id): r
                for r in self.shard.retrieve(
                    [point_ids[i] for i in top], with_payload=True, with_vector=False
                )
            }
            points: list[Any] = [
                _Point(point_ids[i], found[point_ids[i]].payload, float(scores[i]))
                for i in top
                if point_ids[i] in found
            ]
            colbert = [p.score for p in points]
        else:
            ranked = self._ranker(params, qv)
            if ranked is None:
                return []
            ranker = ranked[0]
            ranker.limit = params.candidates
            points = self.shard.query(self._stage_request(ranker, qv, query_filter))
            colbert = self._colbert_scores(
                query,
                [str(p.id) for p in points],
                [(p.payload or {}).get(ROWS_KEY) for p in points],
            ).tolist()
        others = [p for p in params.scored_parts if p != "colbert"]
        known = {"colbert": colbert}
        known.update({p: [0.0] * len(points) for p in others if not qv.usable(p)})
        plan = _Plan(
            top=_Stage(_Nearest("colbert")),
            final_part=None,
            scale=1.0,
            fetch_parts=(),
            recompute=("all", params.weights) if params.rerank == "all" else ("part", "colbert"),
            k=params.k,
            by_id=tuple(p for p in others if qv.usable(p)),
        )
        by_id = []
        batch = self._by_id_requests(plan, qv, points)
        if batch:
            by_id = self.shard.query_batch(self._dialect.e.QueryBatchRequest(batch))
        return self._hits(query, params, plan, points, by_id, known)

    def _scan_rows(self, scroll_filter: Any) -> tuple[list[str], list[Any]]:
        """Every document's point id and row span (matching ``scroll_filter``)."""
        point_ids: list[str] = []
        spans: list[Any] = []
        for points in self._pages(scroll_filter, _SCAN_PAGE, ["doc_id", ROWS_KEY], False):
            for point in points:
                payload = point.payload or {}
                if "doc_id" in payload:  # not the reserved point
                    point_ids.append(str(point.id))
                    spans.append(payload.get(ROWS_KEY))
        return point_ids, spans

    def _colbert_scores(
        self, query: M3Embedding, point_ids: Sequence[str], spans: Sequence[Any]
    ) -> np.ndarray:
        """The core's ColBERT score of each point, from its rows in the file (read in file
        order), or from the engine's copy where the file has none for it."""
        assert self._rows is not None
        order = sorted(range(len(spans)), key=lambda i: _span_order(spans[i]))
        matrices = [self._rows.rows(spans[i]) for i in order]
        missing = [j for j, rows in enumerate(matrices) if rows is None]
        if missing:
            logger.warning(
                "%d document(s) of %s have no readable ColBERT rows in %s: scored from the "
                "engine's copy (slower); re-index them to restore the fast path",
                len(missing),
                self._where(),
                self._rows.folder,
            )
            engine = self._engine_colbert([point_ids[order[j]] for j in missing])
            for j in missing:
                matrices[j] = engine.get(point_ids[order[j]], _NO_ROWS)
        scores = np.zeros(len(spans), dtype=np.float64)
        scores[order] = colbert_scores(query.colbert, matrices)  # type: ignore[arg-type]
        return scores

    def _engine_colbert(self, point_ids: Sequence[str]) -> dict[str, np.ndarray]:
        name = self.names["colbert"]
        found = self.shard.retrieve(list(point_ids), with_payload=False, with_vector=[name])
        return {
            str(r.id): np.asarray((r.vector or {}).get(name) or _NO_ROWS, dtype=np.float32)
            for r in found
        }

    def _engine_vectors(self) -> list[str]:
        """The vectors to read from the engine for a record (ColBERT from the row file)."""
        parts = ("dense", "sparse") if self._rows is not None else LEG_NAMES
        return self._vector_names(parts)

    def _with_colbert_rows(self, points: Sequence[Any]) -> list[Any]:
        """``points`` read without their ColBERT vectors, with their rows from the file (or
        the engine's copy where the file has none)."""
        if self._rows is None:
            return list(points)
        name = self.names["colbert"]
        out, missing = [], []
        for point in points:
            payload = point.payload or {}
            vectors = dict(point.vector or {})
            rows = self._rows.rows(payload.get(ROWS_KEY))
            if rows is not None:
                vectors[name] = rows
            elif "doc_id" in payload:
                missing.append(str(point.id))
            out.append(_Point(str(point.id), payload, 0.0, vectors))
        if missing:
            engine = self._engine_colbert(missing)
            for point in out:
                if name not in point.vector and point.id in engine:
                    point.vector[name] = engine[point.id]
        return out

    def flush(self) -> None:
        """Make every write durable: the row file, then the shard (which also trims the
        engine's write-ahead log)."""
        if self.shard is not None:
            if self._rows is not None:
                self._rows.sync()
            self.shard.flush()
            self._unflushed_bytes = 0

    def finish(self) -> None:
        """The end of a write job: flush to disk and run the segment optimizer once (it builds
        the dense HNSW graph and merges segments), so that searches that follow are fast."""
        if self.shard is None or not self._dirty:
            return
        if self._rows is not None:
            self._compact_rows()
        self.flush()  # the rows first: the shard's points refer to them
        self.shard.optimize()
        self._dirty = False

    #: Dead ColBERT rows (of replaced or deleted documents) below this size stay in the file.
    compact_min_bytes = 64 << 20

    def _compact_rows(self) -> None:
        """Copy the live rows into a new file when the dead ones outweigh them (and pass
        :attr:`compact_min_bytes`): then point each document at its new place, and delete the
        old file. Killed part way, documents refer to the old or the new file, both kept."""
        assert self._rows is not None
        point_ids, spans = self._scan_rows(None)
        live = [i for i, span in enumerate(spans) if self._rows.rows(span) is not None]
        live_rows = sum(spans[i][2] for i in live)
        dead = self._rows.dead_rows(live_rows)
        if dead <= live_rows or dead * self._rows.row_bytes < self.compact_min_bytes:
            return
        live.sort(key=lambda i: _span_order(spans[i]))
        placed = self._rows.compact([spans[i] for i in live])
        set_payload = self._dialect.e.UpdateOperation.set_payload
        for i, span in zip(live, placed, strict=True):
            if span is not None:
                self.shard.update(set_payload([point_ids[i]], {ROWS_KEY: span}))
        self.shard.flush()
        self._rows.retire({self._rows.generation})
        logger.info("compacted the ColBERT rows of %s: %d dead rows removed", self._where(), dead)

    def close(self) -> None:
        try:
            if self.shard is not None and self._owns_shard:
                if self._dirty:
                    self.flush()
                self.shard.close()
                self.shard = None
                self._rows = None
                self._ready = False
        finally:
            self._release_lock()

    @classmethod
    def drop(cls, path: str | Path) -> None:
        """Delete the shard in ``path`` (its whole folder); refused while a store has it open."""
        import shutil

        path = Path(path)
        if not path.exists():
            return
        lock = _lock_shard(path, f"Qdrant edge shard {str(path)!r}")
        try:
            for child in path.iterdir():
                if child.name == cls.LOCK_FILE:
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        finally:
            lock.close()


#: Vector components per edge write request (float32: 64 MB): one request carries dozens of
#: 128 x 1024 ColBERT matrices.
_EDGE_REQUEST_FLOATS = 16_000_000

#: Points per scroll page when every document's row span is read (mode="colbert").
_SCAN_PAGE = 8192

_NO_ROWS = np.zeros((0, 0), dtype=np.float32)


@dataclass
class _Point:
    """A point as the stores read it (the binding's objects cannot take rows from the file)."""

    id: str
    payload: dict[str, Any] | None
    score: float = 0.0
    vector: dict[str, Any] = field(default_factory=dict)


def _span_order(span: Any) -> tuple[int, int]:
    """File order of a row span (unreadable ones last)."""
    if isinstance(span, list) and len(span) == 3:
        return int(span[0]), int(span[1])
    return (2**62, 0)


#: The row file of each shard folder open in this process: stores over one shard (``shard=``)
#: share it, so that their appends do not overwrite each other.
_ROW_FILES: weakref.WeakValueDictionary[Path, ColbertRowFile] = weakref.WeakValueDictionary()
_ROW_FILES_LOCK = threading.Lock()


def _row_file(folder: Path, dim: int, dtype: str | None = None) -> ColbertRowFile | None:
    """The shard's row file: created in the given ``dtype``, or (``dtype=None``) the existing
    one, ``None`` when there is none (a shard written before row files)."""
    key = folder.resolve()
    with _ROW_FILES_LOCK:
        rows = _ROW_FILES.get(key)
        if rows is not None and rows.dim == dim and rows.is_current():
            return rows
        if dtype is None:
            rows = ColbertRowFile.open_existing(folder, dim)
        else:
            rows = ColbertRowFile(folder, dim, dtype)
        if rows is not None:
            _ROW_FILES[key] = rows
        return rows


def _lock_shard(path: Path, where: str) -> Any:
    """Take the exclusive lock of an embedded shard (the open lock file; closing it releases)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / QdrantEdgeStore.LOCK_FILE, "a+b")  # noqa: SIM115 - held while open
    except OSError as exc:
        raise StoreError(f"cannot open {where}: {exc}") from None
    try:
        import fcntl
    except ImportError:  # not POSIX: the engine's own WAL lock still refuses a second writer
        return handle
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StoreError(
            f"{where} is open in another process (or another store of this one): an embedded "
            "store has one writer. Close the other one, or use a Qdrant server for several "
            "processes."
        ) from None
    return handle
