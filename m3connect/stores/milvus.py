"""Milvus adapter: BGE-M3's three representations in Milvus's native fields.

One collection row per document::

    pk             VARCHAR primary key: "s:<id>" for a string id, "i:<id>" for an int id, so
                   "1" and 1 are two documents and the id comes back with its type
    dense          FLOAT_VECTOR, metric IP (index FLAT by default: exact)
    sparse         SPARSE_FLOAT_VECTOR, SPARSE_INVERTED_INDEX, metric IP (exact)
    text           VARCHAR, the first 65535 bytes of the text (None stays None)
    text_more      ARRAY<VARCHAR>, the rest of a longer text in 65535-byte pieces
    metadata       JSON, the user's metadata as given (any key, "id" included)
    filter_values  JSON, the metadata re-typed for exact filtering (see below)

and the ColBERT vectors in one of two layouts, chosen from the server's capabilities (the user
never has to care; ``multivector=`` forces one):

- ``struct`` (Milvus >= 2.6.4): an Array-of-Struct field ``colbert`` with one ``vec`` per token,
  indexed with a ``MAX_SIM_IP`` metric; the server's MaxSim is a *sum* over query vectors,
  divided here by their number to give the reference's mean.
- ``companion`` (Milvus Lite, older servers): a second collection ``<name>__colbert`` with one
  row per token vector (``doc`` = the document's pk, ``gen``, ``pos``, ``vec``). The document row
  keeps ``colbert_gen`` and ``colbert_len``; token rows of another generation are stale and
  ignored, so an upsert (new tokens first, then the document row, then stale tokens removed) is
  never seen half done. A property ``m3connect.pending.<gen>`` marks an add in flight: a
  process killed mid-add leaves it, and the next attach deletes that generation's orphaned
  token rows (and the older rows of documents that did switch), and creates any index a
  creation cut short left missing. An add that fails with a database error is undone
  (:func:`m3connect.store.write_or_roll_back`). ``mode="colbert"`` is exact: token-level searches give each document an
  upper bound, candidates are re-scored exactly with :func:`m3connect.scoring.colbert_scores`,
  and the token limit grows until the bounds prove that no other document can enter the top
  (a threshold algorithm). Once a further round would return as many token hits as the rows
  in scope hold, every document in scope is scored from its rows instead, window by window: the
  cost stays bounded by the rows in scope whatever the bounds. ``colbert_exact=False`` stops
  after the first round instead.

Model fingerprint, layout and schema version live in the collection's properties and are
checked whenever a store attaches to an existing collection.

Filters are translated to Milvus expressions over ``filter_values``, where each metadata key
``k`` becomes up to three lists: ``"s:k"`` (its strings), ``"b:k"`` (its booleans) and
``"n:k"`` (its numbers, as doubles). Every condition is a typed ``json_contains_any`` or
positional comparison guarded by ``exists``, so the expression is two-valued and equals
:func:`m3connect.filters.matches` (missing key: false, its negation true; ``True != 1``;
``1 == 1.0``; a list matches when an element does). Values are never spliced raw into an
expression: strings are escaped, numbers written as float literals. A
:class:`~m3connect.filters.RawFilter` holding a string is passed through unchanged (it sees the
fields above, e.g. ``metadata["lang"] == "ko"``).

Search: single legs, RRF and ColBERT candidates come from the server; hybrid RRF without
re-rank runs entirely in the server (``hybrid_search`` + ``RRFRanker(k)``, whose
``1/(k + rank)`` with ranks from 1 is the core's). Weighted fusion, DBSF and re-ranking run on
the client with the core pipeline (:func:`m3connect.search.run_search`) because Milvus's
``WeightedRanker`` normalizes scores and counts a missed leg as 0, and Milvus has no DBSF.
Every hit carries the exact score of each representation the search used.

Sync and async share everything but the transport: each operation is a generator that yields
:class:`Call` s (a client method and its arguments) and receives their results;
:class:`MilvusStore` runs them on a ``MilvusClient``, :class:`AsyncMilvusStore` awaits them on
an ``AsyncMilvusClient``.

Limits (documented choices): texts up to 65535 * 4097 bytes; metadata and its filter form up to
65536 bytes of JSON each (Milvus's JSON limit), without NaN/infinity; numbers are compared as
doubles (ints beyond 2**53 lose precision in filters, not in ``get``); sparse weights are stored
as float32 (weights that round to 0 are dropped: they change no score by more than 1e-38);
sparse token ids must be below 2**32 - 2 (2**32 - 2 marks a document without sparse weights);
ids up to 65533 bytes.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
import uuid
from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pymilvus import AnnSearchRequest, DataType, MilvusClient, RRFRanker
from pymilvus.exceptions import MilvusException

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
from m3connect.scoring import colbert_scores
from m3connect.search import ScoredId, drive_steps, scores_from_embeddings, search_steps
from m3connect.store import (
    AsyncM3Store,
    Hit,
    M3Store,
    PreparedBatch,
    Record,
    SearchParams,
    StoreBase,
    StoreError,
    check_delete_target,
    id_list,
    write_or_roll_back,
)
from m3connect.types import DocId, M3Embedding, M3Output

__all__ = [
    "AsyncMilvusStore",
    "Call",
    "MilvusStore",
    "decode_pk",
    "encode_pk",
    "filter_expression",
    "filter_values",
    "quote",
]

logger = logging.getLogger(__name__)

# --- field names and limits --------------------------------------------------------------------

PK = "pk"
DENSE = "dense"
SPARSE = "sparse"
TEXT = "text"
TEXT_MORE = "text_more"
METADATA = "metadata"
FILTER_VALUES = "filter_values"
COLBERT_GEN = "colbert_gen"
COLBERT_LEN = "colbert_len"
COLBERT = "colbert"  # the Array-of-Struct field (struct layout)
COLBERT_VEC = "vec"  # its vector subfield, and the companion's vector field
TOKEN_ID = "id"
TOKEN_DOC = "doc"
TOKEN_GEN = "gen"
TOKEN_POS = "pos"

COMPANION_SUFFIX = "__colbert"
PROP_FINGERPRINT = "m3connect.fingerprint"
PROP_LAYOUT = "m3connect.layout"
PROP_SCHEMA = "m3connect.schema_version"
PROP_LIST_LENGTHS = "m3connect.numeric_list_lengths"
#: A property ``m3connect.pending.<gen>`` marks a companion-token generation whose add has not
#: finished: set before its first token row is written, dropped once the add is complete. A
#: process killed in between leaves it, and the next attach repairs that generation.
PROP_PENDING_PREFIX = "m3connect.pending."
SCHEMA_VERSION = "1"

VARCHAR_MAX = 65535  # bytes on servers (Milvus Lite counts characters: bytes bound both)
ARRAY_MAX_CAPACITY = 4096
JSON_MAX_BYTES = 65536
#: The sparse dimension that marks "no sparse weights": Milvus refuses empty sparse rows, and no
#: query ever contains this id (queries are cleaned), so it never scores.
SPARSE_PLACEHOLDER = 2**32 - 2
MILVUS_TOPK_MAX = 16384
#: Bytes of vectors per write request, and per read (Milvus servers and Lite take 256 MiB
#: messages; a read window may hold twice its expected rows).
REQUEST_BYTES = 32 << 20
READ_BYTES = 64 << 20
#: Bytes of companion token rows per insert request. Each request's rows are built just before
#: it is sent (a Python list of floats takes 8x its vector's bytes), and on Milvus Lite requests
#: of a few MiB ingest faster than larger ones (benchmarks/bench_scale.py, raw-milvus).
TOKEN_REQUEST_BYTES = 4 << 20
PK_LIST_CHUNK = 1000
_EPS = 1e-6  # slack for server (float32) versus client scores in the ColBERT bounds

Layout = Literal["struct", "companion"]


# --- ids, literals, texts -----------------------------------------------------------------------


def encode_pk(doc_id: DocId) -> str:
    """The primary key of a user id: ``"s:" + id`` for strings, ``"i:" + str(id)`` for ints."""
    if isinstance(doc_id, str):
        return "s:" + doc_id
    return f"i:{int(doc_id)}"


def decode_pk(pk: str) -> DocId:
    """The user id of a primary key, with its type."""
    if pk.startswith("s:"):
        return pk[2:]
    if pk.startswith("i:"):
        return int(pk[2:])
    raise StoreError(f"{pk!r} is not a primary key written by m3connect")


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_NEEDS_ESCAPE = re.compile(r'[\\"\n\r\t]')


def quote(value: str) -> str:
    """A Milvus string literal whose value is exactly ``value``: backslash, double quote,
    newline, carriage return and tab are escaped (the escapes both Milvus Lite and the server
    grammar read); everything else, unicode included, stands for itself inside double quotes."""
    return '"' + _NEEDS_ESCAPE.sub(lambda m: _ESCAPES[m.group()], value) + '"'


def _number(value: float) -> str:
    """A float literal (``repr`` round-trips a double; always has a dot or an exponent)."""
    text = repr(float(value))
    if not math.isfinite(float(value)):
        raise StoreError(f"filter numbers must be finite, got {value!r}")
    return text


def _pk_list(pks: Iterable[str]) -> str:
    return "[" + ", ".join(quote(pk) for pk in pks) + "]"


def _split_text(text: str) -> tuple[str, list[str]]:
    """The text in pieces of at most ``VARCHAR_MAX`` UTF-8 bytes, cut between characters."""
    data = text.encode("utf-8")
    if len(data) <= VARCHAR_MAX:
        return text, []
    pieces: list[str] = []
    start = 0
    while start < len(data):
        stop = min(start + VARCHAR_MAX, len(data))
        while stop < len(data) and (data[stop] & 0xC0) == 0x80:  # not inside a character
            stop -= 1
        pieces.append(data[start:stop].decode("utf-8"))
        start = stop
    return pieces[0], pieces[1:]


def _join_text(head: str | None, more: Sequence[str] | None) -> str | None:
    if head is None:
        return None
    return head + "".join(more or ())


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _token_requests(
    docs: Sequence[tuple[str, np.ndarray]], gen: str, size: int
) -> Iterator[list[dict[str, Any]]]:
    """The companion token rows of ``(pk, vectors)`` pairs, ``size`` rows per list, each list
    built only when it is asked for (the float32 values of the stored vectors)."""
    chunk: list[dict[str, Any]] = []
    for pk, vectors in docs:
        for pos, vec in enumerate(np.asarray(vectors, dtype=np.float32).tolist()):
            chunk.append({TOKEN_DOC: pk, TOKEN_GEN: gen, TOKEN_POS: pos, COLBERT_VEC: vec})
            if len(chunk) == size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


# --- filters ------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def filter_values(metadata: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The typed form of metadata that filter expressions test: for each key, its strings
    (``"s:key"``), booleans (``"b:key"``) and numbers as doubles (``"n:key"``); a list value
    contributes its elements. Other values (None, dicts, nested lists) never match a filter,
    as in :func:`m3connect.filters.matches`."""
    out: dict[str, list[Any]] = {}
    for key, value in metadata.items():
        elements = value if isinstance(value, (list, tuple)) else [value]
        for element in elements:
            if isinstance(element, bool):
                out.setdefault("b:" + key, []).append(element)
            elif isinstance(element, str):
                out.setdefault("s:" + key, []).append(element)
            elif isinstance(element, (int, float)):
                try:
                    number = float(element)
                except OverflowError:
                    raise StoreError(
                        f"metadata number {element!r} of key {key!r} does not fit a double"
                    ) from None
                out.setdefault("n:" + key, []).append(number)
    return out


