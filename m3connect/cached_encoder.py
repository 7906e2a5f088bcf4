"""An encoder with document and query settings and a bounded cache of its outputs.

Frameworks ask for BGE-M3's representations separately: a LangChain or LlamaIndex vector store
asks its dense embedding model for the vectors of some texts, then its sparse embedding for the
weights of the same texts (and m3connect's own stores ask for all three). One forward pass gives
all of them, so :class:`CachedEncoder` keeps each text's outputs for a while: the second request
for the same text and settings is served from the cache instead of a second forward pass.

The framework integrations (``langchain-m3connect``, ``llama-index-embeddings-m3connect``,
``llama-index-vector-stores-m3connect``) all encode through it: it is the one place where their
``encode_kwargs`` and ``query_encode_kwargs`` are checked and applied.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from m3connect.encoder import M3Encoder
from m3connect.types import REPRESENTATIONS, M3Embedding, M3Output

logger = logging.getLogger(__name__)

#: ``M3Encoder.encode`` arguments that change the vectors: part of a cache entry's key.
OUTPUT_SETTINGS = ("max_length", "colbert_dtype")
#: ``M3Encoder.encode`` arguments that only change how the work is run.
RUN_SETTINGS = ("batch_tokens", "max_batch_size", "show_progress", "progress_callback")

_DOCUMENT_MAX_LENGTH = inspect.signature(M3Encoder.encode).parameters["max_length"].default
_QUERY_MAX_LENGTH = inspect.signature(M3Encoder.encode_queries).parameters["max_length"].default
_COLBERT_DTYPE = inspect.signature(M3Encoder.encode).parameters["colbert_dtype"].default

#: Default cache bounds: more texts than LlamaIndex inserts per batch (2048), so that a batch
#: embedded by the embed model is still cached when the vector store writes it.
DEFAULT_MAX_ENTRIES = 4096
DEFAULT_MAX_BYTES = 2 * 1024**3


def check_encode_kwargs(kwargs: Mapping[str, Any] | None, name: str) -> dict[str, Any]:
    """``kwargs`` as a dict of :meth:`M3Encoder.encode` settings; anything else is an error
    naming the setting (the parts to compute are chosen by each call, not by settings)."""
    settings = dict(kwargs or {})
    parts = sorted(set(settings) & set(REPRESENTATIONS))
    if parts:
        raise TypeError(
            f"{name} must not choose the representations ({', '.join(parts)}): each call asks "
            "for the parts it needs"
        )
    unknown = sorted(set(settings) - set(OUTPUT_SETTINGS) - set(RUN_SETTINGS))
    if unknown:
        allowed = ", ".join(OUTPUT_SETTINGS + RUN_SETTINGS)
        raise TypeError(f"unknown {name} {', '.join(unknown)}; M3Encoder.encode takes {allowed}")
    return settings


class CachedEncoder:
    """An :class:`M3Encoder` with settings for documents and queries and a bounded
    least-recently-used cache of each text's outputs.

    Args:
        encoder: the encoder.
        encode_kwargs: :meth:`M3Encoder.encode` settings for documents (``max_length``,
            ``colbert_dtype``, ``batch_tokens``, ``max_batch_size``, ``show_progress``...).
        query_encode_kwargs: the same for queries (``max_length`` defaults to 512, as in
            :meth:`M3Encoder.encode_queries`).
        max_entries, max_bytes: cache bounds (texts, and bytes of vectors); ``max_entries=0``
            turns the cache off.

    A cache entry is keyed by the text and the settings that change its vectors
    (:data:`OUTPUT_SETTINGS`). A request for parts a cached entry lacks encodes again.
    :meth:`need` names parts that every forward pass should also compute: a dense embedding
    that a sparse embedding shares its cache with asks for the sparse weights in the same pass.
    """

    def __init__(
        self,
        encoder: M3Encoder,
        *,
        encode_kwargs: Mapping[str, Any] | None = None,
        query_encode_kwargs: Mapping[str, Any] | None = None,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if not isinstance(encoder, M3Encoder):
            raise TypeError(f"encoder must be an m3connect M3Encoder, got {type(encoder).__name__}")
        if max_entries < 0 or max_bytes < 0:
            raise ValueError("max_entries and max_bytes must be >= 0")
        self.encoder = encoder
        self.encode_kwargs = check_encode_kwargs(encode_kwargs, "encode_kwargs")
        self.query_encode_kwargs = check_encode_kwargs(query_encode_kwargs, "query_encode_kwargs")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._also: set[str] = set()
        self._entries: OrderedDict[tuple[Any, ...], tuple[M3Embedding, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def need(self, *parts: str) -> None:
        """Compute ``parts`` too in every forward pass from now on (for another consumer of
        the same texts that will ask for them)."""
        unknown = set(parts) - set(REPRESENTATIONS)
        if unknown:
            raise ValueError(f"unknown representation(s) {sorted(unknown)}")
        self._also.update(parts)

    def encode_documents(
        self, texts: Sequence[str], parts: Iterable[str] = REPRESENTATIONS
    ) -> M3Output:
        """``parts`` of documents ``texts`` (with ``encode_kwargs``)."""
        settings = {"max_length": _DOCUMENT_MAX_LENGTH, **self.encode_kwargs}
        return self._encode(texts, settings, parts)

    def encode_queries(
        self, texts: Sequence[str], parts: Iterable[str] = REPRESENTATIONS
    ) -> M3Output:
        """``parts`` of queries ``texts`` (with ``query_encode_kwargs``)."""
        settings = {"max_length": _QUERY_MAX_LENGTH, **self.query_encode_kwargs}
        return self._encode(texts, settings, parts)

    def encode_query(self, text: str, parts: Iterable[str] = REPRESENTATIONS) -> M3Embedding:
        """``parts`` of one query."""
        if not isinstance(text, str):
            raise TypeError(f"a query is one string, got {type(text).__name__}")
        return self.encode_queries([text], parts)[0]

    def clear_cache(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    # --- internals ------------------------------------------------------------------------

    def _encode(
        self, texts: Sequence[str], settings: dict[str, Any], parts: Iterable[str]
    ) -> M3Output:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        texts = list(texts)
        wanted = tuple(p for p in REPRESENTATIONS if p in set(parts))
        if not wanted:
            raise ValueError("nothing to compute: no representation asked for")
        if not texts:
            return M3Output(
                dense=np.zeros((0, self.encoder.dense_dim), np.float32)
                if "dense" in wanted
                else None,
                sparse=[] if "sparse" in wanted else None,
                colbert=[] if "colbert" in wanted else None,
            )
        setting_key = tuple(settings.get(name, _COLBERT_DTYPE) for name in OUTPUT_SETTINGS)
        rows: list[M3Embedding | None] = [None] * len(texts)
        with self._lock:
            for i, text in enumerate(texts):
                entry = self._entries.get((text, *setting_key))
                if entry is not None and all(getattr(entry[0], p) is not None for p in wanted):
                    self._entries.move_to_end((text, *setting_key))
                    rows[i] = entry[0]
        missing = list(dict.fromkeys(t for t, row in zip(texts, rows) if row is None))
        self.hits += len(texts) - sum(row is None for row in rows)
        if missing:
            self.misses += len(missing)
            computed = set(wanted) | self._also
            flags = {p: p in computed for p in REPRESENTATIONS}
            output = self.encoder.encode(missing, **settings, **flags)
            fresh = dict(zip(missing, output, strict=True))
            self._remember(fresh, setting_key)
            rows = [fresh[t] if row is None else row for t, row in zip(texts, rows)]
        return _stack(rows, wanted)  # type: ignore[arg-type]

    def _remember(self, fresh: Mapping[str, M3Embedding], setting_key: tuple[Any, ...]) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            for text, embedding in fresh.items():
                key = (text, *setting_key)
                old = self._entries.pop(key, None)
                if old is not None:
                    self._bytes -= old[1]
                size = _nbytes(embedding) + len(text)
                self._entries[key] = (embedding, size)
                self._bytes += size
            evicted = 0
            while self._entries and (
                len(self._entries) > self.max_entries or self._bytes > self.max_bytes
            ):
                _, (_, size) = self._entries.popitem(last=False)
                self._bytes -= size
                evicted += 1
            if evicted:
                logger.debug("encoder cache full: evicted %d texts", evicted)


def _nbytes(embedding: M3Embedding) -> int:
    size = 0
    if embedding.dense is not None:
        size += embedding.dense.nbytes
    if embedding.colbert is not None:
        size += embedding.colbert.nbytes
    if embedding.sparse is not None:
        size += 16 * len(embedding.sparse)
    return size


def _stack(rows: Sequence[M3Embedding], parts: Sequence[str]) -> M3Output:
    return M3Output(
        dense=np.stack([r.dense for r in rows]) if "dense" in parts else None,  # type: ignore[misc]
        sparse=[dict(r.sparse) for r in rows] if "sparse" in parts else None,  # type: ignore[arg-type]
        colbert=[r.colbert for r in rows] if "colbert" in parts else None,  # type: ignore[misc]
    )
