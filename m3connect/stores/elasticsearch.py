"""BGE-M3 in Elasticsearch's native fields: ``dense_vector``, ``sparse_vector``, ``rank_vectors``.

:class:`ElasticsearchStore` (an ``Elasticsearch`` client) and :class:`AsyncElasticsearchStore`
(an ``AsyncElasticsearch`` client) give the answers of the store contract
(:mod:`m3connect.store`): the same ids in the same order as the in-memory reference, with
scores on the scales of :mod:`m3connect.scoring`.

Layout of one document (``_id`` is ``"s:<id>"`` for string ids and ``"i:<id>"`` for int ids,
so ``"1"`` and ``1`` are two documents; string ids longer than ``_id`` allows are hashed)::

    uid          keyword       the user's id, as a string (its type is in the _id prefix)
    text         text          the passage (BM25 is available through search_text)
    dense        dense_vector  dims, similarity dot_product, index_options (int8_hnsw or flat ...)
    sparse       sparse_vector {"<token id>": weight}, query-token pruning off
    colbert      rank_vectors  (Enterprise/trial licence) element_type float
      or         binary        (basic licence) base64 of little-endian float16/float32 rows,
    colbert_meta object        with {"rows", "dtype"} beside it (not indexed)
    metadata     object        user metadata; strings -> keyword, numbers -> double,
                               booleans -> boolean (dynamic templates)

The model fingerprint is in the mapping's ``_meta.m3connect``; attaching to an index written by
another model raises :class:`~m3connect.fingerprint.FingerprintMismatchError`.

What runs where (see docs/elasticsearch.md):

- every licence, in the server: the dense leg (kNN, converted from ``(1 + dot) / 2``), the sparse
  leg's candidates (``sparse_vector`` query, pruning off), filters, and the exact dense score of
  any candidate (``script_score`` with ``dotProduct``);
- Enterprise/trial, in the server: RRF of the legs (``rrf`` retriever, when ``rrf_k`` is an
  integer >= 1) and every ColBERT score (``script_score`` with ``maxSimDotProduct`` over
  ``rank_vectors``, divided by the query's rows: ES sums, the contract averages);
- in the client: DBSF and weighted fusion (they need exact scores of the candidates a leg missed,
  which ES's ``linear`` retriever scores 0), ``rerank="all"``'s combination, the exact sparse
  score (from the stored weights: ES keeps 9 significant bits), and on the basic licence RRF
  with non-integer ``rrf_k`` and every ColBERT score (from the stored rows).

The two classes only do I/O: every request is built by the module-level logic
(:class:`_ElasticsearchLogic`), written as generators that yield ``(api, kwargs)`` calls; the sync
store runs them with ``Elasticsearch``, the async store with ``AsyncElasticsearch``.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import re
from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any, Literal

import numpy as np
from elasticsearch import ApiError, AsyncElasticsearch, Elasticsearch, TransportError
from elasticsearch import helpers as es_helpers

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
from m3connect.scoring import colbert_scores, lexical_scores
from m3connect.search import ScoredId, ScoreTable, drive_steps, search_steps
from m3connect.store import (
    AsyncM3Store,
    Hit,
    M3Store,
    PreparedBatch,
    Record,
    SearchParams,
    StoreError,
    check_delete_target,
    id_list,
    write_or_roll_back,
)
from m3connect.types import DocId, M3Embedding

__all__ = [
    "AsyncElasticsearchStore",
    "BulkWriteError",
    "ElasticsearchStore",
    "build_mapping",
    "filter_to_query",
]

logger = logging.getLogger(__name__)

Licence = Literal["auto", "basic", "enterprise"]

#: Oldest server with everything this adapter uses (rank_vectors, sparse_vector query pruning
#: control, rescore_vector, the rrf retriever).
MIN_VERSION = (8, 18)
#: ``index.mapping.exclude_source_vectors`` and ``_source.exclude_vectors`` exist from 9.2.
EXCLUDE_VECTORS_VERSION = (9, 2)
#: ``index.max_result_window`` default, and the largest kNN ``k`` / ``num_candidates``.
MAX_WINDOW = 10_000
#: rank_vectors keeps at most this many vectors per document.
RANK_VECTORS_MAX_ROWS = 8192
#: dense_vector with dot_product refuses vectors whose squared norm is further than this from 1.
UNIT_TOLERANCE = 1e-4
#: Index options that score with quantized vectors, so kNN results get ``rescore_vector``.
QUANTIZED_INDEX_TYPES = frozenset(
    {"int8_hnsw", "int4_hnsw", "bbq_hnsw", "int8_flat", "int4_flat", "bbq_flat", "bbq_disk"}
)
ENTERPRISE_LICENCES = frozenset({"enterprise", "trial"})
DENSE_SCRIPT = "dotProduct(params.query_vector, 'dense') + params.offset"
COLBERT_SCRIPT = "maxSimDotProduct(params.query_vector, 'colbert') + params.offset"
MATCH_NONE: dict[str, Any] = {"match_none": {}}
_ID_LIMIT = 512  # bytes of an Elasticsearch _id
_IDS_PER_REQUEST = 1000
_SCROLL_PAGE = 500
_SCROLL_KEEP_ALIVE = "2m"

_Call = tuple[str, dict[str, Any]]
_Gen = Generator[_Call, Any, Any]


class BulkWriteError(StoreError):
    """Elasticsearch refused some documents of a write. ``failed`` maps each refused id to the
    reason; the add is undone (the other documents of the batch are not kept)."""

    def __init__(self, message: str, failed: Mapping[DocId, str]) -> None:
        super().__init__(message)
        self.failed = dict(failed)


# --- ids --------------------------------------------------------------------------------------


def es_id(doc_id: Any) -> str | None:
    """The ``_id`` of a user id (``None`` for what cannot be an id): ``s:`` + string,
    ``i:`` + int, or ``h:`` + sha256 of a string too long for ``_id``."""
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
        return None
    if isinstance(doc_id, int):
        return f"i:{doc_id}"
    key = f"s:{doc_id}"
    if len(key.encode("utf-8", "surrogatepass")) > _ID_LIMIT:
        key = "h:" + hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).hexdigest()
    return key


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise StoreError(f"batch_size must be a positive integer, got {batch_size!r}")


def _user_id(hit: Mapping[str, Any]) -> DocId:
    key = hit["_id"]
    if key.startswith("i:"):
        return int(key[2:])
    if key.startswith("s:"):
        return key[2:]
    return str(hit["_source"]["uid"])


# --- mapping ----------------------------------------------------------------------------------


def build_mapping(
    fingerprint: ModelFingerprint,
    *,
    colbert_layout: Literal["rank_vectors", "binary"],
    dense_index_options: Mapping[str, Any],
    sparse_index_options: bool = True,
) -> dict[str, Any]:
    """The index mapping: vectors in native fields, metadata under ``metadata`` with strings
    as ``keyword``, every number as ``double`` (so ``1 == 1.0`` and a float after an int
    keeps its decimals) and booleans as ``boolean``; unknown top-level fields are refused."""
    sparse: dict[str, Any] = {"type": "sparse_vector"}
    if sparse_index_options:
        sparse["index_options"] = {"prune": False}
    properties: dict[str, Any] = {
        "uid": {"type": "keyword"},
        "text": {"type": "text"},
        "dense": {
            "type": "dense_vector",
            "dims": fingerprint.dense_dim,
            "index": True,
            "similarity": "dot_product",
            "index_options": dict(dense_index_options),
        },
        "sparse": sparse,
        "metadata": {"type": "object", "dynamic": True},
    }
    if colbert_layout == "rank_vectors":
        properties["colbert"] = {
            "type": "rank_vectors",
            "dims": fingerprint.colbert_dim,
            "element_type": "float",
        }
    else:
        properties["colbert"] = {"type": "binary"}
        properties["colbert_meta"] = {"type": "object", "enabled": False}

    def template(name: str, mapping_type: str, mapping: dict[str, Any]) -> dict[str, Any]:
        return {
            name: {
                "path_match": "metadata.*",
                "match_mapping_type": mapping_type,
                "mapping": mapping,
            }
        }

    return {
        "dynamic": "strict",
        "_meta": {
            "m3connect": {
                "format": 1,
                "fingerprint": fingerprint.to_dict(),
                "colbert": colbert_layout,
            }
        },
        "dynamic_templates": [
            # 8191 characters stay under Lucene's 32766-byte term limit in any script.
            template("m3_strings", "string", {"type": "keyword", "ignore_above": 8191}),
            template("m3_integers", "long", {"type": "double"}),
            template("m3_floats", "double", {"type": "double"}),
        ],
        "properties": properties,
    }


@dataclass(frozen=True)
class _Layout:
    """What an existing index holds, read from its mapping."""

    fingerprint: ModelFingerprint
    colbert: Literal["rank_vectors", "binary"]
    dense_quantized: bool


def _check_mapping(index: str, mappings: Mapping[str, Any]) -> _Layout:
    """Read and check an existing index's mapping; a mapping that does not fit is a StoreError."""
    meta = (mappings.get("_meta") or {}).get("m3connect")
    if not isinstance(meta, Mapping) or "fingerprint" not in meta:
        raise StoreError(
            f"Elasticsearch index {index!r} exists but was not created by m3connect "
            "(its mapping has no _meta.m3connect): choose another index name"
        )
    try:
        fingerprint = ModelFingerprint.from_dict(meta["fingerprint"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"index {index!r} has an unreadable fingerprint in _meta: {exc}") from None
    props = mappings.get("properties") or {}
    problems: list[str] = []

    def field(name: str, wanted: str) -> Mapping[str, Any]:
        spec = props.get(name)
        if spec is None:
            problems.append(f"field {name!r} is missing")
            return {}
        if spec.get("type", "object") != wanted:
            problems.append(f"field {name!r} is {spec.get('type', 'object')}, not {wanted}")
        return spec

    dense = field("dense", "dense_vector")
    if dense:
        if dense.get("dims") != fingerprint.dense_dim:
            problems.append(
                f"dense has dims {dense.get('dims')}, the fingerprint says {fingerprint.dense_dim}"
            )
        if dense.get("similarity") != "dot_product":
            problems.append(f"dense has similarity {dense.get('similarity')!r}, not 'dot_product'")
        if dense.get("index") is False:
            problems.append("dense is not indexed for kNN (index: false)")
        if dense.get("element_type", "float") != "float":
            problems.append(f"dense has element_type {dense.get('element_type')!r}, not 'float'")
    field("sparse", "sparse_vector")
    field("uid", "keyword")
    field("text", "text")
    field("metadata", "object")
    colbert_spec = props.get("colbert") or {}
    layout: Literal["rank_vectors", "binary"]
    if colbert_spec.get("type") == "rank_vectors":
        layout = "rank_vectors"
        if colbert_spec.get("dims") not in (None, fingerprint.colbert_dim):
            problems.append(
                f"colbert has dims {colbert_spec.get('dims')}, the fingerprint says {fingerprint.colbert_dim}"
            )
        if colbert_spec.get("element_type", "float") != "float":
            problems.append(
                f"colbert has element_type {colbert_spec.get('element_type')!r}, not 'float'"
            )
    elif colbert_spec.get("type") == "binary":
        layout = "binary"
        field("colbert_meta", "object")
    else:
        layout = "binary"
        problems.append(
            f"field 'colbert' is {colbert_spec.get('type', 'missing')}, not rank_vectors or binary"
        )
    if problems:
        raise StoreError(
            f"Elasticsearch index {index!r} does not fit this store: {'; '.join(problems)}"
        )
    index_type = ((dense.get("index_options") or {}).get("type")) or "int8_hnsw"
    return _Layout(fingerprint, layout, index_type in QUANTIZED_INDEX_TYPES)


# Elasticsearch field types -> the kind of filter value that can match them.
_KINDS = {
    "keyword": "string",
    "constant_keyword": "string",
    "wildcard": "string",
    "boolean": "boolean",
    "object": "object",
    "nested": "object",
    **dict.fromkeys(
        [
            "long",
            "integer",
            "short",
            "byte",
            "double",
            "float",
            "half_float",
            "scaled_float",
            "unsigned_long",
        ],
        "number",
    ),
}


def _metadata_kinds(mappings: Mapping[str, Any]) -> dict[str, str]:
    """``{"year": "number", "loc.city": "string", ...}`` for the mapped metadata fields."""
    kinds: dict[str, str] = {}

    def walk(props: Mapping[str, Any], prefix: str) -> None:
        for name, spec in props.items():
            path = prefix + name
            kinds[path] = _KINDS.get(spec.get("type", "object"), spec.get("type", "object"))
            if "properties" in spec:
                walk(spec["properties"], path + ".")

    metadata = (mappings.get("properties") or {}).get("metadata") or {}
    walk(metadata.get("properties") or {}, "")
    return kinds


# --- filters ----------------------------------------------------------------------------------


def _value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    return "number"


def _filter_keys(node: Filter) -> set[str]:
    if isinstance(node, (Eq, In, Range)):
        return {node.key}
    if isinstance(node, (And, Or)):
        return set().union(*(_filter_keys(child) for child in node.filters))
    return _filter_keys(node.filter)


def filter_to_query(
    node: Filter | RawFilter | None, kinds: Mapping[str, str]
) -> dict[str, Any] | None:
    """The query DSL (filter context) of a core filter, given how each metadata key is mapped.

    Semantics are those of :func:`m3connect.filters.matches`: a value only matches a field of its
    own kind (a string a ``keyword``, a number a numeric field, a bool a ``boolean``), so a
    condition on an unmapped key or on a key of another type matches nothing, and ``Not`` of it
    matches everything. Lists match when any element does (Elasticsearch indexes each element).
    ``RawFilter(dict)`` passes through unchanged.
    """
    if node is None:
        return None
    if isinstance(node, RawFilter):
        return dict(node.value)
    if isinstance(node, (Eq, In)):
        values = [node.value] if isinstance(node, Eq) else list(node.values)
        kind = _field_kind(node.key, kinds)
        wanted = list(dict.fromkeys((type(v), v) for v in values if _value_kind(v) == kind))
        field = f"metadata.{node.key}"
        if not wanted:
            return MATCH_NONE
        if len(wanted) == 1:
            return {"term": {field: wanted[0][1]}}
        return {"terms": {field: [v for _, v in wanted]}}
    if isinstance(node, Range):
        if _field_kind(node.key, kinds) != "number":
            return MATCH_NONE
        bounds = {
            op: getattr(node, op)
            for op in ("gt", "gte", "lt", "lte")
            if getattr(node, op) is not None
        }
        return {"range": {f"metadata.{node.key}": bounds}}
    if isinstance(node, And):
        return {"bool": {"filter": [filter_to_query(child, kinds) for child in node.filters]}}
    if isinstance(node, Or):
        return {
            "bool": {
                "should": [filter_to_query(child, kinds) for child in node.filters],
                "minimum_should_match": 1,
            }
        }
    if isinstance(node, Not):
        return {"bool": {"must_not": [filter_to_query(node.filter, kinds)]}}
    raise StoreError(f"not a filter: {node!r}")


def _field_kind(key: str, kinds: Mapping[str, str]) -> str:
    kind = kinds.get(key, "unmapped")
    if kind not in ("string", "number", "boolean", "object", "unmapped"):
        raise StoreError(
            f"metadata field {key!r} is mapped as {kind!r} in this index; m3connect filters need "
            "keyword, numeric or boolean fields"
        )
    return kind


# --- documents and vectors ----------------------------------------------------------------------


def _colbert_to_binary(matrix: np.ndarray) -> tuple[str, dict[str, Any]]:
    dtype = np.dtype(matrix.dtype).newbyteorder("<")
    raw = np.ascontiguousarray(matrix, dtype=dtype).tobytes()
    return base64.b64encode(raw).decode("ascii"), {
        "rows": int(matrix.shape[0]),
        "dtype": dtype.name,
    }


def _colbert_from_source(source: Mapping[str, Any], dim: int) -> np.ndarray:
    value = source.get("colbert")
    if value is None:
        return np.zeros((0, dim), dtype=np.float32)
    if isinstance(value, str):
        meta = source.get("colbert_meta") or {}
        dtype = np.dtype(meta.get("dtype", "float32")).newbyteorder("<")
        matrix = np.frombuffer(base64.b64decode(value), dtype=dtype)
        return matrix.reshape(int(meta.get("rows", len(matrix) // dim)), dim).astype(
            dtype.newbyteorder("=")
        )
    return np.asarray(value, dtype=np.float32).reshape(-1, dim)


def _sparse_from_source(source: Mapping[str, Any]) -> dict[int, float]:
    return {int(token): float(weight) for token, weight in (source.get("sparse") or {}).items()}


def _embedding_from_source(source: Mapping[str, Any], fingerprint: ModelFingerprint) -> M3Embedding:
    return M3Embedding(
        dense=np.asarray(source["dense"], dtype=np.float32),
        sparse=_sparse_from_source(source),
        colbert=_colbert_from_source(source, fingerprint.colbert_dim),
    )


@dataclass
class _Query:
    """A validated query embedding in the forms the requests need."""

    embedding: M3Embedding
    dense: list[float] | None
    dense_offset: float  # dotProduct + offset > 0 for unit documents
    sparse: dict[str, float]
    colbert: list[list[float]] | None
    colbert_rows: int
    colbert_offset: float  # maxSim sum + offset > 0 for unit document rows

    @classmethod
    def of(cls, query: M3Embedding) -> _Query:
        dense = None if query.dense is None else np.asarray(query.dense, dtype=np.float32)
        colbert = None if query.colbert is None else np.asarray(query.colbert, dtype=np.float32)
        return cls(
            embedding=query,
            dense=None if dense is None else dense.tolist(),
            dense_offset=1.0 if dense is None else float(np.linalg.norm(dense)) + 1.0,
            sparse={
                str(int(t)): float(w) for t, w in (query.sparse or {}).items() if float(w) != 0
            },
            colbert=None if colbert is None else colbert.tolist(),
            colbert_rows=0 if colbert is None else int(colbert.shape[0]),
            colbert_offset=0.0
            if colbert is None
            else 2.0 * float(np.linalg.norm(colbert, axis=1).sum()) + 1.0,
        )

    def colbert_mean(self, es_score: float) -> float:
        """maxSimDotProduct is a sum over query rows; the contract's ColBERT score is the mean."""
        return (
            (float(es_score) - self.colbert_offset) / self.colbert_rows
            if self.colbert_rows
            else 0.0
        )


def _dense_from_knn(es_score: float) -> float:
    """kNN with ``dot_product`` scores ``(1 + dot) / 2``."""
    return 2.0 * float(es_score) - 1.0


def _api_error_text(exc: Exception) -> str:
    """What went wrong, from the server's answer only (never the client, its URL or headers)."""
    if isinstance(exc, ApiError):
        error = exc.body.get("error") if isinstance(exc.body, Mapping) else None
        if isinstance(error, Mapping):
            reason = error.get("reason") or ""
            caused = (error.get("caused_by") or {}).get("reason")
            root = (error.get("root_cause") or [{}])[0].get("reason")
            detail = "; ".join(dict.fromkeys(r for r in (reason, root, caused) if r))
            return f"{exc.status_code} {error.get('type', 'error')}: {detail}"
        return f"{exc.status_code} {exc.message}"
    return f"{type(exc).__name__}: {exc}"


def _is_licence_error(exc: Exception) -> bool:
    if not isinstance(exc, ApiError) or exc.status_code != 403:
        return False
    return "licen" in _api_error_text(exc).lower()


def _parse_version(info: Mapping[str, Any]) -> tuple[tuple[int, int], bool]:
    version = info.get("version") or {}
    if version.get("build_flavor") == "serverless":
        return (99, 0), True
    match = re.match(r"(\d+)\.(\d+)", str(version.get("number", "")))
    if not match:
        raise StoreError(f"cannot read the Elasticsearch version from {version!r}")
    return (int(match.group(1)), int(match.group(2))), False


# --- the logic: every request, built once for both clients --------------------------------------


class _ElasticsearchLogic:
    """Requests, mapping, filters and the search pipeline, shared by the sync and async stores.

    Methods named ``_g_*`` are generators: they yield ``(api, kwargs)`` (``api`` is a client
    method path such as ``"search"`` or ``"indices.create"``, or ``"bulk"`` for the bulk helper)
    and receive the response body, or have the client's exception thrown in.
    """

    # Set by StoreBase.__init__:
    fingerprint: ModelFingerprint | None
    colbert_dtype: np.dtype
    max_colbert_vectors: int | None

    def _configure(
        self,
        index: str,
        *,
        licence: Licence,
        dense_index_options: Mapping[str, Any] | None,
        refresh: bool | str,
        chunk_size: int,
        max_chunk_bytes: int,
        max_retries: int,
        num_candidates: int,
        rescore_oversample: float,
        server_rrf: bool,
        index_settings: Mapping[str, Any] | None,
    ) -> None:
        if not isinstance(index, str) or not index or index != index.lower():
            raise StoreError(
                f"an Elasticsearch index name is a non-empty lowercase string, got {index!r}"
            )
        if licence not in ("auto", "basic", "enterprise"):
            raise StoreError(f"licence must be 'auto', 'basic' or 'enterprise', got {licence!r}")
        if refresh not in (True, False, "wait_for"):
            raise StoreError(f"refresh must be True, False or 'wait_for', got {refresh!r}")
        self.index = index
        self.licence: Licence = licence
        self.dense_index_options = dict(dense_index_options or {"type": "int8_hnsw"})
        self.refresh = refresh
        self.chunk_size = chunk_size
        self.max_chunk_bytes = max_chunk_bytes
        self.max_retries = max_retries
        self.num_candidates = num_candidates
        self.rescore_oversample = rescore_oversample
        self.server_rrf = server_rrf
        self.index_settings = dict(index_settings or {})
        self._version: tuple[int, int] | None = None
        self._serverless = False
        self._enterprise: bool | None = None
        self._layout: _Layout | None = None
        self._kinds: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(index={self.index!r}, licence={self.effective_licence or self.licence!r})"

    @property
    def effective_licence(self) -> str | None:
        """``"enterprise"`` (server-side RRF and ColBERT) or ``"basic"``; ``None`` before the
        cluster was asked."""
        if self._enterprise is None:
            return None
        return "enterprise" if self._enterprise else "basic"

    @property
    def colbert_layout(self) -> str | None:
        """``"rank_vectors"`` or ``"binary"``; ``None`` while the index does not exist."""
        return None if self._layout is None else self._layout.colbert

    def accepts_raw_filter(self, raw: RawFilter) -> bool:
        return isinstance(raw.value, Mapping)

    # --- cluster and index ----------------------------------------------------------------

    def _g_server(self) -> _Gen:
        """Learn the version and the licence, once."""
        if self._version is None:
            info = yield ("info", {})
            version, serverless = _parse_version(info)
            if version < MIN_VERSION:
                raise StoreError(
                    f"Elasticsearch {version[0]}.{version[1]} is too old: m3connect needs "
                    f"{MIN_VERSION[0]}.{MIN_VERSION[1]} or newer (rank_vectors, sparse_vector pruning control)"
                )
            self._version, self._serverless = version, serverless
        if self._enterprise is None:
            if self.licence != "auto":
                self._enterprise = self.licence == "enterprise"
            elif self._serverless:
                self._enterprise = True
            else:
                try:
                    body = yield ("license.get", {})
                except (ApiError, TransportError) as exc:
                    logger.warning(
                        "could not read the Elasticsearch licence (%s); using basic-licence features only",
                        _api_error_text(exc),
                    )
                    self._enterprise = False
                else:
                    lic = body.get("license") or {}
                    self._enterprise = (
                        lic.get("type") in ENTERPRISE_LICENCES and lic.get("status") == "active"
                    )
                    logger.info(
                        "Elasticsearch licence %s (%s): %s features",
                        lic.get("type"),
                        lic.get("status"),
                        "enterprise" if self._enterprise else "basic",
                    )

    def _g_open(self) -> _Gen:
        """Attach to the index if it exists (checking mapping and fingerprint); True if it does."""
        yield from self._g_server()
        if self._layout is not None:
            return True
        exists = yield ("indices.exists", {"index": self.index})
        if not exists:
            return False
        body = yield ("indices.get", {"index": self.index})
        self._attach(next(iter(body.values()))["mappings"])
        return True

    def _attach(self, mappings: Mapping[str, Any]) -> None:
        layout = _check_mapping(self.index, mappings)
        if self.fingerprint is None:
            self.fingerprint = layout.fingerprint
        else:
            self.fingerprint.check_compatible(
                layout.fingerprint, f"Elasticsearch index {self.index!r}"
            )
        self._layout = layout
        self._kinds = _metadata_kinds(mappings)

    def _g_create(self) -> _Gen:
        """Create the index for ``self.fingerprint`` (or attach if someone else just did)."""
        if (yield from self._g_open()):
            return
        assert self.fingerprint is not None and self._version is not None
        colbert_layout: Literal["rank_vectors", "binary"] = (
            "rank_vectors" if self._enterprise else "binary"
        )
        v = self._version
        sparse_options = self._serverless or v >= (9, 1) or (8, 19) <= v < (9, 0)
        settings = dict(self.index_settings)
        if v >= EXCLUDE_VECTORS_VERSION and not self._serverless:
            # Keep the vectors in _source exactly as written (9.2+ drops them by default).
            settings.setdefault("index.mapping.exclude_source_vectors", False)

        def mapping(layout: Literal["rank_vectors", "binary"]) -> dict[str, Any]:
            return build_mapping(
                self.fingerprint,  # type: ignore[arg-type]
                colbert_layout=layout,
                dense_index_options=self.dense_index_options,
                sparse_index_options=sparse_options,
            )

        request = {"index": self.index, "mappings": mapping(colbert_layout)}
        if settings:
            request["settings"] = settings
        try:
            yield ("indices.create", request)
        except ApiError as exc:
            if exc.status_code == 400 and "resource_already_exists" in _api_error_text(exc):
                yield from self._g_open()
                return
            if _is_licence_error(exc) and self.licence == "auto":
                logger.warning(
                    "the cluster refused rank_vectors (%s); storing ColBERT vectors for client-side scoring",
                    _api_error_text(exc),
                )
                self._enterprise = False
                colbert_layout = "binary"
                request["mappings"] = mapping("binary")
                yield ("indices.create", request)
            elif _is_licence_error(exc):
                raise StoreError(
                    f"creating index {self.index!r} needs an Enterprise or trial licence for "
                    f"rank_vectors ({_api_error_text(exc)}); use licence='basic' or 'auto'"
                ) from exc
            else:
                raise
        self._layout = _Layout(
            self.fingerprint,
            colbert_layout,
            self.dense_index_options.get("type") in QUANTIZED_INDEX_TYPES,
        )
        self._kinds = {}

    def _source(self, fields: Iterable[str]) -> Any:
        fields = list(dict.fromkeys(fields))
        if (
            self._version is not None
            and self._version >= EXCLUDE_VECTORS_VERSION
            and ({"dense", "sparse", "colbert"} & set(fields))
        ):
            # Indices created elsewhere on 9.2+ keep vectors out of _source unless asked.
            return {"includes": fields, "exclude_vectors": False}
        return fields

    def _colbert_fields(self) -> list[str]:
        return (
            ["colbert", "colbert_meta"]
            if self._layout and self._layout.colbert == "binary"
            else ["colbert"]
        )

    @property
    def _server_colbert(self) -> bool:
        return bool(
            self._enterprise and self._layout is not None and self._layout.colbert == "rank_vectors"
        )

    # --- writing --------------------------------------------------------------------------

    def _g_add(self, batch: PreparedBatch) -> _Gen:
        if not batch.ids:
            return
        dense = batch.embeddings.dense
        norms = np.einsum("ij,ij->i", dense, dense)  # type: ignore[arg-type]
        off = np.where(np.abs(norms - 1.0) > UNIT_TOLERANCE)[0]
        if len(off):
            raise StoreError(
                f"dense vector of id {batch.ids[int(off[0])]!r} has norm {math.sqrt(norms[off[0]]):.6f}: "
                "Elasticsearch's dot_product similarity needs unit-length vectors (nothing was written)"
            )
        yield from self._g_create()
        assert self._layout is not None
        if self._layout.colbert == "rank_vectors":
            for doc_id, matrix in zip(batch.ids, batch.embeddings.colbert, strict=True):  # type: ignore[arg-type]
                if len(matrix) > RANK_VECTORS_MAX_ROWS:
                    raise StoreError(
                        f"id {doc_id!r} has {len(matrix)} ColBERT vectors; rank_vectors keeps at most "
                        f"{RANK_VECTORS_MAX_ROWS}: set max_colbert_vectors (nothing was written)"
                    )
        # A bulk request applies item by item: an add that fails part way is undone.
        yield from write_or_roll_back(
            batch,
            self._g_write,
            lambda ids: self._g_get(ids, True),
            lambda ids: self._g_delete(ids, None),
            atomic=False,
        )

    def _g_write(self, batch: PreparedBatch) -> _Gen:
        by_key: dict[str, DocId] = {}
        actions = []
        for i, doc_id in enumerate(batch.ids):
            key = es_id(doc_id)
            assert key is not None
            by_key[key] = doc_id
            actions.append(
                {
                    "_op_type": "index",
                    "_index": self.index,
                    "_id": key,
                    "_source": self._document(batch, i),
                }
            )
        results = yield ("bulk", {"actions": actions})
        self._raise_bulk_errors(results, by_key, "write")

    def _document(self, batch: PreparedBatch, i: int) -> dict[str, Any]:
        out = batch.embeddings
        doc: dict[str, Any] = {
            "uid": str(batch.ids[i]),
            "text": batch.texts[i],
            "dense": out.dense[i].tolist(),  # type: ignore[index]
            "metadata": batch.metadatas[i],
        }
        sparse = out.sparse[i]  # type: ignore[index]
        if sparse:  # an empty sparse part is simply absent
            doc["sparse"] = {str(t): float(w) for t, w in sparse.items()}
        colbert = out.colbert[i]  # type: ignore[index]
        if self._layout is not None and self._layout.colbert == "rank_vectors":
            doc["colbert"] = colbert.astype(np.float32).tolist()
        else:
            doc["colbert"], doc["colbert_meta"] = _colbert_to_binary(colbert)
        return doc

    @staticmethod
    def _raise_bulk_errors(
        results: Sequence[tuple[bool, Mapping[str, Any]]], by_key: Mapping[str, DocId], what: str
    ) -> None:
        failed: dict[DocId, str] = {}
        for ok, item in results:
            if ok:
                continue
            op, info = next(iter(item.items()))
            if op == "delete" and info.get("status") == 404:
                continue  # deleting an unknown id is not an error
            error = info.get("error")
            if isinstance(error, Mapping):
                reason = f"{error.get('type', 'error')}: {error.get('reason', '')}"
                caused = (error.get("caused_by") or {}).get("reason")
                if caused:
                    reason += f" ({caused})"
            else:
                reason = str(error)
            key = info.get("_id")
            failed[by_key.get(key, key)] = f"status {info.get('status')}, {reason}"
        if failed:
            listed = "; ".join(f"{doc_id!r}: {why}" for doc_id, why in list(failed.items())[:10])
            more = f"; and {len(failed) - 10} more" if len(failed) > 10 else ""
            raise BulkWriteError(
                f"Elasticsearch refused to {what} {len(failed)} of {len(by_key)} documents "
                f"({'the add is undone: none of it is kept' if what == 'write' else 'the others were deleted'}): "
                f"{listed}{more}",
                failed,
            )

    def _g_delete(self, ids: Sequence[DocId] | None, spec: FilterLike) -> _Gen:
        check_delete_target(ids, spec)
        ids = None if ids is None else id_list(ids)
        node = self._parse(spec) if spec is not None else None
        if not (yield from self._g_open()):
            return
        if ids:
            by_key = {key: doc_id for doc_id in ids if (key := es_id(doc_id)) is not None}
            actions = [{"_op_type": "delete", "_index": self.index, "_id": key} for key in by_key]
            if actions:
                results = yield ("bulk", {"actions": actions})
                self._raise_bulk_errors(results, by_key, "delete")
        if spec is not None:
            query = yield from self._g_filter_query(node)
            yield (
                "delete_by_query",
                {
                    "index": self.index,
                    "query": query or {"match_all": {}},
                    "refresh": bool(self.refresh),
                    "conflicts": "proceed",
                },
            )

    # --- reading --------------------------------------------------------------------------

    def _g_count(self, spec: FilterLike) -> _Gen:
        node = self._parse(spec)
        if not (yield from self._g_open()):
            return 0
        query = yield from self._g_filter_query(node)
        body = yield ("count", {"index": self.index, "query": query or {"match_all": {}}})
        return int(body["count"])

    def _g_list_ids(self, spec: FilterLike) -> _Gen:
        """Every stored id (matching ``spec``), read with a scroll: no window cap."""
        node = self._parse(spec)
        if not (yield from self._g_open()):
            return []
        query = yield from self._g_filter_query(node)
        body = yield (
            "search",
            {
                "index": self.index,
                "query": query or {"match_all": {}},
                "size": _SCROLL_PAGE,
                "scroll": _SCROLL_KEEP_ALIVE,
                "sort": ["_doc"],
                "source": self._source(["uid"]),
            },
        )
        scroll_id = body.get("_scroll_id")
        ids: list[DocId] = []
        while body["hits"]["hits"]:
            hits = body["hits"]["hits"]
            ids.extend(_user_id(h) for h in hits)
            if len(hits) < _SCROLL_PAGE:
                break
            body = yield ("scroll", {"scroll_id": scroll_id, "scroll": _SCROLL_KEEP_ALIVE})
            scroll_id = body.get("_scroll_id", scroll_id)
        if scroll_id:  # (after an error the context expires by itself)
            with contextlib.suppress(ApiError, TransportError):
                yield ("clear_scroll", {"scroll_id": scroll_id})
        return ids

    def _g_get(self, ids: Sequence[DocId], with_vectors: bool) -> _Gen:
        ids = id_list(ids)
        if not (yield from self._g_open()):
            return []
        fields = ["uid", "text", "metadata"]
        if with_vectors:
            fields += ["dense", "sparse", *self._colbert_fields()]
        keys = [key for doc_id in ids if (key := es_id(doc_id)) is not None]
        found = yield from self._g_by_ids(list(dict.fromkeys(keys)), fields)
        records = []
        for doc_id in ids:
            key = es_id(doc_id)
            if key is None or key not in found:
                continue
            source = found[key][1]
            embedding = _embedding_from_source(source, self.fingerprint) if with_vectors else None  # type: ignore[arg-type]
            records.append(
                Record(doc_id, source.get("text"), source.get("metadata") or {}, embedding)
            )
        return records

    def _g_by_ids(
        self, keys: Sequence[str], fields: Sequence[str], script: Mapping[str, Any] | None = None
    ) -> _Gen:
        """``{_id: (score, _source)}`` of the documents among ``keys``, scored by ``script``."""
        found: dict[str, tuple[float, dict[str, Any]]] = {}
        for start in range(0, len(keys), _IDS_PER_REQUEST):
            chunk = list(keys[start : start + _IDS_PER_REQUEST])
            query: dict[str, Any] = {"ids": {"values": chunk}}
            if script is not None:
                query = {"script_score": {"query": query, "script": script}}
            body = yield (
                "search",
                {
                    "index": self.index,
                    "query": query,
                    "size": len(chunk),
                    "source": self._source(["uid", *fields]),
                    "track_total_hits": False,
                },
            )
            for hit in body["hits"]["hits"]:
                found[hit["_id"]] = (hit.get("_score") or 0.0, hit.get("_source") or {})
        return found

    # --- filters --------------------------------------------------------------------------

    def _parse(self, spec: FilterLike) -> Filter | RawFilter | None:
        node = parse_filter(spec)
        if isinstance(node, RawFilter) and not self.accepts_raw_filter(node):
            raise StoreError(f"an Elasticsearch RawFilter is a query DSL dict, got {node.value!r}")
        return node

    def _g_filter_query(self, node: Filter | RawFilter | None) -> _Gen:
        """The filter as query DSL, reading the mapping of metadata keys not seen yet."""
        if node is not None and not isinstance(node, RawFilter):
            unknown = _filter_keys(node) - self._kinds.keys()
            if unknown:
                body = yield ("indices.get_mapping", {"index": self.index})
                self._kinds = _metadata_kinds(next(iter(body.values()))["mappings"])
        return filter_to_query(node, self._kinds)

    # --- searching ------------------------------------------------------------------------

    def _g_search(self, query: M3Embedding, params: SearchParams) -> _Gen:
        if not (yield from self._g_open()):
            return []
        q = _Query.of(query)
        if "dense" in params.legs:
            norm = float(np.dot(query.dense, query.dense))  # type: ignore[arg-type]
            if abs(norm - 1.0) > UNIT_TOLERANCE:
                raise StoreError(
                    f"the query's dense vector has norm {math.sqrt(norm):.6f}: Elasticsearch's "
                    "dot_product kNN needs a unit-length query vector"
                )
        flt = yield from self._g_filter_query(params.filter)
        filters = [] if flt is None else [flt]
        for attempt in (1, 2):
            try:
                return (yield from self._g_pipeline(q, params, filters))
            except ApiError as exc:
                if not _is_licence_error(exc) or attempt == 2:
                    raise
                if self.licence == "enterprise":
                    raise StoreError(
                        f"the cluster refused an Enterprise feature ({_api_error_text(exc)}); "
                        "use licence='basic' or 'auto' for client-side fusion and ColBERT scoring"
                    ) from exc
                logger.warning(
                    "the cluster refused an Enterprise feature (%s); fusing and scoring ColBERT "
                    "in the client from now on",
                    _api_error_text(exc),
                )
                self._enterprise = False
        raise AssertionError("unreachable")  # pragma: no cover

    def _use_server_rrf(self, params: SearchParams) -> bool:
        return bool(
            self.server_rrf
            and self._enterprise
            and params.mode == "hybrid"
            and params.fusion == "rrf"
            and float(params.rrf_k).is_integer()
            and params.rrf_k >= 1
            and ("colbert" not in params.legs or self._server_colbert)
        )

    def _g_pipeline(self, q: _Query, params: SearchParams, filters: list[dict[str, Any]]) -> _Gen:
        """The contract's pipeline (:func:`m3connect.search.search_steps`), its questions
        answered by Elasticsearch: legs as kNN / ``sparse_vector`` searches (or one ``rrf``
        retriever), missing scores by ``script_score`` or from the stored vectors."""

        def score(ids: Sequence[DocId], parts: Sequence[str]) -> _Gen:
            table: ScoreTable = {}
            yield from self._g_complete(q, table, ids, parts)
            return table

        def fused(limit: int) -> _Gen:
            return ((yield from self._g_rrf_retriever(q, params, filters)), {})

        steps = search_steps(q.embedding, params, fused_in_server=self._use_server_rrf(params))
        scored: list[ScoredId] = yield from drive_steps(
            steps, lambda leg, limit: self._g_leg(q, leg, limit, filters), score, fused
        )
        sources = yield from self._g_complete(q, {}, [s.id for s in scored], [], hydrate=True)
        return [
            Hit(
                s.id,
                s.score,
                s.scores,
                sources[s.id].get("text"),
                sources[s.id].get("metadata") or {},
            )
            for s in scored
        ]

    def _knn(self, q: _Query, k: int, filters: list[dict[str, Any]]) -> dict[str, Any]:
        knn: dict[str, Any] = {
            "field": "dense",
            "query_vector": q.dense,
            "k": k,
            "num_candidates": min(MAX_WINDOW, max(k, self.num_candidates, 2 * k)),
        }
        if filters:
            knn["filter"] = filters
        if self._layout is not None and self._layout.dense_quantized:
            # Scores (and the final order) from the float vectors, not the quantized ones.
            knn["rescore_vector"] = {"oversample": self.rescore_oversample}
        return knn

    def _sparse_query(self, q: _Query, filters: list[dict[str, Any]]) -> dict[str, Any]:
        if not q.sparse:
            return MATCH_NONE
        clause = {"sparse_vector": {"field": "sparse", "query_vector": q.sparse, "prune": False}}
        return {"bool": {"must": [clause], "filter": filters}} if filters else clause

    def _colbert_query(self, q: _Query, inner: dict[str, Any]) -> dict[str, Any]:
        return {
            "script_score": {
                "query": inner,
                "script": {
                    "source": COLBERT_SCRIPT,
                    "params": {"query_vector": q.colbert, "offset": q.colbert_offset},
                },
            }
        }

    def _g_leg(self, q: _Query, leg: str, limit: int, filters: list[dict[str, Any]]) -> _Gen:
        """One leg's top ``limit`` documents by its exact score."""
        if limit > MAX_WINDOW:
            raise StoreError(
                f"Elasticsearch returns at most {MAX_WINDOW} documents per leg; asked {limit}"
            )
        base = {"index": self.index, "track_total_hits": False}
        if leg == "dense":
            body = yield (
                "search",
                {**base, "knn": self._knn(q, limit, filters), "size": limit, "source": ["uid"]},
            )
            return [(_user_id(h), _dense_from_knn(h["_score"])) for h in body["hits"]["hits"]]
        if leg == "sparse":
            if not q.sparse:
                return []
            # ES ranks by weights kept to 9 significant bits: fetch a margin, rescore exactly
            # from the stored weights, cut to the limit.
            size = min(MAX_WINDOW, limit + max(10, limit // 4))
            body = yield (
                "search",
                {
                    **base,
                    "query": self._sparse_query(q, filters),
                    "size": size,
                    "source": self._source(["uid", "sparse"]),
                },
            )
            hits = body["hits"]["hits"]
            exact = lexical_scores(
                q.embedding.sparse, [_sparse_from_source(h.get("_source") or {}) for h in hits]
            )  # type: ignore[arg-type]
            ranking = [(_user_id(h), float(s)) for h, s in zip(hits, exact, strict=True)]
            return sorted(ranking, key=lambda item: -item[1])[:limit]
        inner = {"bool": {"filter": filters}} if filters else {"match_all": {}}
        if self._server_colbert:
            body = yield (
                "search",
                {**base, "query": self._colbert_query(q, inner), "size": limit, "source": ["uid"]},
            )
            return [(_user_id(h), q.colbert_mean(h["_score"])) for h in body["hits"]["hits"]]
        return (yield from self._g_colbert_scan(q, limit, inner))

    def _g_colbert_scan(self, q: _Query, limit: int, inner: dict[str, Any]) -> _Gen:
        """Basic licence: the exact ColBERT leg reads every (filtered) document's rows."""
        dim = self.fingerprint.colbert_dim  # type: ignore[union-attr]
        scored: list[tuple[DocId, float]] = []
        body = yield (
            "search",
            {
                "index": self.index,
                "query": inner,
                "size": _SCROLL_PAGE,
                "scroll": _SCROLL_KEEP_ALIVE,
                "sort": ["_doc"],
                "source": self._source(["uid", *self._colbert_fields()]),
            },
        )
        scroll_id = body.get("_scroll_id")
        while body["hits"]["hits"]:
            hits = body["hits"]["hits"]
            values = colbert_scores(
                q.embedding.colbert, [_colbert_from_source(h["_source"], dim) for h in hits]
            )  # type: ignore[arg-type]
            scored.extend((_user_id(h), float(v)) for h, v in zip(hits, values, strict=True))
            if len(hits) < _SCROLL_PAGE:
                break
            body = yield ("scroll", {"scroll_id": scroll_id, "scroll": _SCROLL_KEEP_ALIVE})
            scroll_id = body.get("_scroll_id", scroll_id)
        if scroll_id:  # (after an error the context expires by itself)
            with contextlib.suppress(ApiError, TransportError):
                yield ("clear_scroll", {"scroll_id": scroll_id})
        return sorted(scored, key=lambda item: -item[1])[:limit]

    def _g_rrf_retriever(
        self, q: _Query, params: SearchParams, filters: list[dict[str, Any]]
    ) -> _Gen:
        """Enterprise: the legs and their RRF in one request. ES's ``rrf`` scores
        ``1 / (rank_constant + rank)`` with ranks from 1, as the contract does."""
        window = params.leg_limit
        if window > MAX_WINDOW:
            raise StoreError(
                f"Elasticsearch returns at most {MAX_WINDOW} documents per leg; asked {window}"
            )
        size = params.candidates if params.rerank is not None else params.k
        children = []
        for leg in params.legs:
            if leg == "dense":
                children.append({"knn": self._knn(q, window, filters)})
            elif leg == "sparse":
                children.append({"standard": {"query": self._sparse_query(q, filters)}})
            else:
                inner = {"bool": {"filter": filters}} if filters else {"match_all": {}}
                children.append({"standard": {"query": self._colbert_query(q, inner)}})
        body = yield (
            "search",
            {
                "index": self.index,
                "retriever": {
                    "rrf": {
                        "retrievers": children,
                        "rank_constant": int(params.rrf_k),
                        "rank_window_size": window,
                    }
                },
                "size": min(size, window),
                "source": ["uid"],
                "track_total_hits": False,
            },
        )
        return [(_user_id(h), float(h["_score"])) for h in body["hits"]["hits"]]

    def _g_complete(
        self,
        q: _Query,
        table: ScoreTable,
        ids: Sequence[DocId],
        parts: Sequence[str],
        hydrate: bool = False,
    ) -> _Gen:
        """Fill ``table`` with the exact ``parts`` scores of ``ids`` (asking only what is
        missing): dense and, on Enterprise, ColBERT by ``script_score`` in the server; sparse
        (and ColBERT on basic) from the stored vectors. With ``hydrate``, return every
        document's ``_source`` (text and metadata) too."""
        need = {p: [i for i in ids if p not in table.get(i, {})] for p in parts}
        need = {p: wanted for p, wanted in need.items() if wanted}
        colbert_in_server = self._server_colbert
        fields = ["text", "metadata"] if hydrate else []
        source_ids: list[DocId] = list(ids) if hydrate else []
        if "sparse" in need:
            fields.append("sparse")
            source_ids += need["sparse"]
        if "colbert" in need and not colbert_in_server:
            fields += self._colbert_fields()
            source_ids += need["colbert"]
        if "dense" in need:
            source_ids += need["dense"]
        source_ids = list(dict.fromkeys(source_ids))
        sources: dict[DocId, dict[str, Any]] = {}
        if source_ids:
            script = None
            if "dense" in need:
                script = {
                    "source": DENSE_SCRIPT,
                    "params": {"query_vector": q.dense, "offset": q.dense_offset},
                }
            keys = {es_id(doc_id): doc_id for doc_id in source_ids}
            found = yield from self._g_by_ids(list(keys), fields, script)
            _check_found(keys, found)
            dense_wanted = set(need.get("dense", ()))
            for key, (score, source) in found.items():
                doc_id = keys[key]
                sources[doc_id] = source
                if doc_id in dense_wanted:
                    table.setdefault(doc_id, {})["dense"] = float(score) - q.dense_offset
            if "sparse" in need:
                values = lexical_scores(
                    q.embedding.sparse, [_sparse_from_source(sources[i]) for i in need["sparse"]]
                )  # type: ignore[arg-type]
                for doc_id, value in zip(need["sparse"], values, strict=True):
                    table.setdefault(doc_id, {})["sparse"] = float(value)
            if "colbert" in need and not colbert_in_server:
                dim = self.fingerprint.colbert_dim  # type: ignore[union-attr]
                matrices = [_colbert_from_source(sources[i], dim) for i in need["colbert"]]
                for doc_id, value in zip(
                    need["colbert"], colbert_scores(q.embedding.colbert, matrices), strict=True
                ):  # type: ignore[arg-type]
                    table.setdefault(doc_id, {})["colbert"] = float(value)
        if "colbert" in need and colbert_in_server:
            keys = {es_id(doc_id): doc_id for doc_id in need["colbert"]}
            script = {
                "source": COLBERT_SCRIPT,
                "params": {"query_vector": q.colbert, "offset": q.colbert_offset},
            }
            found = yield from self._g_by_ids(list(keys), [], script)
            _check_found(keys, found)
            for key, (score, _) in found.items():
                table.setdefault(keys[key], {})["colbert"] = q.colbert_mean(score)
        return sources

    # --- BM25 (an extra, not one of the contract's legs) ----------------------------------

    def _g_search_text(self, text: str, k: int, spec: FilterLike) -> _Gen:
        if not isinstance(text, str) or not isinstance(k, int) or k < 1 or k > MAX_WINDOW:
            raise StoreError(f"search_text takes a string and 1 <= k <= {MAX_WINDOW}")
        node = self._parse(spec)
        if not (yield from self._g_open()):
            return []
        flt = yield from self._g_filter_query(node)
        match = {"match": {"text": {"query": text}}}
        query = {"bool": {"must": [match], "filter": [flt]}} if flt else match
        body = yield (
            "search",
            {
                "index": self.index,
                "query": query,
                "size": k,
                "source": ["uid", "text", "metadata"],
                "track_total_hits": False,
            },
        )
        return [
            Hit(
                _user_id(h),
                float(h["_score"]),
                {"bm25": float(h["_score"])},
                h["_source"].get("text"),
                h["_source"].get("metadata") or {},
            )
            for h in body["hits"]["hits"]
        ]


def _check_found(keys: Mapping[str | None, DocId], found: Mapping[str, Any]) -> None:
    lost = [doc_id for key, doc_id in keys.items() if key not in found]
    if lost:
        raise StoreError(f"documents {lost[:5]!r} vanished from the index during the search")


def _options(
    dense_index_options: Mapping[str, Any] | None,
    licence: Licence,
    refresh: bool | str,
    chunk_size: int,
    max_chunk_bytes: int,
    max_retries: int,
    num_candidates: int,
    rescore_oversample: float,
    server_rrf: bool,
    index_settings: Mapping[str, Any] | None,
) -> dict[str, Any]:
    return {
        "licence": licence,
        "dense_index_options": dense_index_options,
        "refresh": refresh,
        "chunk_size": chunk_size,
        "max_chunk_bytes": max_chunk_bytes,
        "max_retries": max_retries,
        "num_candidates": num_candidates,
        "rescore_oversample": rescore_oversample,
        "server_rrf": server_rrf,
        "index_settings": index_settings,
    }


def _bulk_options(logic: _ElasticsearchLogic) -> dict[str, Any]:
    return {
        "chunk_size": logic.chunk_size,
        "max_chunk_bytes": logic.max_chunk_bytes,
        "max_retries": logic.max_retries,
        "raise_on_error": False,
        "raise_on_exception": False,
        "refresh": logic.refresh,
    }


def _store_error(exc: Exception) -> StoreError:
    return StoreError(f"Elasticsearch request failed: {_api_error_text(exc)}")


# --- the stores: I/O only -------------------------------------------------------------------


class ElasticsearchStore(_ElasticsearchLogic, M3Store):
    """A BGE-M3 store in one Elasticsearch index (see the module docstring for the layout).

    ``client`` is an ``elasticsearch.Elasticsearch`` (the store does not close it).
    ``licence``: ``"auto"`` asks the cluster (``GET _license``, once) and uses the ``rrf``
    retriever and ``rank_vectors`` on Enterprise/trial; ``"basic"`` never does; ``"enterprise"``
    always does (a 403 is an error). ``dense_index_options``: ``{"type": "int8_hnsw"}`` by
    default (kNN results are rescored from the float vectors), ``{"type": "flat"}`` for exact
    brute-force kNN. ``refresh`` is passed to writes (``"wait_for"``: a write returns once it is
    searchable). ``server_rrf=False`` fuses RRF in the client even on Enterprise (its sparse
    ranks then come from the exact weights, not ES's 9-bit ones).
    """

    def __init__(
        self,
        client: Elasticsearch,
        index: str = "m3connect",
        encoder: Any = None,
        *,
        fingerprint: ModelFingerprint | None = None,
        colbert_dtype: Literal["float32", "float16"] = "float32",
        max_colbert_vectors: int | None = None,
        dense_index_options: Mapping[str, Any] | None = None,
        licence: Licence = "auto",
        refresh: bool | str = "wait_for",
        chunk_size: int = 200,
        max_chunk_bytes: int = 50 * 1024 * 1024,
        max_retries: int = 3,
        num_candidates: int = 100,
        rescore_oversample: float = 2.0,
        server_rrf: bool = True,
        index_settings: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(client, Elasticsearch):
            raise StoreError(
                "ElasticsearchStore needs an elasticsearch.Elasticsearch client "
                "(for AsyncElasticsearch use AsyncElasticsearchStore)"
            )
        M3Store.__init__(
            self,
            encoder,
            fingerprint=fingerprint,
            colbert_dtype=colbert_dtype,
            max_colbert_vectors=max_colbert_vectors,
        )
        self._configure(
            index,
            **_options(
                dense_index_options,
                licence,
                refresh,
                chunk_size,
                max_chunk_bytes,
                max_retries,
                num_candidates,
                rescore_oversample,
                server_rrf,
                index_settings,
            ),
        )
        self.client = client
        self._run(self._g_open())

    def _run(self, gen: _Gen) -> Any:
        try:
            call = next(gen)
            while True:
                try:
                    result = self._call(call)
                except (ApiError, TransportError) as exc:
                    call = gen.throw(exc)
                else:
                    call = gen.send(result)
        except StopIteration as stop:
            return stop.value
        except (ApiError, TransportError) as exc:
            raise _store_error(exc) from exc

    def _call(self, call: _Call) -> Any:
        api, kwargs = call
        if api == "bulk":
            return list(
                es_helpers.streaming_bulk(self.client, kwargs["actions"], **_bulk_options(self))
            )
        response = reduce(getattr, api.split("."), self.client)(**kwargs)
        return bool(response) if api == "indices.exists" else response.body

    def open(self) -> ElasticsearchStore:
        """Attach to the index if it exists (the constructor already did)."""
        self._run(self._g_open())
        return self

    def add(self, ids, embeddings, texts=None, metadatas=None) -> None:  # type: ignore[no-untyped-def]
        self._run(self._g_add(self.prepare_batch(ids, embeddings, texts, metadatas)))

    def get(self, ids: Sequence[DocId], *, with_vectors: bool = False) -> list[Record]:
        return self._run(self._g_get(ids, with_vectors))

    def delete(self, ids: Sequence[DocId] | None = None, *, filter: FilterLike = None) -> None:
        self._run(self._g_delete(ids, filter))

    def count(self, *, filter: FilterLike = None) -> int:
        return self._run(self._g_count(filter))

    def iter_records(
        self, *, filter: FilterLike = None, with_vectors: bool = False, batch_size: int = 256
    ) -> Iterator[Record]:
        """The ids are listed first (one scroll), then read ``batch_size`` at a time."""
        _check_batch_size(batch_size)
        ids = self._run(self._g_list_ids(filter))
        for start in range(0, len(ids), batch_size):
            yield from self.get(ids[start : start + batch_size], with_vectors=with_vectors)

    def _search(self, query: M3Embedding, params: SearchParams) -> list[Hit]:
        return self._run(self._g_search(query, params))

    def search_text(self, text: str, k: int = 10, *, filter: FilterLike = None) -> list[Hit]:
        """BM25 over the ``text`` field (an extra; not one of the contract's legs)."""
        return self._run(self._g_search_text(text, k, filter))


class AsyncElasticsearchStore(_ElasticsearchLogic, AsyncM3Store):
    """The async form of :class:`ElasticsearchStore`, over ``elasticsearch.AsyncElasticsearch``.

    The constructor does no I/O: the index is attached (mapping and fingerprint checked) by
    ``await store.open()`` or by the first operation.
    """

    def __init__(
        self,
        client: AsyncElasticsearch,
        index: str = "m3connect",
        encoder: Any = None,
        *,
        fingerprint: ModelFingerprint | None = None,
        colbert_dtype: Literal["float32", "float16"] = "float32",
        max_colbert_vectors: int | None = None,
        dense_index_options: Mapping[str, Any] | None = None,
        licence: Licence = "auto",
        refresh: bool | str = "wait_for",
        chunk_size: int = 200,
        max_chunk_bytes: int = 50 * 1024 * 1024,
        max_retries: int = 3,
        num_candidates: int = 100,
        rescore_oversample: float = 2.0,
        server_rrf: bool = True,
        index_settings: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(client, AsyncElasticsearch):
            raise StoreError(
                "AsyncElasticsearchStore needs an elasticsearch.AsyncElasticsearch client "
                "(for Elasticsearch use ElasticsearchStore)"
            )
        AsyncM3Store.__init__(
            self,
            encoder,
            fingerprint=fingerprint,
            colbert_dtype=colbert_dtype,
            max_colbert_vectors=max_colbert_vectors,
        )
        self._configure(
            index,
            **_options(
                dense_index_options,
                licence,
                refresh,
                chunk_size,
                max_chunk_bytes,
                max_retries,
                num_candidates,
                rescore_oversample,
                server_rrf,
                index_settings,
            ),
        )
        self.client = client

    async def _run(self, gen: _Gen) -> Any:
        try:
            call = next(gen)
            while True:
                try:
                    result = await self._call(call)
                except (ApiError, TransportError) as exc:
                    call = gen.throw(exc)
                else:
                    call = gen.send(result)
        except StopIteration as stop:
            return stop.value
        except (ApiError, TransportError) as exc:
            raise _store_error(exc) from exc

    async def _call(self, call: _Call) -> Any:
        api, kwargs = call
        if api == "bulk":
            return [
                item
                async for item in es_helpers.async_streaming_bulk(
                    self.client, kwargs["actions"], **_bulk_options(self)
                )
            ]
        response = await reduce(getattr, api.split("."), self.client)(**kwargs)
        return bool(response) if api == "indices.exists" else response.body

    async def open(self) -> AsyncElasticsearchStore:
        """Attach to the index if it exists: check its mapping and fingerprint."""
        await self._run(self._g_open())
        return self

    async def add(self, ids, embeddings, texts=None, metadatas=None) -> None:  # type: ignore[no-untyped-def]
        await self._run(self._g_open())  # learn the stored fingerprint before validating
        await self._run(self._g_add(self.prepare_batch(ids, embeddings, texts, metadatas)))

    async def get(self, ids: Sequence[DocId], *, with_vectors: bool = False) -> list[Record]:
        return await self._run(self._g_get(ids, with_vectors))

    async def delete(
        self, ids: Sequence[DocId] | None = None, *, filter: FilterLike = None
    ) -> None:
        await self._run(self._g_delete(ids, filter))

    async def count(self, *, filter: FilterLike = None) -> int:
        return await self._run(self._g_count(filter))

    async def iter_records(  # type: ignore[override]
        self, *, filter: FilterLike = None, with_vectors: bool = False, batch_size: int = 256
    ) -> AsyncIterator[Record]:
        """The ids are listed first (one scroll), then read ``batch_size`` at a time."""
        _check_batch_size(batch_size)
        ids = await self._run(self._g_list_ids(filter))
        for start in range(0, len(ids), batch_size):
            for record in await self.get(
                ids[start : start + batch_size], with_vectors=with_vectors
            ):
                yield record

    async def search(self, query, params=None, **overrides):  # type: ignore[no-untyped-def]
        await self._run(self._g_open())  # learn the stored fingerprint before validating the query
        return await super().search(query, params, **overrides)

    async def _search(self, query: M3Embedding, params: SearchParams) -> list[Hit]:
        return await self._run(self._g_search(query, params))

    async def search_text(self, text: str, k: int = 10, *, filter: FilterLike = None) -> list[Hit]:
        """BM25 over the ``text`` field (an extra; not one of the contract's legs)."""
        return await self._run(self._g_search_text(text, k, filter))