def _numeric_list_lengths(values: Mapping[str, list[Any]]) -> dict[str, int]:
    return {key[2:]: len(v) for key, v in values.items() if key.startswith("n:") and len(v) > 1}


def _scalar_kind(value: Any) -> tuple[str, str]:
    if isinstance(value, bool):
        return "b", "true" if value else "false"
    if isinstance(value, str):
        return "s", quote(value)
    return "n", _number(value)


def filter_expression(
    node: Filter | None, list_lengths: Mapping[str, int] | None = None, field: str = FILTER_VALUES
) -> str:
    """The Milvus boolean expression of a core filter tree over the ``filter_values`` field.

    ``list_lengths`` gives, for keys whose numeric lists have more than one element somewhere,
    the longest such list: a range tests every position. Every leaf is guarded by ``exists``
    so that it is true or false, never null, and ``not`` means what it means in
    :func:`m3connect.filters.matches`.
    """
    if node is None:
        return ""
    lengths = list_lengths or {}

    def path(kind: str, key: str) -> str:
        return f"{field}[{quote(kind + ':' + key)}]"

    def contains_any(kind: str, key: str, literals: list[str]) -> str:
        p = path(kind, key)
        # json_contains_any with a list also takes negative numbers (a bare -1.0 does not parse).
        return f"(exists {p} and json_contains_any({p}, [{', '.join(literals)}]))"

    def build(n: Filter) -> str:
        if isinstance(n, Eq):
            kind, literal = _scalar_kind(n.value)
            return contains_any(kind, n.key, [literal])
        if isinstance(n, In):
            groups: dict[str, list[str]] = {}
            for value in n.values:
                kind, literal = _scalar_kind(value)
                if literal not in groups.setdefault(kind, []):
                    groups[kind].append(literal)
            parts = [contains_any(kind, n.key, literals) for kind, literals in groups.items()]
            return parts[0] if len(parts) == 1 else "(" + " or ".join(parts) + ")"
        if isinstance(n, Range):
            bounds = [
                (op, b)
                for op, b in ((">", n.gt), (">=", n.gte), ("<", n.lt), ("<=", n.lte))
                if b is not None
            ]
            terms = []
            for i in range(max(1, int(lengths.get(n.key, 1)))):
                p = f"{path('n', n.key)}[{i}]"
                tests = " and ".join(f"{p} {op} {_number(b)}" for op, b in bounds)
                terms.append(f"(exists {p} and {tests})")
            return terms[0] if len(terms) == 1 else "(" + " or ".join(terms) + ")"
        if isinstance(n, And):
            return "(" + " and ".join(build(c) for c in n.filters) + ")"
        if isinstance(n, Or):
            return "(" + " or ".join(build(c) for c in n.filters) + ")"
        if isinstance(n, Not):
            return f"(not {build(n.filter)})"
        raise StoreError(f"not a filter node: {n!r}")

    return build(node)


def _has_range(node: Filter | None) -> bool:
    if isinstance(node, Range):
        return True
    if isinstance(node, (And, Or)):
        return any(_has_range(c) for c in node.filters)
    if isinstance(node, Not):
        return _has_range(node.filter)
    return False


class _RawExpr(str):
    """An expression the user wrote (a :class:`RawFilter`): Milvus refusing it is bad input."""

    __slots__ = ()


def _is_raw(expr: str) -> bool:
    return isinstance(expr, _RawExpr)


def _and(*exprs: str) -> str:
    parts = [e for e in exprs if e]
    if len(parts) <= 1:
        return parts[0] if parts else ""
    return " and ".join(f"({e})" for e in parts)


# --- server capabilities ---------------------------------------------------------------------------


def _parse_version(version: str) -> tuple[int, int, int] | None:
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", version or "")
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def is_milvus_lite(version: str) -> bool:
    return "lite" in (version or "").lower()


def supports_struct_arrays(version: str) -> bool:
    """Array-of-Struct fields with MAX_SIM metrics: Milvus servers from 2.6.4 (not Lite)."""
    if is_milvus_lite(version):
        return False
    parsed = _parse_version(version)
    return parsed is not None and parsed >= (2, 6, 4)


# --- the sans-IO protocol ---------------------------------------------------------------------------


@dataclass
class Call:
    """One client call: ``client.<method>(**kwargs)``. Both stores run the same calls."""

    method: str
    kwargs: dict[str, Any] = field(default_factory=dict)


Steps = Generator[Call, Any, Any]


def _drive_sync(client: Any, steps: Steps) -> Any:
    try:
        call = next(steps)
        while True:
            try:
                result = getattr(client, call.method)(**call.kwargs)
            except Exception as exc:  # the operation decides (the write protocol undoes)
                call = steps.throw(exc)
            else:
                call = steps.send(result)
    except StopIteration as stop:
        return stop.value


async def _drive_async(client: Any, steps: Steps) -> Any:
    try:
        call = next(steps)
        while True:
            try:
                result = await getattr(client, call.method)(**call.kwargs)
            except Exception as exc:  # the operation decides (the write protocol undoes)
                call = steps.throw(exc)
            else:
                call = steps.send(result)
    except StopIteration as stop:
        return stop.value


# --- the shared implementation -----------------------------------------------------------------------


@dataclass
class _Doc:
    """What one search has loaded of one document (a field absent: not loaded)."""

    fields: dict[str, Any]


class _MilvusCore(StoreBase):
    """Everything both stores share: options, schemas, rows, expressions and the operations as
    generators of :class:`Call` s."""

    _is_async = False

    def __init__(
        self,
        collection: str = "m3connect",
        encoder: Any = None,
        *,
        fingerprint: ModelFingerprint | None = None,
        colbert_dtype: Literal["float32", "float16"] = "float32",
        max_colbert_vectors: int | None = None,
        multivector: Literal["auto", "struct", "companion"] = "auto",
        batch_size: int = 256,
        dense_index: Mapping[str, Any] | None = None,
        dense_search_params: Mapping[str, Any] | None = None,
        colbert_index: Mapping[str, Any] | None = None,
        colbert_search_params: Mapping[str, Any] | None = None,
        struct_max_capacity: int = ARRAY_MAX_CAPACITY,
        server_fusion: bool = True,
        colbert_exact: bool = True,
        colbert_token_limit: int = 256,
        colbert_max_token_limit: int = MILVUS_TOPK_MAX,
        colbert_filter_list_max: int = 4096,
    ) -> None:
        super().__init__(
            encoder,
            fingerprint=fingerprint,
            colbert_dtype=colbert_dtype,
            max_colbert_vectors=max_colbert_vectors,
        )
        if multivector not in ("auto", "struct", "companion"):
            raise StoreError(f"multivector must be auto, struct or companion, got {multivector!r}")
        if batch_size < 1:
            raise StoreError(f"batch_size must be >= 1, got {batch_size}")
        if not 1 <= colbert_token_limit <= colbert_max_token_limit:
            raise StoreError("need 1 <= colbert_token_limit <= colbert_max_token_limit")
        for name, index in (("dense_index", dense_index), ("colbert_index", colbert_index)):
            if index is not None and "metric_type" in index:
                raise StoreError(
                    f"{name} takes no metric_type: m3connect sets the one its scores need"
                )
        self.collection = collection
        self.companion = collection + COMPANION_SUFFIX
        self.multivector = multivector
        self.batch_size = batch_size
        self.dense_index = dict(dense_index or {"index_type": "FLAT"})
        self.dense_search_params = dict(dense_search_params or {})
        self.colbert_index = dict(colbert_index) if colbert_index is not None else None
        self.colbert_search_params = dict(colbert_search_params or {})
        self.struct_max_capacity = struct_max_capacity
        self.server_fusion = server_fusion
        self.colbert_exact = colbert_exact
        self.colbert_token_limit = colbert_token_limit
        self.colbert_max_token_limit = colbert_max_token_limit
        self.colbert_filter_list_max = colbert_filter_list_max
        self.server_version = ""
        self.layout: Layout | None = None
        self._exists = False
        self._list_lengths: dict[str, int] = {}

    # --- attaching ----------------------------------------------------------------------------

    @property
    def is_lite(self) -> bool:
        return is_milvus_lite(self.server_version)

    def _choose_layout(self) -> Layout:
        struct_ok = supports_struct_arrays(self.server_version)
        if self.multivector == "struct" and not struct_ok:
            raise StoreError(
                f"this Milvus ({self.server_version or 'unknown version'}) has no Array-of-Struct "
                "fields with MAX_SIM (Milvus >= 2.6.4 servers have them): use multivector='auto' "
                "or 'companion'"
            )
        if self.multivector == "companion":
            return "companion"
        return "struct" if struct_ok else "companion"

    def _attach(self) -> Steps:
        self.server_version = str((yield Call("get_server_version")) or "")
        exists = yield Call("has_collection", {"collection_name": self.collection})
        if not exists:
            self.layout = self._choose_layout()
            if self.fingerprint is not None:
                yield from self._create()
            return
        description = yield Call("describe_collection", {"collection_name": self.collection})
        properties = dict(description.get("properties") or {})
        if PROP_FINGERPRINT not in properties:
            raise StoreError(
                f"collection {self.collection!r} exists but was not created by m3connect "
                f"(it has no {PROP_FINGERPRINT!r} property): choose another collection name"
            )
        stored = ModelFingerprint.from_json(properties[PROP_FINGERPRINT])
        if self.fingerprint is not None:
            self.fingerprint.check_compatible(stored, f"Milvus collection {self.collection!r}")
        else:
            self.fingerprint = stored
        layout = properties.get(PROP_LAYOUT)
        if layout not in ("struct", "companion"):
            raise StoreError(
                f"collection {self.collection!r} has an unknown ColBERT layout {layout!r}"
            )
        if self.multivector not in ("auto", layout):
            raise StoreError(
                f"collection {self.collection!r} keeps ColBERT vectors in the {layout} layout; "
                f"it cannot be opened with multivector={self.multivector!r}"
            )
        self.layout = layout
        if properties.get(PROP_SCHEMA) != SCHEMA_VERSION:
            raise StoreError(
                f"collection {self.collection!r} has m3connect schema version "
                f"{properties.get(PROP_SCHEMA)!r}; this version reads {SCHEMA_VERSION!r}"
            )
        self._check_fields(self.collection, description, self._expected_main_fields(stored))
        if layout == "companion":
            if not (yield Call("has_collection", {"collection_name": self.companion})):
                raise StoreError(
                    f"collection {self.collection!r} keeps ColBERT vectors in {self.companion!r}, "
                    "which does not exist"
                )
            companion = yield Call("describe_collection", {"collection_name": self.companion})
            self._check_fields(self.companion, companion, self._expected_companion_fields(stored))
        self._list_lengths = json.loads(properties.get(PROP_LIST_LENGTHS) or "{}")
        if layout == "companion":
            # A process killed while creating the collections leaves them without indexes (a
            # server >= 2.6.4, the struct layout, creates a collection with its indexes).
            yield from self._create_missing_indexes(self.collection, self.main_index_params())
            yield from self._create_missing_indexes(self.companion, self.companion_index_params())
        # A collection opened by a new process (a Milvus Lite file included) starts released:
        # every read would fail until it is loaded.
        yield Call("load_collection", {"collection_name": self.collection})
        if layout == "companion":
            yield Call("load_collection", {"collection_name": self.companion})
        self._exists = True
        pending = sorted(k for k in properties if k.startswith(PROP_PENDING_PREFIX))
        for key in pending:
            yield from self._repair_generation(key[len(PROP_PENDING_PREFIX) :])

    def _create_missing_indexes(self, name: str, index_params: Any) -> Steps:
        """Create the indexes of ``name`` that do not exist (a creation cut short)."""
        if self.is_lite and self._is_async:
            return  # the async store never creates Lite indexes (see _create_collection)
        have = set((yield Call("list_indexes", {"collection_name": name})) or ())
        missing = [i for i in index_params if (i.index_name or i.field_name) not in have]
        if not missing:
            return
        logger.warning(
            "Milvus collection %r lacks the index of %s (a creation cut short): creating it",
            name,
            ", ".join(index.field_name for index in missing),
        )
        params = MilvusClient.prepare_index_params()
        params.extend(missing)
        kwargs: dict[str, Any] = {"collection_name": name, "index_params": params}
        if self.is_lite:
            kwargs["sync"] = False
        yield Call("create_index", kwargs)

    def _repair_generation(self, gen: str) -> Steps:
        """Finish the cleanup of an add that was cut short (see ``PROP_PENDING_PREFIX``):
        documents that switched to ``gen`` lose their older token rows; token rows of ``gen``
        whose document never switched to it are deleted; then the marker goes."""
        if not re.fullmatch(r"[0-9a-f]{32}", gen):
            raise StoreError(
                f"collection {self.collection!r} has a malformed pending marker {gen!r}"
            )
        window = MILVUS_TOPK_MAX
        while True:
            switched = yield from self._matching_pks(f"{COLBERT_GEN} == {quote(gen)}", window)
            rows = yield from self._query(
                self.companion,
                f"{TOKEN_GEN} == {quote(gen)} and {TOKEN_POS} == 0",
                [TOKEN_DOC],
                window,
            )
            orphaned = sorted({row[TOKEN_DOC] for row in rows} - set(switched))
            for chunk in _chunks(switched, PK_LIST_CHUNK):
                yield Call(
                    "delete",
                    {
                        "collection_name": self.companion,
                        "filter": f"{TOKEN_DOC} in {_pk_list(chunk)} and {TOKEN_GEN} != {quote(gen)}",
                    },
                )
            for chunk in _chunks(orphaned, PK_LIST_CHUNK):
                yield Call(
                    "delete",
                    {
                        "collection_name": self.companion,
                        "filter": f"{TOKEN_DOC} in {_pk_list(chunk)} and {TOKEN_GEN} == {quote(gen)}",
                    },
                )
            if len(rows) < window or not orphaned:
                break
        logger.warning(
            "Milvus collection %r: repaired the token rows of an add that was cut short "
            "(%d documents kept it, %d orphaned token sets deleted)",
            self.collection,
            len(switched),
            len(orphaned),
        )
        yield Call(
            "drop_collection_properties",
            {"collection_name": self.collection, "property_keys": [PROP_PENDING_PREFIX + gen]},
        )

    def _expected_main_fields(self, fp: ModelFingerprint) -> dict[str, tuple[Any, int | None]]:
        fields: dict[str, tuple[Any, int | None]] = {
            PK: (DataType.VARCHAR, None),
            DENSE: (DataType.FLOAT_VECTOR, fp.dense_dim),
            SPARSE: (DataType.SPARSE_FLOAT_VECTOR, None),
            TEXT: (DataType.VARCHAR, None),
            TEXT_MORE: (DataType.ARRAY, None),
            METADATA: (DataType.JSON, None),
            FILTER_VALUES: (DataType.JSON, None),
        }
        if self.layout == "companion":
            fields[COLBERT_GEN] = (DataType.VARCHAR, None)
            fields[COLBERT_LEN] = (DataType.INT64, None)
        return fields

    @staticmethod
    def _expected_companion_fields(fp: ModelFingerprint) -> dict[str, tuple[Any, int | None]]:
        return {
            TOKEN_ID: (DataType.INT64, None),
            TOKEN_DOC: (DataType.VARCHAR, None),
            TOKEN_GEN: (DataType.VARCHAR, None),
            TOKEN_POS: (DataType.INT64, None),
            COLBERT_VEC: (DataType.FLOAT_VECTOR, fp.colbert_dim),
        }

    @staticmethod
    def _check_fields(
        name: str, description: Mapping[str, Any], expected: Mapping[str, Any]
    ) -> None:
        have = {f["name"]: f for f in description.get("fields", [])}
        problems = []
        for fname, (dtype, dim) in expected.items():
            f = have.get(fname)
            if f is None:
                problems.append(f"no field {fname!r}")
                continue
            if f.get("type") != dtype:
                problems.append(f"field {fname!r} is {f.get('type')!r}, expected {dtype!r}")
            if dim is not None and int((f.get("params") or {}).get("dim", -1)) != dim:
                problems.append(
                    f"field {fname!r} has dim {(f.get('params') or {}).get('dim')}, expected {dim}"
                )
        if problems:
            raise StoreError(
                f"Milvus collection {name!r} does not have the schema m3connect writes: "
                + "; ".join(problems)
            )

    # --- schemas and indexes (pure) -------------------------------------------------------------------

    def main_schema(self, fp: ModelFingerprint) -> Any:
        """The document collection's schema (see the module docstring)."""
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field(PK, DataType.VARCHAR, is_primary=True, max_length=VARCHAR_MAX)
        schema.add_field(DENSE, DataType.FLOAT_VECTOR, dim=fp.dense_dim)
        schema.add_field(SPARSE, DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field(TEXT, DataType.VARCHAR, max_length=VARCHAR_MAX, nullable=True)
        schema.add_field(
            TEXT_MORE,
            DataType.ARRAY,
            element_type=DataType.VARCHAR,
            max_length=VARCHAR_MAX,
            max_capacity=ARRAY_MAX_CAPACITY,
        )
        schema.add_field(METADATA, DataType.JSON)
        schema.add_field(FILTER_VALUES, DataType.JSON)
        if self.layout == "struct":
            token = MilvusClient.create_struct_field_schema()
            token.add_field(COLBERT_VEC, DataType.FLOAT_VECTOR, dim=fp.colbert_dim)
            schema.add_field(
                COLBERT,
                DataType.ARRAY,
                element_type=DataType.STRUCT,
                struct_schema=token,
                max_capacity=self.struct_max_capacity,
            )
        else:
            schema.add_field(COLBERT_GEN, DataType.VARCHAR, max_length=64)
            schema.add_field(COLBERT_LEN, DataType.INT64)
        return schema

    @staticmethod
    def companion_schema(fp: ModelFingerprint) -> Any:
        """The token collection of the companion layout: one row per ColBERT vector."""
        schema = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
        schema.add_field(TOKEN_ID, DataType.INT64, is_primary=True, auto_id=True)
        schema.add_field(TOKEN_DOC, DataType.VARCHAR, max_length=VARCHAR_MAX)
        schema.add_field(TOKEN_GEN, DataType.VARCHAR, max_length=64)
        schema.add_field(TOKEN_POS, DataType.INT64)
        schema.add_field(COLBERT_VEC, DataType.FLOAT_VECTOR, dim=fp.colbert_dim)
        return schema

    def main_index_params(self) -> Any:
        params = MilvusClient.prepare_index_params()
        dense = dict(self.dense_index)
        params.add_index(
            DENSE,
            index_type=dense.pop("index_type", "FLAT"),
            metric_type="IP",
            params=dense.pop("params", {}),
            **dense,
        )
        params.add_index(SPARSE, index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        if self.layout == "struct":
            colbert = dict(
                self.colbert_index
                or {"index_type": "HNSW", "params": {"M": 16, "efConstruction": 200}}
            )
            params.add_index(
                f"{COLBERT}[{COLBERT_VEC}]",
                index_type=colbert.pop("index_type", "HNSW"),
                metric_type="MAX_SIM_IP",
                params=colbert.pop("params", {}),
                **colbert,
            )
        return params

    def companion_index_params(self) -> Any:
        params = MilvusClient.prepare_index_params()
        colbert = dict(self.colbert_index or {"index_type": "FLAT"})
        params.add_index(
            COLBERT_VEC,
            index_type=colbert.pop("index_type", "FLAT"),
            metric_type="IP",
            params=colbert.pop("params", {}),
            **colbert,
        )
        return params

    def _properties(self, fp: ModelFingerprint) -> dict[str, str]:
        return {
            PROP_FINGERPRINT: fp.to_json(),
            PROP_LAYOUT: str(self.layout),
            PROP_SCHEMA: SCHEMA_VERSION,
            PROP_LIST_LENGTHS: json.dumps(self._list_lengths, sort_keys=True),
        }

    def _create(self) -> Steps:
        fp = self.fingerprint
        assert fp is not None and self.layout is not None
        if self.layout == "companion":
            if not (yield Call("has_collection", {"collection_name": self.companion})):
                yield from self._create_collection(
                    self.companion, self.companion_schema(fp), self.companion_index_params(), None
                )
            else:  # left by an earlier attempt: it must fit, and may lack its index
                companion = yield Call("describe_collection", {"collection_name": self.companion})
                self._check_fields(self.companion, companion, self._expected_companion_fields(fp))
                yield from self._create_missing_indexes(
                    self.companion, self.companion_index_params()
                )
                if not self._is_async:
                    yield Call("load_collection", {"collection_name": self.companion})
                # Token rows of an add killed before the document collection existed.
                yield Call(
                    "delete", {"collection_name": self.companion, "filter": f"{TOKEN_POS} >= 0"}
                )
        yield from self._create_collection(
            self.collection, self.main_schema(fp), self.main_index_params(), self._properties(fp)
        )
        self._exists = True

    def _create_collection(
        self, name: str, schema: Any, index_params: Any, properties: dict[str, str] | None
    ) -> Steps:
        kwargs: dict[str, Any] = {
            "collection_name": name,
            "schema": schema,
            "consistency_level": "Strong",
        }
        if properties:
            kwargs["properties"] = properties
        if not self.is_lite:
            yield Call("create_collection", {**kwargs, "index_params": index_params})
            return
        # Milvus Lite builds an index at once, but pymilvus waits for it with an RPC Lite lacks
        # (AllocTimestamp): the sync client then sleeps 0.5 s per index, the async client fails.
        # So the sync store creates Lite's indexes without waiting, and the async store leaves
        # them out: Lite searches exactly without an explicit index (brute-force IP).
        yield Call("create_collection", kwargs)
        if not self._is_async:
            yield Call(
                "create_index",
                {"collection_name": name, "index_params": index_params, "sync": False},
            )
            yield Call("load_collection", {"collection_name": name})

    # --- rows (pure) ----------------------------------------------------------------------------

    def _clean_doc_sparse(self, doc_id: DocId, weights: Mapping[int, float]) -> dict[int, float]:
        out: dict[int, float] = {}
        for token, weight in weights.items():
            if not 0 <= token < SPARSE_PLACEHOLDER:
                raise StoreError(
                    f"sparse token id {token} of id {doc_id!r} is outside Milvus's range "
                    f"[0, {SPARSE_PLACEHOLDER})"
                )
            rounded = _float32(weight)
            if math.isinf(rounded):
                raise StoreError(
                    f"sparse weight {weight!r} of id {doc_id!r} does not fit a float32"
                )
            if rounded > 0:
                out[int(token)] = rounded
        return out

    def _rows(
        self, batch: PreparedBatch, gen: str
    ) -> tuple[list[dict[str, Any]], list[tuple[str, np.ndarray]], dict[str, int]]:
        """The document rows, each document's pk and ColBERT vectors (the companion layout's
        token rows, built per request by :func:`_token_requests`) and the numeric list lengths
        of a validated batch. Raises :class:`StoreError` before anything is written."""
        rows: list[dict[str, Any]] = []
        tokens: list[tuple[str, np.ndarray]] = []
        lengths: dict[str, int] = {}
        emb = batch.embeddings
        for i, doc_id in enumerate(batch.ids):
            pk = encode_pk(doc_id)
            if len(pk.encode("utf-8")) > VARCHAR_MAX:
                raise StoreError(
                    f"id {doc_id!r:.80} is longer than Milvus keys allow ({VARCHAR_MAX - 2} bytes)"
                )
            text = batch.texts[i]
            head: str | None
            more: list[str] = []
            if text is not None:
                head, more = _split_text(text)
                if len(more) > ARRAY_MAX_CAPACITY:
                    raise StoreError(
                        f"text of id {doc_id!r} is {len(text.encode())} bytes; at most "
                        f"{VARCHAR_MAX * (ARRAY_MAX_CAPACITY + 1)} fit a Milvus row"
                    )
            else:
                head = None
            try:
                metadata_json = json.dumps(
                    batch.metadatas[i], default=_json_default, allow_nan=False, ensure_ascii=False
                )
            except (TypeError, ValueError) as exc:
                raise StoreError(
                    f"metadata of id {doc_id!r} is not JSON Milvus can store: {exc}"
                ) from None
            metadata = json.loads(metadata_json)
            values = filter_values(metadata)
            values_json = json.dumps(values, ensure_ascii=False)
            for what, data in (("metadata", metadata_json), ("its filter form", values_json)):
                if len(data.encode("utf-8")) > JSON_MAX_BYTES:
                    raise StoreError(
                        f"{what} of id {doc_id!r} is {len(data.encode())} bytes of JSON; "
                        f"Milvus JSON fields hold at most {JSON_MAX_BYTES}"
                    )
            for key, n in _numeric_list_lengths(values).items():
                lengths[key] = max(lengths.get(key, 0), n)
            sparse = self._clean_doc_sparse(doc_id, emb.sparse[i])  # type: ignore[index]
            colbert = emb.colbert[i]  # type: ignore[index]
            row: dict[str, Any] = {
                PK: pk,
                DENSE: emb.dense[i].tolist(),  # type: ignore[index]
                SPARSE: sparse or {SPARSE_PLACEHOLDER: 1.0},
                TEXT: head,
                TEXT_MORE: more,
                METADATA: metadata,
                FILTER_VALUES: values,
            }
            if self.layout == "struct":
                if len(colbert) > self.struct_max_capacity:
                    raise StoreError(
                        f"id {doc_id!r} has {len(colbert)} ColBERT vectors; the struct field holds "
                        f"{self.struct_max_capacity}: set max_colbert_vectors, or "
                        "multivector='companion'"
                    )
                vectors = np.asarray(colbert, dtype=np.float32).tolist()
                row[COLBERT] = [{COLBERT_VEC: v} for v in vectors]
            else:
                row[COLBERT_GEN] = gen
                row[COLBERT_LEN] = len(colbert)
                tokens.append((pk, colbert))
            rows.append(row)
        return rows, tokens, lengths

    def _row_batches(
        self, rows: list[dict[str, Any]], vector_dims: int
    ) -> Iterable[list[dict[str, Any]]]:
        """Rows in requests of at most ``batch_size`` rows and about ``REQUEST_BYTES``."""
        batch: list[dict[str, Any]] = []
        size = 0
        for row in rows:
            row_bytes = 4 * vector_dims + 64 * len(row.get(SPARSE, ()))
            row_bytes += len(row.get(TEXT) or "") * 4 + sum(
                len(t) * 4 for t in row.get(TEXT_MORE, ())
            )
            if COLBERT in row:
                row_bytes += 4 * len(row[COLBERT]) * len(row[COLBERT][0][COLBERT_VEC])
            if batch and (len(batch) >= self.batch_size or size + row_bytes > REQUEST_BYTES):
                yield batch
                batch, size = [], 0
            batch.append(row)
            size += row_bytes
        if batch:
            yield batch

    # --- writing --------------------------------------------------------------------------------

    def _add(
        self,
        ids: Sequence[DocId],
        embeddings: M3Output,
        texts: Sequence[str | None] | None,
        metadatas: Sequence[Mapping[str, Any] | None] | None,
    ) -> Steps:
        batch = self.prepare_batch(ids, embeddings, texts, metadatas)
        if not batch.ids:
            return
        gen = uuid.uuid4().hex
        rows = self._rows(batch, gen)  # every check before the first write
        if not self._exists:
            yield from self._create()

        def write(b: PreparedBatch) -> Steps:
            if b is batch:
                yield from self._write(*rows, gen)
            else:  # the documents a failed add replaced, written back
                again = uuid.uuid4().hex
                yield from self._write(*self._rows(b, again), again)

        def read(doc_ids: list[DocId]) -> Steps:
            return (yield from self._get(doc_ids, True))

        def remove(doc_ids: list[DocId]) -> Steps:
            yield from self._delete(doc_ids, None)

        one_request = len(list(self._row_batches(rows[0], self.fingerprint.dense_dim))) == 1  # type: ignore[union-attr]
        yield from write_or_roll_back(
            batch, write, read, remove, atomic=self.layout == "struct" and one_request
        )

    def _write(
        self,
        rows: list[dict[str, Any]],
        tokens: list[tuple[str, np.ndarray]],
        lengths: dict[str, int],
        gen: str,
    ) -> Steps:
        """Write validated rows: companion tokens first (a new generation nobody reads yet, its
        pending marker set before), then the document rows switch to it, then the replaced
        documents' old generations go and the marker with them."""
        grown = {k: n for k, n in lengths.items() if n > self._list_lengths.get(k, 1)}
        if grown:
            # Filters must know the longest numeric list before any row holds one.
            yield from self._refresh_list_lengths()
            grown = {k: n for k, n in lengths.items() if n > self._list_lengths.get(k, 1)}
            if grown:
                merged = {**self._list_lengths, **grown}
                yield Call(
                    "alter_collection_properties",
                    {
                        "collection_name": self.collection,
                        "properties": {PROP_LIST_LENGTHS: json.dumps(merged, sort_keys=True)},
                    },
                )
                self._list_lengths = merged
        dim = self.fingerprint.colbert_dim  # type: ignore[union-attr]
        replaced: list[str] = []
        if self.layout == "companion":
            # Documents already stored have token rows to drop after the switch (new ids have
            # none: no delete, which would scan the token collection).
            pks = [row[PK] for row in rows]
            for chunk in _chunks(pks, PK_LIST_CHUNK):
                found = yield from self._query(
                    self.collection, f"{PK} in {_pk_list(chunk)}", [PK], len(chunk)
                )
                replaced += [row[PK] for row in found]
            # New tokens first (a new generation nobody reads yet), then the documents switch to
            # it, then the old generation goes: a reader never sees a document half written.
            # The marker lets the next attach finish the cleanup of a killed add.
            yield Call(
                "alter_collection_properties",
                {
                    "collection_name": self.collection,
                    "properties": {PROP_PENDING_PREFIX + gen: "1"},
                },
            )
            # Token rows in requests sized by bytes (a vector and its row's keys), not by count.
            per_request = max(1, TOKEN_REQUEST_BYTES // (4 * dim + 64 + 2 * len(gen)))
            for chunk in _token_requests(tokens, gen, per_request):
                yield Call("insert", {"collection_name": self.companion, "data": chunk})
        for chunk in self._row_batches(rows, self.fingerprint.dense_dim):  # type: ignore[union-attr]
            yield Call("upsert", {"collection_name": self.collection, "data": chunk})
        if self.layout == "companion":
            for chunk in _chunks(replaced, PK_LIST_CHUNK):
                yield Call(
                    "delete",
                    {
                        "collection_name": self.companion,
                        "filter": f"{TOKEN_DOC} in {_pk_list(chunk)} and {TOKEN_GEN} != {quote(gen)}",
                    },
                )
            yield Call(
                "drop_collection_properties",
                {"collection_name": self.collection, "property_keys": [PROP_PENDING_PREFIX + gen]},
            )

    def _refresh_list_lengths(self) -> Steps:
        if not self._exists:
            return
        description = yield Call("describe_collection", {"collection_name": self.collection})
        stored = json.loads((description.get("properties") or {}).get(PROP_LIST_LENGTHS) or "{}")
        for key, n in stored.items():
            self._list_lengths[key] = max(self._list_lengths.get(key, 1), int(n))

    def _expression(self, spec: FilterLike) -> Steps:
        node = parse_filter(spec)
        if isinstance(node, RawFilter):
            if not self.accepts_raw_filter(node):
                raise StoreError(f"a Milvus raw filter is an expression string, got {node.value!r}")
            return _RawExpr(node.value)
        if _has_range(node):
            yield from self._refresh_list_lengths()
        return filter_expression(node, self._list_lengths)

    def accepts_raw_filter(self, raw: RawFilter) -> bool:
        """A :class:`RawFilter` holding a Milvus boolean expression (a string)."""
        return isinstance(raw.value, str)

    def _query(
        self,
        collection: str,
        expr: str,
        output_fields: list[str],
        limit: int | None = None,
        *,
        user_expr: bool = False,
        vectors_as_arrays: bool = False,
    ) -> Steps:
        kwargs: dict[str, Any] = {
            "collection_name": collection,
            "filter": expr,
            "output_fields": output_fields,
        }
        if limit is not None:
            kwargs["limit"] = limit
        if vectors_as_arrays:
            # pymilvus decodes a float vector column into one numpy array (rows are views of
            # it) instead of a Python list of floats per row: several times faster to read.
            kwargs["strict_float32"] = True
        try:
            return list((yield Call("query", kwargs)))
        except MilvusException as exc:
            if user_expr:  # a raw filter Milvus cannot read is bad input
                raise StoreError(f"Milvus refused the filter {expr[:200]!r}: {exc}") from exc
            raise

    def _matching_pks(self, expr: str, limit: int) -> Steps:
        rows = yield from self._query(self.collection, expr, [PK], limit, user_expr=_is_raw(expr))
        return [row[PK] for row in rows]

    def _delete(self, ids: Sequence[DocId] | None, spec: FilterLike) -> Steps:
        check_delete_target(ids, spec)
        ids = None if ids is None else id_list(ids)
        pks = list(
            dict.fromkeys(
                encode_pk(i)
                for i in ids or ()
                if isinstance(i, (str, int)) and not isinstance(i, bool)
            )
        )
        expr = None
        if spec is not None:
            expr = yield from self._expression(spec)
        if not self._exists:
            return
        for chunk in _chunks(pks, PK_LIST_CHUNK):
            yield from self._delete_pks(list(chunk))
        if expr is not None:
            window = min(MILVUS_TOPK_MAX, PK_LIST_CHUNK * 4)
            while True:
                found = yield from self._matching_pks(expr, window)
                for chunk in _chunks(found, PK_LIST_CHUNK):
                    yield from self._delete_pks(list(chunk))
                if len(found) < window:
                    break

    def _delete_pks(self, pks: list[str]) -> Steps:
        if not pks:
            return
        # The document first: tokens without a document are never read.
        yield Call(
            "delete", {"collection_name": self.collection, "filter": f"{PK} in {_pk_list(pks)}"}
        )
        if self.layout == "companion":
            yield Call(
                "delete",
                {"collection_name": self.companion, "filter": f"{TOKEN_DOC} in {_pk_list(pks)}"},
            )

    def _count(self, spec: FilterLike) -> Steps:
        expr = yield from self._expression(spec)
        return (yield from self._count_expr(expr))

    def _count_expr(self, expr: str) -> Steps:
        if not self._exists:
            return 0
        rows = yield from self._query(self.collection, expr, ["count(*)"], user_expr=_is_raw(expr))
        return int(rows[0]["count(*)"]) if rows else 0

    # --- reading ---------------------------------------------------------------------------------

    def _load(
        self, docs: dict[str, _Doc | None], pks: Sequence[str], fields: Sequence[str]
    ) -> Steps:
        """Load ``fields`` of documents into ``docs`` (``None`` for a document not stored).
        ``fields`` may name ``colbert``: the vectors, from the struct field or the tokens."""
        need_colbert = COLBERT in fields
        wanted = [f for f in fields if f != COLBERT]
        if need_colbert:
            wanted += [COLBERT] if self.layout == "struct" else [COLBERT_GEN, COLBERT_LEN]
        todo = [
            pk
            for pk in dict.fromkeys(pks)
            if pk not in docs
            or (docs[pk] is not None and any(f not in docs[pk].fields for f in wanted))  # type: ignore[union-attr]
        ]
        for chunk in _chunks(todo, PK_LIST_CHUNK):
            rows = yield from self._query(
                self.collection, f"{PK} in {_pk_list(chunk)}", [PK, *wanted], len(chunk)
            )
            found = {row[PK]: row for row in rows}
            for pk in chunk:
                row = found.get(pk)
                if row is None:
                    docs[pk] = None
                    continue
                doc = docs.get(pk) or _Doc({})
                doc.fields.update({f: row.get(f) for f in wanted})
                if self.layout == "struct" and COLBERT in wanted:
                    doc.fields[COLBERT] = _struct_vectors(row.get(COLBERT))
                docs[pk] = doc
        if need_colbert and self.layout == "companion":
            pending = [
                pk
                for pk in dict.fromkeys(pks)
                if docs.get(pk) is not None and COLBERT not in docs[pk].fields  # type: ignore[union-attr]
            ]
            yield from self._load_tokens(docs, pending)

    def _load_tokens(self, docs: dict[str, _Doc | None], pks: Sequence[str]) -> Steps:
        """ColBERT vectors of documents whose ``colbert_gen`` and ``colbert_len`` are loaded.

        As few queries as the request budget allows (each one scans the token collection on
        Milvus Lite: its cost is the number of queries, then the rows), restricted to the
        documents' current generations; vectors come back as numpy arrays. A document whose
        rows do not all come back (stale rows of a cut upsert sharing a generation crowded the
        window) is asked for alone, exactly."""
        dim = self.fingerprint.colbert_dim if self.fingerprint else 0
        group_rows, limit_max = self._token_read_window()

        def store_rows(group: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> list[str]:
            by_doc: dict[str, list[tuple[int, Any]]] = {}
            for row in rows:
                doc = docs.get(row[TOKEN_DOC])
                if doc is not None and row[TOKEN_GEN] == doc.fields[COLBERT_GEN]:
                    by_doc.setdefault(row[TOKEN_DOC], []).append(
                        (int(row[TOKEN_POS]), row[COLBERT_VEC])
                    )
            short = []
            for pk in group:
                doc = docs[pk]
                assert doc is not None
                pairs = sorted(by_doc.get(pk, []), key=lambda p: p[0])
                if len(pairs) < int(doc.fields[COLBERT_LEN]):
                    short.append(pk)
                doc.fields[COLBERT] = (
                    np.asarray([v for _, v in pairs], dtype=np.float32).reshape(len(pairs), -1)
                    if pairs
                    else np.zeros((0, dim), dtype=np.float32)
                )
            return short

        def flush(group: list[str], rows_in_group: int) -> Steps:
            if not group:
                return
            gens = sorted({docs[pk].fields[COLBERT_GEN] for pk in group})  # type: ignore[union-attr]
            limit = max(1, min(limit_max, 2 * rows_in_group))
            rows = yield from self._query(
                self.companion,
                f"{TOKEN_DOC} in {_pk_list(group)} and {TOKEN_GEN} in {_pk_list(gens)}",
                [TOKEN_DOC, TOKEN_GEN, TOKEN_POS, COLBERT_VEC],
                limit,
                vectors_as_arrays=True,
            )
            for pk in store_rows(group, rows):
                doc = docs[pk]
                assert doc is not None
                n = int(doc.fields[COLBERT_LEN])
                if len(group) == 1 and limit >= n:
                    continue  # that was the exact query already
                rows = yield from self._query(
                    self.companion,
                    f"{TOKEN_DOC} == {quote(pk)} and {TOKEN_GEN} == {quote(doc.fields[COLBERT_GEN])}",
                    [TOKEN_DOC, TOKEN_GEN, TOKEN_POS, COLBERT_VEC],
                    max(1, n),
                    vectors_as_arrays=True,
                )
                store_rows([pk], rows)

        group: list[str] = []
        rows_in_group = 0
        for pk in pks:
            n = int(docs[pk].fields[COLBERT_LEN])  # type: ignore[union-attr]
            if group and rows_in_group + n > group_rows:
                yield from flush(group, rows_in_group)
                group, rows_in_group = [], 0
            group.append(pk)
            rows_in_group += n
        yield from flush(group, rows_in_group)

    def _token_read_window(self) -> tuple[int, int]:
        """``(rows of documents per token query, its row limit)``: the limit leaves room for
        as many stale rows again; servers return at most 16384 rows per query, Milvus Lite
        any number (its messages take 256 MiB: the window stays under half of that)."""
        dim = self.fingerprint.colbert_dim if self.fingerprint else 1024
        budget = max(1, READ_BYTES // (4 * dim))
        if self.is_lite:
            return budget, 2 * budget
        per_query = min(MILVUS_TOPK_MAX, budget)
        return max(1, per_query // 2), per_query

    def _embedding(self, doc: _Doc, parts: Iterable[str]) -> M3Embedding:
        f = doc.fields
        emb = M3Embedding()
        if "dense" in parts:
            emb.dense = np.asarray(f[DENSE], dtype=np.float32)
        if "sparse" in parts:
            emb.sparse = {
                int(t): float(w)
                for t, w in (f[SPARSE] or {}).items()
                if int(t) != SPARSE_PLACEHOLDER
            }
        if "colbert" in parts:
            emb.colbert = np.asarray(f[COLBERT], dtype=np.float32).astype(
                self.colbert_dtype, copy=False
            )
        return emb

    def _get(self, ids: Sequence[DocId], with_vectors: bool) -> Steps:
        ids = id_list(ids)
        if not self._exists:
            return []
        valid = [i for i in ids if isinstance(i, (str, int)) and not isinstance(i, bool)]
        pks = [encode_pk(i) for i in valid]
        docs: dict[str, _Doc | None] = {}
        fields = [TEXT, TEXT_MORE, METADATA]
        if with_vectors:
            fields += [DENSE, SPARSE, COLBERT]
        yield from self._load(docs, pks, fields)
        records = []
        for doc_id, pk in zip(valid, pks, strict=True):
            doc = docs.get(pk)
            if doc is None:
                continue
            f = doc.fields
            embedding = (
                self._embedding(doc, ("dense", "sparse", "colbert")) if with_vectors else None
            )
            records.append(
                Record(
                    doc_id, _join_text(f[TEXT], f[TEXT_MORE]), dict(f[METADATA] or {}), embedding
                )
            )
        return records

    # --- searching ---------------------------------------------------------------------------------

    def _clean_query(self, query: M3Embedding) -> M3Embedding:
        sparse = None
        if query.sparse is not None:
            # A token no document can hold contributes nothing: dropping it is exact.
            sparse = {
                int(t): float(w)
                for t, w in query.sparse.items()
                if 0 <= int(t) < SPARSE_PLACEHOLDER and float(w) > 0 and _float32(w) > 0
            }
        dense = None if query.dense is None else np.asarray(query.dense, dtype=np.float32)
        colbert = None if query.colbert is None else np.asarray(query.colbert, dtype=np.float32)
        return M3Embedding(dense=dense, sparse=sparse, colbert=colbert)

    def _search(self, query: M3Embedding, params: SearchParams) -> Steps:  # type: ignore[override]
        if not self.is_lite and max(params.leg_limit, params.k) > MILVUS_TOPK_MAX:
            raise StoreError(
                f"Milvus returns at most {MILVUS_TOPK_MAX} hits per search; "
                f"k={params.k}, candidates={params.candidates}"
            )
        expr = yield from self._expression(params.filter)
        if not self._exists:
            return []
        search = _Search(self, self._clean_query(query), params, expr)
        return (yield from search.run())


class _Search:
    """One search: caches of leg rankings and loaded documents, fed to the core pipeline."""

    def __init__(
        self, store: _MilvusCore, query: M3Embedding, params: SearchParams, expr: str
    ) -> None:
        self.store = store
        self.query = query
        self.params = params
        self.expr = expr
        self.legs: dict[str, list[tuple[DocId, float]]] = {}
        self.docs: dict[str, _Doc | None] = {}
        # Single leg, no re-rank: the leg's ranking is the answer; load texts with it.
        self.final_leg = len(params.legs) == 1 and params.rerank is None

    # --- the pipeline ---

    def run(self) -> Steps:
        """The core pipeline (:func:`m3connect.search.search_steps`), its questions answered
        by Milvus: legs as searches (or one ``hybrid_search`` with RRF), missing scores from
        the stored vectors."""

        def leg(name: str, limit: int) -> Steps:
            yield from self._leg(name, limit)
            return self.legs[name][:limit]

        def fused(limit: int) -> Steps:
            return ((yield from self._hybrid_rrf()), {})

        steps = search_steps(self.query, self.params, fused_in_server=self._server_rrf())
        scored: list[ScoredId] = yield from drive_steps(steps, leg, self._scores, fused)
        pks = [encode_pk(s.id) for s in scored]
        yield from self.store._load(self.docs, pks, [TEXT, TEXT_MORE, METADATA])
        hits = []
        for s, pk in zip(scored, pks, strict=True):
            doc = self.docs.get(pk)
            if doc is None:  # deleted while we searched
                continue
            f = doc.fields
            hits.append(
                Hit(
                    s.id,
                    s.score,
                    dict(s.scores),
                    _join_text(f[TEXT], f[TEXT_MORE]),
                    dict(f[METADATA] or {}),
                )
            )
        return hits

    def _scores(self, ids: Sequence[DocId], parts: Sequence[str]) -> Steps:
        """Exact ``parts`` scores of ``ids`` from their stored vectors, loading only those
        not already returned by an earlier call of this search."""
        fields = [{"dense": DENSE, "sparse": SPARSE, "colbert": COLBERT}[p] for p in parts]
        pks = {doc_id: encode_pk(doc_id) for doc_id in ids}
        missing = [
            pk
            for pk in pks.values()
            if pk not in self.docs
            or (self.docs[pk] is not None and any(f not in self.docs[pk].fields for f in fields))  # type: ignore[union-attr]
        ]
        if missing:
            yield from self.store._load(self.docs, missing, fields)
        embeddings = {
            doc_id: self.store._embedding(self.docs[pk], parts)  # type: ignore[arg-type]
            for doc_id, pk in pks.items()
            if self.docs.get(pk) is not None
        }
        return scores_from_embeddings(self.query, lambda _ids, _parts: embeddings)(ids, parts)

    # --- what the server computes ---

    def _output_fields(self) -> list[str]:
        return [PK, TEXT, TEXT_MORE, METADATA] if self.final_leg else [PK]

    def _remember(self, hit: Mapping[str, Any]) -> str:
        entity = hit.get("entity") or {}
        pk = entity.get(PK, hit.get(PK))
        doc = self.docs.get(pk) or _Doc({})
        doc.fields.update({k: v for k, v in entity.items() if k != PK})
        self.docs[pk] = doc
        return pk

    def _leg(self, leg: str, limit: int) -> Steps:
        if leg in self.legs:
            return
        if leg == "dense":
            ranking = yield from self._server_leg(self._dense_request(limit))
        elif leg == "sparse":
            if not self.query.sparse:
                ranking = []
            else:
                ranking = yield from self._server_leg(self._sparse_request(limit))
                ranking = [(doc_id, s) for doc_id, s in ranking if s > 0]
        elif self.store.layout == "struct":
            m = len(self.query.colbert)  # type: ignore[arg-type]
            ranking = yield from self._server_leg(self._struct_request(limit))
            ranking = [(doc_id, s / m) for doc_id, s in ranking]  # MAX_SIM is a sum
        else:
            ranking = yield from self._companion_colbert(limit)
        self.legs[leg] = ranking

    def _server_leg(self, request: dict[str, Any]) -> Steps:
        try:
            result = yield Call("search", {"collection_name": self.store.collection, **request})
        except MilvusException as exc:
            if _is_raw(self.expr):
                raise StoreError(f"Milvus refused the filter {self.expr[:200]!r}: {exc}") from exc
            raise
        return [(decode_pk(self._remember(hit)), float(hit["distance"])) for hit in result[0]]

    def _dense_request(self, limit: int) -> dict[str, Any]:
        return {
            "data": [self.query.dense.tolist()],  # type: ignore[union-attr]
            "anns_field": DENSE,
            "limit": limit,
            "filter": self.expr,
            "search_params": {"metric_type": "IP", "params": dict(self.store.dense_search_params)},
            "output_fields": self._output_fields(),
        }

    def _sparse_request(self, limit: int) -> dict[str, Any]:
        return {
            "data": [dict(self.query.sparse)],  # type: ignore[arg-type]
            "anns_field": SPARSE,
            "limit": limit,
            "filter": self.expr,
            "search_params": {"metric_type": "IP", "params": {}},
            "output_fields": self._output_fields(),
        }

    def _struct_request(self, limit: int) -> dict[str, Any]:
        from pymilvus.client.embedding_list import EmbeddingList

        return {
            "data": [EmbeddingList(np.asarray(self.query.colbert, dtype=np.float32))],
            "anns_field": f"{COLBERT}[{COLBERT_VEC}]",
            "limit": limit,
            "filter": self.expr,
            "search_params": {
                "metric_type": "MAX_SIM_IP",
                "params": dict(self.store.colbert_search_params),
            },
            "output_fields": self._output_fields(),
        }

    def _server_rrf(self) -> bool:
        """Whether the server's RRF gives the core's answer: hybrid, RRF, no re-rank, every leg
        searchable in one ``hybrid_search`` and a k Milvus takes (0 < k < 16384, integral)."""
        p = self.params
        if not (
            self.store.server_fusion
            and p.mode == "hybrid"
            and p.fusion == "rrf"
            and p.rerank is None
        ):
            return False
        if not (0 < p.rrf_k < MILVUS_TOPK_MAX and float(p.rrf_k).is_integer()):
            return False
        if "sparse" in p.legs and not self.query.sparse:
            return False
        return "colbert" not in p.legs or self.store.layout == "struct"

    def _hybrid_rrf(self) -> Steps:
        limit = self.params.leg_limit
        builders = {
            "dense": self._dense_request,
            "sparse": self._sparse_request,
            "colbert": self._struct_request,
        }
        requests = []
        for leg in self.params.legs:
            r = builders[leg](limit)
            requests.append(
                AnnSearchRequest(
                    data=r["data"],
                    anns_field=r["anns_field"],
                    param=r["search_params"],
                    limit=limit,
                    expr=self.expr,
                )
            )
        # The hits bring what their exact leg scores need (dense, sparse) and their text.
        outputs = [PK, TEXT, TEXT_MORE, METADATA] + [
            {"dense": DENSE, "sparse": SPARSE}[leg] for leg in self.params.legs if leg != "colbert"
        ]
        try:
            result = yield Call(
                "hybrid_search",
                {
                    "collection_name": self.store.collection,
                    "reqs": requests,
                    "ranker": RRFRanker(int(self.params.rrf_k)),
                    "limit": self.params.k,
                    "output_fields": outputs,
                },
            )
        except MilvusException as exc:
            if _is_raw(self.expr):
                raise StoreError(f"Milvus refused the filter {self.expr[:200]!r}: {exc}") from exc
            raise
        return [(decode_pk(self._remember(hit)), float(hit["distance"])) for hit in result[0]]

    # --- ColBERT on the companion layout: exact by a threshold algorithm ---

    def _companion_colbert(self, limit: int) -> Steps:
        """The top ``limit`` documents by exact ColBERT score.

        Each round searches the token collection with every query vector (``T`` tokens each).
        A document seen for query vector ``i`` has its best token score there; unseen, its score
        is at most the ``T``-th score ``t_i``. So ``mean_i`` of those is an upper bound of its
        ColBERT score, and ``mean_i t_i`` bounds every document not seen at all. Documents are
        scored exactly in the order of their bounds until the ``limit``-th exact score beats
        every remaining bound; if it does not beat ``mean_i t_i``, ``T`` grows (x4) and the
        search repeats. Exhausted token lists (fewer than ``T`` hits) bound nothing more.
        When the next round would bring ``m * 4T`` hits, at least the token rows in scope (or
        ``T`` may not grow), every document in scope is scored exactly instead
        (:meth:`_score_all`): on random-like vectors the bounds prove little and the rounds
        would cost far more than the rows.
        """
        store = self.store
        q = np.asarray(self.query.colbert, dtype=np.float32)
        m = len(q)
        if m == 0:
            return []
        token_expr = ""
        allowed: set[str] | None = None
        if self.expr:
            n = yield from store._count_expr(self.expr)
            if n == 0:
                return []
            if n <= store.colbert_filter_list_max:
                allowed_pks = yield from store._matching_pks(self.expr, n)
                allowed = set(allowed_pks)
                yield from store._load(self.docs, allowed_pks, [COLBERT_GEN, COLBERT_LEN])
                token_expr = f"{TOKEN_DOC} in {_pk_list(allowed_pks)}"
        exact: dict[str, float] = {}
        checked: set[str] = set(allowed or ())
        in_scope_rows: int | None = None
        T = min(max(store.colbert_token_limit, 2 * limit), store.colbert_max_token_limit)
        while True:
            result = yield Call(
                "search",
                {
                    "collection_name": store.companion,
                    "data": q.tolist(),
                    "anns_field": COLBERT_VEC,
                    "limit": T,
                    "filter": token_expr,
                    "search_params": {
                        "metric_type": "IP",
                        "params": dict(store.colbert_search_params),
                    },
                    "output_fields": [TOKEN_DOC, TOKEN_GEN],
                },
            )
            seen = {hit["entity"][TOKEN_DOC] for hits in result for hit in hits}
            new = [pk for pk in seen if pk not in checked and (allowed is None or pk in allowed)]
            if new:
                # Which of the documents exist (and match the filter), and their generation.
                for chunk in _chunks(new, PK_LIST_CHUNK):
                    rows = yield from store._query(
                        store.collection,
                        _and(f"{PK} in {_pk_list(chunk)}", self.expr),
                        [PK, COLBERT_GEN, COLBERT_LEN],
                        len(chunk),
                        user_expr=_is_raw(self.expr),
                    )
                    for row in rows:
                        doc = self.docs.get(row[PK]) or _Doc({})
                        doc.fields.update(
                            {COLBERT_GEN: row[COLBERT_GEN], COLBERT_LEN: row[COLBERT_LEN]}
                        )
                        self.docs[row[PK]] = doc
                checked.update(new)

            def valid(pk: str, gen: str) -> bool:
                doc = self.docs.get(pk)
                return (
                    (allowed is None or pk in allowed)
                    and doc is not None
                    and doc.fields.get(COLBERT_GEN) == gen
                )

            thresholds = []
            best: list[dict[str, float]] = []
            for hits in result:
                scores: dict[str, float] = {}
                for hit in hits:
                    pk, gen = hit["entity"][TOKEN_DOC], hit["entity"][TOKEN_GEN]
                    if valid(pk, gen) and pk not in scores:
                        scores[pk] = float(hit["distance"])
                best.append(scores)
                thresholds.append(float(hits[-1]["distance"]) if len(hits) >= T else -math.inf)
            candidates = set().union(*best)
            bound = {
                pk: float(np.mean([b.get(pk, t) for b, t in zip(best, thresholds, strict=True)]))
                for pk in candidates
            }
            unseen_bound = float(np.mean(thresholds))
            order = sorted((pk for pk in candidates if pk not in exact), key=lambda pk: -bound[pk])
            # Batches double: each token query costs a scan on Milvus Lite, so few large ones.
            batch_size = max(limit, 16)
            done = 0
            while done < len(order):
                kth = _kth_best(exact, limit)
                batch = []
                for pk in order[done : done + batch_size]:
                    if bound[pk] < kth - _EPS:
                        break  # (bounds are sorted: no later one can enter the top)
                    batch.append(pk)
                if not batch:
                    break
                yield from self._score_exactly(batch, exact)
                done += len(batch)
                batch_size *= 2
            kth = _kth_best(exact, limit)
            if unseen_bound == -math.inf or unseen_bound < kth - _EPS:
                break  # proven: nothing unscored can enter the top
            if store.colbert_exact:
                # The next round returns m x 4T token hits; once that is as many rows as the
                # documents in scope hold, reading those rows is the cheaper exact answer.
                if in_scope_rows is None:
                    in_scope_rows = yield from self._token_rows(token_expr)
                if m * min(T * 4, store.colbert_max_token_limit) >= in_scope_rows or (
                    store.colbert_max_token_limit <= T
                ):
                    scanned = yield from self._score_all(allowed, exact)
                    if scanned:
                        break
            if not store.colbert_exact or store.colbert_max_token_limit <= T:
                if store.colbert_exact:
                    logger.warning(
                        "ColBERT search stopped at %d tokens per query vector without proving the "
                        "top %d exact (bound %.6f, k-th score %.6f); raise colbert_max_token_limit "
                        "for an exact answer",
                        T,
                        limit,
                        unseen_bound,
                        kth,
                    )
                break
            T = min(T * 4, store.colbert_max_token_limit)
        ranked = sorted(exact.items(), key=lambda item: -item[1])[:limit]
        return [(decode_pk(pk), score) for pk, score in ranked]

    def _score_exactly(self, pks: Sequence[str], exact: dict[str, float]) -> Steps:
        """Exact ColBERT scores of documents (their current rows), in ``exact``; the rows are
        dropped again (a scan must not hold the collection in memory)."""
        q = self.query.colbert
        yield from self.store._load(self.docs, pks, [COLBERT])
        present = [pk for pk in pks if self.docs.get(pk) is not None]
        values = colbert_scores(q, [self.docs[pk].fields[COLBERT] for pk in present])  # type: ignore[arg-type,union-attr]
        exact.update({pk: float(v) for pk, v in zip(present, values, strict=True)})
        for pk in present:
            self.docs[pk].fields.pop(COLBERT, None)  # type: ignore[union-attr]

    def _token_rows(self, token_expr: str) -> Steps:
        """How many token rows the search's documents hold (stale rows included)."""
        rows = yield from self.store._query(self.store.companion, token_expr, ["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def _score_all(self, allowed: set[str] | None, exact: dict[str, float]) -> Steps:
        """Exact ColBERT scores of every document the search may return, read window by
        window: the cost is the rows in scope, whatever the bounds. ``False`` (nothing done)
        where a server cannot list that many documents in one query."""
        store = self.store
        if allowed is None:
            n = yield from store._count_expr(self.expr)
            if n > MILVUS_TOPK_MAX and not store.is_lite:
                return False
            rows = yield from store._query(
                store.collection,
                self.expr,
                [PK, COLBERT_GEN, COLBERT_LEN],
                max(1, n),
                user_expr=_is_raw(self.expr),
            )
            for row in rows:
                doc = self.docs.get(row[PK]) or _Doc({})
                doc.fields.update({COLBERT_GEN: row[COLBERT_GEN], COLBERT_LEN: row[COLBERT_LEN]})
                self.docs[row[PK]] = doc
            pks = [row[PK] for row in rows]
        else:
            pks = sorted(allowed)
        todo = [pk for pk in pks if pk not in exact]
        yield from store._load(self.docs, todo, [COLBERT_GEN, COLBERT_LEN])
        window, _ = store._token_read_window()
        batch: list[str] = []
        rows_in_batch = 0
        for pk in todo:
            doc = self.docs.get(pk)
            if doc is None:
                continue
            n_rows = int(doc.fields[COLBERT_LEN])
            if batch and rows_in_batch + n_rows > window:
                yield from self._score_exactly(batch, exact)
                batch, rows_in_batch = [], 0
            batch.append(pk)
            rows_in_batch += n_rows
        if batch:
            yield from self._score_exactly(batch, exact)
        return True


def _kth_best(scores: Mapping[str, float], k: int) -> float:
    if len(scores) < k:
        return -math.inf
    return sorted(scores.values(), reverse=True)[k - 1]


def _float32(value: float) -> float:
    try:
        return struct.unpack("<f", struct.pack("<f", float(value)))[0]
    except OverflowError:
        return math.inf


def _struct_vectors(value: Any) -> np.ndarray:
    """The vectors of an Array-of-Struct value: a list of ``{"vec": [...]}`` (or the
    column form ``{"vec": [[...], ...]}``)."""
    if value is None:
        return np.zeros((0, 0), dtype=np.float32)
    if isinstance(value, Mapping):
        return np.asarray(value[COLBERT_VEC], dtype=np.float32)
    return np.asarray([element[COLBERT_VEC] for element in value], dtype=np.float32)


# --- the two stores ----------------------------------------------------------------------------------


class MilvusStore(_MilvusCore, M3Store):
    """BGE-M3 documents in a Milvus collection (a server, or a Milvus Lite file).

    ``client`` is a ``pymilvus.MilvusClient``; :meth:`from_uri` opens one (and the store closes
    it). The collection is created on the first write (or at once when the fingerprint is known)
    and checked when it exists: its fingerprint must be compatible, its schema m3connect's.

    Options (besides :class:`~m3connect.store.StoreBase` 's): ``multivector`` (``auto``,
    ``struct``, ``companion``), ``batch_size`` (rows per write request), ``dense_index`` (e.g.
    ``{"index_type": "HNSW", "params": {"M": 16, "efConstruction": 200}}``; default exact FLAT)
    and ``dense_search_params``, ``colbert_index`` / ``colbert_search_params``,
    ``server_fusion`` (let the server do RRF where it equals the core's), ``colbert_exact``,
    ``colbert_token_limit`` and ``colbert_max_token_limit`` (the companion layout's
    ColBERT search), ``colbert_filter_list_max`` (a filter matching at most this many documents
    restricts the token search to them).
    """

    def __init__(
        self,
        client: MilvusClient,
        collection: str = "m3connect",
        encoder: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(collection, encoder, **options)
        self.client = client
        self._owns_client = False
        self._run(self._attach())

    @classmethod
    def from_uri(
        cls,
        uri: str,
        collection: str = "m3connect",
        encoder: Any = None,
        *,
        token: str = "",
        **options: Any,
    ) -> MilvusStore:
        """Open ``uri`` (``"./m3.db"`` for a Milvus Lite file, ``"http://host:19530"`` for a
        server) and attach to ``collection``; :meth:`close` closes the connection."""
        client = MilvusClient(uri=uri, token=token)
        try:
            store = cls(client, collection, encoder, **options)
        except BaseException:
            client.close()
            raise
        store._owns_client = True
        return store

    def _run(self, steps: Steps) -> Any:
        return _drive_sync(self.client, steps)

    def add(self, ids, embeddings, texts=None, metadatas=None) -> None:  # type: ignore[no-untyped-def]
        self._run(self._add(ids, embeddings, texts, metadatas))

    def get(self, ids: Sequence[DocId], *, with_vectors: bool = False) -> list[Record]:
        return self._run(self._get(ids, with_vectors))

    def delete(self, ids: Sequence[DocId] | None = None, *, filter: FilterLike = None) -> None:
        self._run(self._delete(ids, filter))

    def count(self, *, filter: FilterLike = None) -> int:
        return self._run(self._count(filter))

    def iter_records(
        self, *, filter: FilterLike = None, with_vectors: bool = False, batch_size: int = 256
    ) -> Iterator[Record]:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise StoreError(f"batch_size must be a positive integer, got {batch_size!r}")
        expr = self._run(self._expression(filter))
        if not self._exists:
            return
        # Milvus's own iterator pages by primary key: no cap on how many documents.
        pages = self.client.query_iterator(
            self.collection, batch_size=batch_size, filter=expr, output_fields=[PK]
        )
        try:
            while rows := pages.next():
                yield from self.get([decode_pk(row[PK]) for row in rows], with_vectors=with_vectors)
        finally:
            pages.close()

    def _search(self, query: M3Embedding, params: SearchParams) -> list[Hit]:  # type: ignore[override]
        return self._run(_MilvusCore._search(self, query, params))

    def finish(self) -> None:
        """Seal what a write job wrote, once at its end: Milvus (Lite especially, about 4x)
        searches growing segments far more slowly than sealed ones."""
        if not self._exists:
            return
        for name in (self.collection, self.companion):
            if self.client.has_collection(name):
                self.client.flush(name)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


class AsyncMilvusStore(_MilvusCore, AsyncM3Store):
    """The async form of :class:`MilvusStore` on a ``pymilvus.AsyncMilvusClient``: the same
    requests, awaited. It attaches to its collection on first use; ``await
    AsyncMilvusStore.open(client, ...)`` attaches at once (and raises a fingerprint mismatch
    there). On Milvus Lite the collections it creates have no explicit vector indexes (Lite
    searches exactly without them; ``AsyncMilvusClient`` cannot wait for an index build there).
    """

    _is_async = True

    def __init__(
        self, client: Any, collection: str = "m3connect", encoder: Any = None, **options: Any
    ) -> None:
        super().__init__(collection, encoder, **options)
        self.client = client
        self._owns_client = False
        self._attached = False

    @classmethod
    async def open(
        cls, client: Any, collection: str = "m3connect", encoder: Any = None, **options: Any
    ) -> AsyncMilvusStore:
        store = cls(client, collection, encoder, **options)
        await store._ensure_attached()
        return store

    @classmethod
    async def from_uri(
        cls,
        uri: str,
        collection: str = "m3connect",
        encoder: Any = None,
        *,
        token: str = "",
        **options: Any,
    ) -> AsyncMilvusStore:
        from pymilvus import AsyncMilvusClient

        client = AsyncMilvusClient(uri=uri, token=token)
        try:
            store = await cls.open(client, collection, encoder, **options)
        except BaseException:
            await client.close()
            raise
        store._owns_client = True
        return store

    async def _ensure_attached(self) -> None:
        if not self._attached:
            await _drive_async(self.client, self._attach())
            self._attached = True

    async def _run(self, steps: Steps) -> Any:
        await self._ensure_attached()
        return await _drive_async(self.client, steps)

    async def add(self, ids, embeddings, texts=None, metadatas=None) -> None:  # type: ignore[no-untyped-def]
        await self._ensure_attached()
        await self._run(self._add(ids, embeddings, texts, metadatas))

    async def get(self, ids: Sequence[DocId], *, with_vectors: bool = False) -> list[Record]:
        return await self._run(self._get(ids, with_vectors))

    async def delete(
        self, ids: Sequence[DocId] | None = None, *, filter: FilterLike = None
    ) -> None:
        await self._run(self._delete(ids, filter))

    async def count(self, *, filter: FilterLike = None) -> int:
        return await self._run(self._count(filter))

    async def iter_records(  # type: ignore[override]
        self, *, filter: FilterLike = None, with_vectors: bool = False, batch_size: int = 256
    ) -> AsyncIterator[Record]:
        """Pages by primary key, as pymilvus's (sync-only) query iterator does: each page asks
        for the documents after the last one read, in the server's iterator order."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise StoreError(f"batch_size must be a positive integer, got {batch_size!r}")
        await self._ensure_attached()
        expr = await self._run(self._expression(filter))
        cursor: str | None = None
        while self._exists:
            page_expr = expr
            if cursor is not None:
                page_expr = f"{PK} > {quote(cursor)}" + (f" and ({expr})" if expr else "")
            rows = await self.client.query(
                self.collection,
                filter=page_expr,
                output_fields=[PK],
                limit=batch_size,
                # The query iterator's options: results in primary-key order.
                iterator="True",
                reduce_stop_for_best="True",
            )
            pks = [row[PK] for row in rows]
            if pks != sorted(pks):  # the cursor would skip documents: refuse, do not guess
                raise StoreError("Milvus returned a page out of primary-key order")
            for record in await self.get([decode_pk(pk) for pk in pks], with_vectors=with_vectors):
                yield record
            if len(pks) < batch_size:
                break
            cursor = pks[-1]

    async def search(
        self, query: str | M3Embedding, params: SearchParams | None = None, **overrides: Any
    ) -> list[Hit]:
        await self._ensure_attached()  # the fingerprint checks the query's dimensions
        return await super().search(query, params, **overrides)

    async def _search(self, query: M3Embedding, params: SearchParams) -> list[Hit]:  # type: ignore[override]
        return await self._run(_MilvusCore._search(self, query, params))

    async def close(self) -> None:
        if self._owns_client:
            await self.client.close()
