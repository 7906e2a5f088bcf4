"""Indexing jobs: read -> chunk -> encode once -> write the same vectors to every store.

    from m3connect.indexing import IndexJob
    job = IndexJob(encoder, ["qdrant:./m3connect.qdrant", "es+http://localhost:9200/docs"],
                   max_tokens=8192, overlap=0)
    summary = job.run("corpus.jsonl")       # a path, a Source, or SourceRecords
    print(summary.format())

What a job guarantees:

- **One forward pass per chunk**, whatever the number of stores: the same :class:`M3Output`
  is written to each (a chunk missing from only some stores is written only to those).
- **Idempotent and resumable.** Chunk ids are stable (``"{doc_id}#{chunk_no}"``, see
  :mod:`m3connect.chunking`) and every chunk carries a hash of its document. Before encoding a
  batch the job asks each store (``get``) which chunks it already holds: a document whose chunks
  are all there with the same hash is skipped; a missing chunk is written (upsert); a document
  whose text or metadata changed is deleted (every chunk, by ``doc_id``) and written anew. An
  interrupted job (Ctrl-C, a database that went away) therefore continues where it stopped on
  the next run: nothing is lost, nothing is duplicated.
- **No mixed settings.** The chunking settings go into each store's fingerprint
  (``encoder.fingerprint.with_extra(chunking=...)``): opening a store indexed with another
  ``max_tokens``/``overlap`` (or another model) is an :class:`IndexingError` that says so; with
  ``rebuild=True`` the collection is dropped and indexed from scratch instead.

With ``ray=RayOptions(...)`` the same job runs on Ray Data (:class:`RayOptions`): encoder actors
in ``map_batches``; server stores are written by the actors, embedded stores (one process per
file) by the driver.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from m3connect.chunking import (
    CHUNK_COUNT_KEY,
    DOC_HASH_KEY,
    DOC_ID_KEY,
    Chunk,
    Chunker,
)
from m3connect.fingerprint import FingerprintMismatchError, ModelFingerprint
from m3connect.sources import BadRecord, Source, SourceError, SourceRecord, open_source
from m3connect.store import M3Store
from m3connect.types import DocId, M3Output
from m3connect.uris import StoreHandle, StoreURI, open_store, parse_store_uri

if TYPE_CHECKING:
    from m3connect.encoder import M3Encoder

__all__ = [
    "IndexJob",
    "IndexSummary",
    "IndexingError",
    "RayOptions",
    "drop_collection",
    "index_fingerprint",
    "DEFAULT_WRITE_CHUNKS",
]

logger = logging.getLogger(__name__)

#: Chunks encoded and written per step: a resumed job repeats at most one step's work.
DEFAULT_WRITE_CHUNKS = 256
#: Tokens per step at most (ColBERT vectors are ``tokens x dim`` floats: bounds memory).
DEFAULT_WRITE_TOKENS = 131072
_TOKENIZE_DOCS = 64


class IndexingError(RuntimeError):
    """A job that cannot start or go on (settings that do not match a store, a bad record with
    ``on_error="stop"``), with what to do in the message."""


def index_fingerprint(encoder_fingerprint: ModelFingerprint, chunker: Chunker) -> ModelFingerprint:
    """The fingerprint of a store that a job with these chunking settings writes."""
    return encoder_fingerprint.with_extra(chunking=chunker.settings)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


@dataclass
class IndexSummary:
    """What a job did. ``docs`` counts the good records read; each of them was ``indexed``
    (encoded and written, ``updated`` among them when it had changed) or ``skipped`` (already
    stored). ``errors`` are the bad records skipped."""

    stores: list[str] = field(default_factory=list)
    docs: int = 0
    indexed: int = 0
    updated: int = 0
    skipped: int = 0
    chunks: int = 0
    tokens: int = 0
    bad_records: list[BadRecord] = field(default_factory=list)
    seconds: float = 0.0
    #: Where the time went: opening the stores, encoding (this process), writing to the stores
    #: (add/delete), and asking them what they hold (get); the rest is reading and chunking.
    open_seconds: float = 0.0
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    lookup_seconds: float = 0.0
    #: ``None`` when the job finished; else why it stopped.
    stopped: str | None = None

    @property
    def errors(self) -> int:
        return len(self.bad_records)

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "stores": list(self.stores),
            "docs": self.docs,
            "indexed": self.indexed,
            "updated": self.updated,
            "skipped": self.skipped,
            "chunks": self.chunks,
            "tokens": self.tokens,
            "errors": self.errors,
            "bad_records": [str(b) for b in self.bad_records],
            "seconds": round(self.seconds, 3),
            "open_seconds": round(self.open_seconds, 3),
            "docs_per_s": round(self.docs_per_s, 2),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "encode_seconds": round(self.encode_seconds, 3),
            "write_seconds": round(self.write_seconds, 3),
            "lookup_seconds": round(self.lookup_seconds, 3),
            "stopped": self.stopped,
        }

    def format(self) -> str:
        status = "done" if self.stopped is None else f"STOPPED ({self.stopped})"
        lines = [
            f"{status}: {plural(self.docs, 'document')} in {self.seconds:.1f} s "
            f"({self.docs_per_s:,.1f} docs/s, {self.tokens_per_s:,.0f} tokens/s)",
            f"  indexed  {plural(self.indexed, 'document')} ({self.updated:,} changed since "
            f"stored): {plural(self.chunks, 'chunk')}, {plural(self.tokens, 'token')} encoded",
            f"  skipped  {plural(self.skipped, 'document')} already stored",
            f"  errors   {plural(self.errors, 'bad record')} skipped",
        ]
        for bad in self.bad_records[:10]:
            lines.append(f"    {bad}")
        if self.errors > 10:
            lines.append(f"    ... and {self.errors - 10} more")
        lines.append(f"  stores   {', '.join(self.stores)}")
        other = max(
            0.0,
            self.seconds
            - self.open_seconds
            - self.encode_seconds
            - self.write_seconds
            - self.lookup_seconds,
        )
        lines.append(
            f"  time     open {self.open_seconds:.1f} s, encode {self.encode_seconds:.1f} s, "
            f"write {self.write_seconds:.1f} s, lookup {self.lookup_seconds:.1f} s, "
            f"read+chunk {other:.1f} s"
        )
        if self.stopped is not None:
            lines.append("  run the same command again to continue where it stopped")
        return "\n".join(lines)


def plural(n: int, word: str) -> str:
    """``1 document``, ``2 documents`` (for the summaries people read)."""
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


#: Set on an exception raised while a store was opened or written: which store (the command
#: line names it in its one-line error).
STORE_ATTRIBUTE = "m3connect_store"


def _tag_store(exc: BaseException, label: str) -> None:
    if getattr(exc, STORE_ATTRIBUTE, None) is None:
        with contextlib.suppress(AttributeError, TypeError):
            setattr(exc, STORE_ATTRIBUTE, label)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------


@dataclass
class _Target:
    label: str
    store: M3Store
    handle: StoreHandle | None
    uri: StoreURI | None

    @property
    def embedded(self) -> bool:
        return self.uri is None or self.uri.embedded

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def drop_collection(uri: str | StoreURI) -> None:
    """Delete the collection (index) ``uri`` names, with everything the store keeps beside it
    (its fingerprint, companion collections). A store that does not exist is fine."""
    parsed = parse_store_uri(uri)
    if parsed.kind == "memory":
        from m3connect.uris import drop_memory_store

        if parsed.collection:
            drop_memory_store(parsed.collection)
        return
    cls = parsed.store_class()
    dropper = getattr(cls, "drop_collection", None)
    client = parsed.connect()
    try:
        if callable(dropper):
            dropper(client, parsed.collection)
            return
        # The collection and what the adapter keeps beside it (the fingerprint lives inside).
        if parsed.kind == "qdrant":
            if client.collection_exists(parsed.collection):
                client.delete_collection(parsed.collection)
        elif parsed.kind == "milvus":
            from m3connect.stores.milvus import COMPANION_SUFFIX

            # The ColBERT vectors may live in a companion collection (Milvus Lite).
            for name in (parsed.collection, parsed.collection + COMPANION_SUFFIX):
                if client.has_collection(name):
                    client.drop_collection(name)
        else:
            client.indices.delete(index=parsed.collection, ignore_unavailable=True)
    finally:
        with contextlib.suppress(Exception):
            client.close()


def _open_target(
    spec: str | StoreURI | M3Store, fingerprint: ModelFingerprint, rebuild: bool
) -> _Target:
    """Open (or take) a store for a job with ``fingerprint``; a store of other settings is an
    :class:`IndexingError` (or, with ``rebuild``, is emptied first)."""
    if isinstance(spec, M3Store):
        label = f"{type(spec).__name__}"
        if rebuild:
            spec.delete(filter={})
            spec.fingerprint = fingerprint
        elif spec.fingerprint is None:
            spec.fingerprint = fingerprint
        else:
            try:
                fingerprint.check_compatible(spec.fingerprint, label)
            except FingerprintMismatchError:
                # A store made with the encoder (no chunking settings yet) and still empty
                # takes the job's settings.
                if "chunking" in spec.fingerprint.extra or spec.count() > 0:
                    raise _mismatch(label, spec.fingerprint, fingerprint) from None
                spec.fingerprint = fingerprint
        return _Target(label, spec, None, None)
    uri = parse_store_uri(spec)
    if rebuild:
        drop_collection(uri)
    try:
        handle = open_store(uri, fingerprint=fingerprint)
    except FingerprintMismatchError as exc:
        stored = None
        with contextlib.suppress(Exception), open_store(uri) as existing:
            stored = existing.store.fingerprint
        raise _mismatch(str(uri), stored, fingerprint, exc) from None
    except Exception as exc:
        _tag_store(exc, str(uri))
        raise
    return _Target(str(uri), handle.store, handle, uri)


def _chunking_text(settings: Any) -> str:
    if not isinstance(settings, dict):
        return "no chunking settings (written by hand, not by an indexing job)"
    return f"max_tokens {settings.get('max_tokens')}, overlap {settings.get('overlap')}"


def _mismatch(
    label: str,
    stored: ModelFingerprint | None,
    wanted: ModelFingerprint,
    exc: Exception | None = None,
) -> IndexingError:
    what = "another model or other settings"
    if stored is not None:
        theirs, mine = stored.extra.get("chunking"), wanted.extra.get("chunking")
        same_model = (stored.dense_dim, stored.colbert_dim) == (
            wanted.dense_dim,
            wanted.colbert_dim,
        ) and all(
            not getattr(stored, h)
            or not getattr(wanted, h)
            or getattr(stored, h) == getattr(wanted, h)
            for h in ("heads_sha256", "body_sha256")
        )
        if same_model and theirs != mine:
            what = f"other chunking settings ({_chunking_text(theirs)}; this job: {_chunking_text(mine)})"
        elif not same_model:
            what = f"another model ({stored.model}; this job: {wanted.model})"
    detail = f" Details: {exc}" if exc is not None and stored is None else ""
    return IndexingError(
        f"{label} was indexed with {what}, and a job never mixes two settings in one "
        f"collection. Run again with --rebuild (rebuild=True) to drop it and index everything "
        f"anew, use the same settings as before, or index into another collection.{detail}"
    )


# --------------------------------------------------------------------------------------------
# Work items
# --------------------------------------------------------------------------------------------


@dataclass
class _Doc:
    record: SourceRecord
    chunks: list[Chunk]
    digest: str

    @property
    def tokens(self) -> int:
        return sum(c.n_tokens for c in self.chunks)


@dataclass
class _Work:
    """One step: the chunks to encode, which stores need each, and stale documents."""

    chunks: list[Chunk] = field(default_factory=list)
    metadatas: list[dict[str, Any]] = field(default_factory=list)
    #: per chunk: indices of the targets that need it
    needed_by: list[list[int]] = field(default_factory=list)
    #: per target: doc ids to delete before writing (they changed)
    stale: list[list[DocId]] = field(default_factory=list)
    indexed: int = 0
    updated: int = 0
    skipped: int = 0

    @property
    def tokens(self) -> int:
        return sum(c.n_tokens for c in self.chunks)


def _doc_digest(record: SourceRecord) -> str:
    import hashlib

    payload = json.dumps(
        [record.text, record.metadata], sort_keys=True, ensure_ascii=False, default=str
    )
    return hashlib.sha256(payload.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


@dataclass
class RayOptions:
    """Run the encoding on Ray Data.

    ``concurrency``: encoder actors (each loads the model once per window). ``batch_size``:
    chunks per ``map_batches`` call. ``num_cpus``/``num_gpus``: per actor. ``window``: chunks
    per Ray Data run (bounds the driver's memory; a resumed job repeats at most one window of
    work whose writes did not finish). ``writer``: who writes — ``"auto"`` (actors write to server
    stores, the driver to embedded ones), ``"driver"`` (the driver writes everything), or
    ``"workers"`` (actors write everything; only for stores that several processes can open).
    ``address``: a Ray cluster (default: ``RAY_ADDRESS`` or a local instance).
    """

    concurrency: int = 2
    batch_size: int = 64
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    window: int = 50_000
    writer: str = "auto"
    address: str | None = None
    init_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.writer not in ("auto", "driver", "workers"):
            raise ValueError(f"writer must be auto, driver or workers, got {self.writer!r}")
        if self.concurrency < 1 or self.batch_size < 1 or self.window < 1:
            raise ValueError("concurrency, batch_size and window must be >= 1")


class IndexJob:
    """Index documents into one or more stores (see the module docs).

    ``stores``: store URIs (:mod:`m3connect.uris`) or store objects. ``max_tokens``: tokens
    per chunk, specials included (default: the model's limit, 8192 for BGE-M3). ``overlap``:
    tokens shared by consecutive chunks. ``batch_tokens``: padded tokens per forward pass.
    ``write_chunks``/``write_tokens``: the size of a step (encode + write). ``rebuild``: drop
    each store's collection first. ``progress``: a tqdm bar (docs/s, tokens/s) on stderr.
    ``ray``: :class:`RayOptions` to run on Ray Data; ``model``: the checkpoint the Ray actors
    load (default: the encoder's name).
    """

    def __init__(
        self,
        encoder: M3Encoder,
        stores: Sequence[str | StoreURI | M3Store],
        *,
        max_tokens: int | None = None,
        overlap: int = 0,
        batch_tokens: int | None = None,
        write_chunks: int = DEFAULT_WRITE_CHUNKS,
        write_tokens: int = DEFAULT_WRITE_TOKENS,
        rebuild: bool = False,
        progress: bool = False,
        ray: RayOptions | None = None,
        model: str | None = None,
    ) -> None:
        if not stores:
            raise IndexingError("an indexing job needs at least one store")
        if isinstance(stores, (str, M3Store, StoreURI)):
            stores = [stores]
        self.encoder = encoder
        self.store_specs = list(stores)
        self.max_tokens = max_tokens if max_tokens is not None else int(encoder.max_length)
        if self.max_tokens > encoder.max_length:
            raise IndexingError(
                f"max_tokens {self.max_tokens} is more than the {encoder.max_length} tokens the "
                f"model allows"
            )
        try:
            self.chunker = Chunker(encoder.tokenizer, self.max_tokens, overlap)
        except ValueError as exc:
            raise IndexingError(str(exc)) from None
        self.fingerprint = index_fingerprint(encoder.fingerprint, self.chunker)
        self.batch_tokens = batch_tokens
        self.write_chunks = max(1, write_chunks)
        self.write_tokens = max(self.max_tokens, write_tokens)
        self.rebuild = rebuild
        self.progress = progress
        self.ray = ray
        self.model = model or encoder.name
        self.summary = IndexSummary()
        self._started = time.perf_counter()
        self._source: Source | None = None

    # --- public ---------------------------------------------------------------------------

    def run(
        self,
        source: str | os.PathLike[str] | Source | Iterable[SourceRecord],
        **source_options: Any,
    ) -> IndexSummary:
        """Index ``source`` (a path, opened with :func:`~m3connect.sources.open_source` and
        ``source_options``; a :class:`Source`; or :class:`SourceRecord` s). Returns the summary,
        also kept in :attr:`summary`; an exception (Ctrl-C, a store error, a bad record with
        ``on_error="stop"``) leaves the summary of the work done in :attr:`summary` with
        ``stopped`` set, and propagates."""
        if isinstance(source, (str, os.PathLike)):
            source = open_source(source, **source_options)
        elif source_options:
            raise TypeError("source options are for a path source")
        summary = self.summary = IndexSummary()
        start = self._started = time.perf_counter()
        targets: list[_Target] = []
        bar = None
        try:
            for spec in self.store_specs:
                targets.append(_open_target(spec, self.fingerprint, self.rebuild))
            summary.stores = [t.label for t in targets]
            summary.open_seconds = time.perf_counter() - start
            bar = self._progress_bar(source)
            if self.ray is not None:
                runner = _RayRunner(self, targets, summary, bar)
                runner.run(self._steps(source, targets))
            else:
                for work in self._steps(source, targets):
                    if work.chunks:
                        started = time.perf_counter()
                        output = self._encode([c.text for c in work.chunks])
                        summary.encode_seconds += time.perf_counter() - started
                        self._write(targets, work, output)
                    self._account(summary, work, bar)
            if bar is not None:  # finished: the estimate may have counted blank lines
                bar.total = bar.n
                bar.refresh()
        except BaseException as exc:
            summary.stopped = _describe(exc)
            raise
        finally:
            summary.seconds = time.perf_counter() - start
            if isinstance(source, Source):
                summary.bad_records = list(source.errors)
            if bar is not None:
                bar.close()
            for target in targets:
                with contextlib.suppress(Exception):
                    target.close()
        return summary

    # --- steps ----------------------------------------------------------------------------

    def _steps(self, source: Iterable[SourceRecord], targets: list[_Target]) -> Iterator[_Work]:
        """Read, chunk and group documents into steps; ask the stores what they hold."""
        pending: list[_Doc] = []
        pending_chunks = pending_tokens = 0
        try:
            for docs in self._chunked(source):
                for doc in docs:
                    pending.append(doc)
                    pending_chunks += len(doc.chunks)
                    pending_tokens += doc.tokens
                    if pending_chunks >= self.write_chunks or pending_tokens >= self.write_tokens:
                        yield self._plan(pending, targets)
                        pending, pending_chunks, pending_tokens = [], 0, 0
        except SourceError:
            # A bad record with on_error="stop": everything before it is indexed first.
            if pending:
                yield self._plan(pending, targets)
            raise
        if pending:
            yield self._plan(pending, targets)

    def _chunked(self, source: Iterable[SourceRecord]) -> Iterator[list[_Doc]]:
        batch: list[SourceRecord] = []

        def flush() -> list[_Doc]:
            chunk_lists = self.chunker.chunk_many([r.id for r in batch], [r.text for r in batch])
            return [
                _Doc(r, chunks, _doc_digest(r))
                for r, chunks in zip(batch, chunk_lists, strict=True)
            ]

        try:
            for record in source:
                if not isinstance(record, SourceRecord):
                    raise TypeError(f"a source yields SourceRecords, got {type(record).__name__}")
                batch.append(record)
                if len(batch) >= _TOKENIZE_DOCS:
                    yield flush()
                    batch = []
        except SourceError:
            if batch:
                yield flush()
            raise
        if batch:
            yield flush()

    def _plan(self, docs: list[_Doc], targets: list[_Target]) -> _Work:
        ids = [c.id for d in docs for c in d.chunks]
        started = time.perf_counter()
        held: list[dict[DocId, dict[str, Any]]] = [
            {r.id: r.metadata for r in t.store.get(ids)} for t in targets
        ]
        self.summary.lookup_seconds += time.perf_counter() - started
        work = _Work(stale=[[] for _ in targets])
        for doc in docs:
            need: list[list[int]] = [[] for _ in doc.chunks]
            changed = False
            for ti, stored in enumerate(held):
                present = [stored.get(c.id) for c in doc.chunks]
                if any(
                    meta is not None
                    and (
                        meta.get(DOC_HASH_KEY) != doc.digest
                        or meta.get(CHUNK_COUNT_KEY) != len(doc.chunks)
                    )
                    for meta in present
                ):
                    # The document changed since it was stored: delete all its chunks (there
                    # may be more than now) and write it anew.
                    work.stale[ti].append(doc.record.id)
                    changed = True
                    for ci in range(len(doc.chunks)):
                        need[ci].append(ti)
                else:
                    for ci, meta in enumerate(present):
                        if meta is None:
                            need[ci].append(ti)
            if not any(need):
                work.skipped += 1
                continue
            work.indexed += 1
            work.updated += changed
            for chunk, stores in zip(doc.chunks, need, strict=True):
                if stores:
                    work.chunks.append(chunk)
                    work.metadatas.append(chunk.metadata(doc.record.metadata, doc.digest))
                    work.needed_by.append(stores)
        return work

    def _encode(self, texts: list[str]) -> M3Output:
        kwargs: dict[str, Any] = {"max_length": self.max_tokens}
        if self.batch_tokens is not None:
            kwargs["batch_tokens"] = self.batch_tokens
        return self.encoder.encode(texts, **kwargs)

    def _write(self, targets: list[_Target], work: _Work, output: M3Output) -> None:
        started = time.perf_counter()
        for ti, target in enumerate(targets):
            if not _is_driver_writer(self, target):
                continue
            try:
                _write_target(target.store, ti, work, output)
            except Exception as exc:
                _tag_store(exc, target.label)
                raise
        self.summary.write_seconds += time.perf_counter() - started

    def _account(self, summary: IndexSummary, work: _Work, bar: Any) -> None:
        summary.docs += work.indexed + work.skipped
        summary.indexed += work.indexed
        summary.updated += work.updated
        summary.skipped += work.skipped
        summary.chunks += len(work.chunks)
        summary.tokens += work.tokens
        if bar is not None:
            # Bad records skipped count as read: the bar reaches its end on a source with some.
            read = summary.docs + (len(self._source.errors) if self._source is not None else 0)
            bar.update(max(0, read - bar.n))
            elapsed = max(time.perf_counter() - self._started, 1e-9)
            bar.set_postfix_str(
                f"{summary.chunks / elapsed:,.1f} chunks/s, {plural(summary.chunks, 'chunk')}",
                refresh=False,
            )

    def _progress_bar(self, source: Any) -> Any:
        """A tqdm bar on stderr: documents read of the total (when it can be known cheaply),
        docs/s, chunks/s and the time left."""
        self._source = source if isinstance(source, Source) else None
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        if isinstance(source, Source):
            total = source.estimate_total()
        else:
            total = len(source) if hasattr(source, "__len__") else None
        return tqdm(total=total, desc="indexing", unit="doc", dynamic_ncols=True)


def _is_driver_writer(job: IndexJob, target: _Target) -> bool:
    if job.ray is None or job.ray.writer == "driver":
        return True
    if job.ray.writer == "workers":
        return False
    return target.embedded


def _write_target(store: M3Store, ti: int, work: _Work, output: M3Output) -> None:
    """Write the rows of ``work`` that target ``ti`` needs (after deleting its stale docs)."""
    if work.stale[ti]:
        store.delete(filter={DOC_ID_KEY: {"$in": list(work.stale[ti])}})
    rows = [i for i, stores in enumerate(work.needed_by) if ti in stores]
    if not rows:
        return
    store.add(
        [work.chunks[i].id for i in rows],
        output if len(rows) == len(output) else output[rows],
        texts=[work.chunks[i].text for i in rows],
        metadatas=[work.metadatas[i] for i in rows],
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


# --------------------------------------------------------------------------------------------
# Ray Data
# --------------------------------------------------------------------------------------------


class RayEncodeWorker:
    """A Ray Data actor (``map_batches`` class): loads the encoder once, encodes a batch of
    chunks, writes it to the server stores it was given, and returns the vectors when the
    driver writes too (else only ids)."""

    def __init__(
        self,
        model: str,
        max_tokens: int,
        batch_tokens: int | None,
        store_uris: Sequence[str],
        write_indices: Sequence[int],
        fingerprint_json: str,
        return_vectors: bool,
        num_threads: int | None = None,
        device: str | None = None,
    ) -> None:
        import torch

        from m3connect.encoder import M3Encoder

        if num_threads:
            torch.set_num_threads(max(1, int(num_threads)))
        self.encoder = M3Encoder.from_pretrained(model, device=device)
        self.max_tokens = max_tokens
        self.batch_tokens = batch_tokens
        self.return_vectors = return_vectors
        fingerprint = ModelFingerprint.from_json(fingerprint_json)
        self.fingerprint = fingerprint
        # Check that the actor loaded the same model as the driver (same heads, dimensions).
        fingerprint.check_compatible(
            self.encoder.fingerprint.with_extra(**fingerprint.extra),
            f"the Ray worker's model {model!r}",
        )
        self.handles = {
            i: open_store(store_uris[i], fingerprint=fingerprint) for i in write_indices
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) for t in batch["text"]]
        kwargs: dict[str, Any] = {"max_length": self.max_tokens}
        if self.batch_tokens is not None:
            kwargs["batch_tokens"] = self.batch_tokens
        output = self.encoder.encode(texts, **kwargs)
        ids = [str(i) for i in batch["id"]]
        metadatas = [json.loads(m) for m in batch["metadata"]]
        masks = [int(m) for m in batch["mask"]]
        for ti, handle in self.handles.items():
            rows = [i for i, m in enumerate(masks) if m >> ti & 1]
            if rows:
                handle.store.add(
                    [ids[i] for i in rows],
                    output[rows],
                    texts=[texts[i] for i in rows],
                    metadatas=[metadatas[i] for i in rows],
                )
        result: dict[str, np.ndarray] = {"id": np.array(ids, dtype=object)}
        if self.return_vectors:
            result["vectors"] = np.array(
                [
                    pickle.dumps((output.dense[i], output.sparse[i], output.colbert[i]))
                    for i in range(len(ids))
                ],  # type: ignore[index]
                dtype=object,
            )
        return result

    def __del__(self) -> None:
        for handle in getattr(self, "handles", {}).values():
            with contextlib.suppress(Exception):
                handle.close()


class _RayRunner:
    """Feeds the job's steps to Ray Data, window by window."""

    def __init__(
        self, job: IndexJob, targets: list[_Target], summary: IndexSummary, bar: Any
    ) -> None:
        try:
            import ray
        except ImportError:
            raise IndexingError("--ray needs Ray Data: pip install 'm3connect[ray]'") from None
        self.ray = ray
        self.job = job
        self.options: RayOptions = job.ray  # type: ignore[assignment]
        self.targets = targets
        self.summary = summary
        self.bar = bar
        worker_targets = [i for i, t in enumerate(targets) if not _is_driver_writer(job, t)]
        for i in worker_targets:
            if targets[i].uri is None:
                raise IndexingError(
                    f"{targets[i].label} is a store object: Ray workers can only write to stores "
                    f"named by a URI; use writer='driver'"
                )
        self.worker_targets = worker_targets
        self.driver_targets = [i for i in range(len(targets)) if i not in worker_targets]
        self._started: bool | None = None
        if len(targets) > 60:
            raise IndexingError("a Ray job writes to at most 60 stores")

    def _init_ray(self) -> bool:
        """Connect to Ray (or start a local instance); returns whether this call started it."""
        ray = self.ray
        if ray.is_initialized():
            return False
        address = self.options.address or os.environ.get("RAY_ADDRESS")
        kwargs = dict(self.options.init_kwargs)
        if address is None:
            # A local instance: make this copy of m3connect importable in the workers even
            # when it is not installed (a source checkout).
            package_root = str(Path(__file__).resolve().parent.parent)
            python_path = os.pathsep.join(
                p for p in (package_root, os.environ.get("PYTHONPATH")) if p
            )
            runtime_env = dict(kwargs.pop("runtime_env", {}) or {})
            env_vars = {**runtime_env.get("env_vars", {}), "PYTHONPATH": python_path}
            runtime_env["env_vars"] = env_vars
            kwargs["runtime_env"] = runtime_env
        kwargs.setdefault("log_to_driver", False)
        if address is None:
            kwargs.setdefault("include_dashboard", False)
        ray.init(address=address, **kwargs)
        return True

    def run(self, steps: Iterator[_Work]) -> None:
        # Ray starts with the first window: a resumed job may need none.
        try:
            window: list[_Work] = []
            size = 0
            for work in steps:
                if not work.chunks:
                    self.job._account(self.summary, work, self.bar)
                    continue
                window.append(work)
                size += len(work.chunks)
                if size >= self.options.window:
                    self._run_window(window)
                    window, size = [], 0
            if window:
                self._run_window(window)
        finally:
            if self._started:
                self.ray.shutdown()

    def _run_window(self, window: list[_Work]) -> None:
        ray = self.ray
        job = self.job
        if self._started is None:
            self._started = self._init_ray()
            ray.data.DataContext.get_current().enable_progress_bars = False  # the job has its own
        # Stale documents are deleted first, by whoever writes to the store: the driver here
        # for its stores, and for the workers' stores too (a delete is one call).
        for work in window:
            for ti, target in enumerate(self.targets):
                if work.stale[ti]:
                    target.store.delete(filter={DOC_ID_KEY: {"$in": list(work.stale[ti])}})
                    work.stale[ti] = []
        rows = []
        for wi, work in enumerate(window):
            for ci, chunk in enumerate(work.chunks):
                mask = 0
                for ti in work.needed_by[ci]:
                    mask |= 1 << ti
                rows.append(
                    {
                        "id": chunk.id,
                        "text": chunk.text,
                        "metadata": json.dumps(work.metadatas[ci], ensure_ascii=False),
                        "mask": mask,
                        "step": wi,
                        "row": ci,
                    }
                )
        return_vectors = bool(self.driver_targets)
        uris = [str(t.uri) if t.uri is not None else "" for t in self.targets]
        options = self.options
        num_threads = max(1, int(options.num_cpus)) if options.num_gpus == 0 else None
        blocks = max(1, min(len(rows), math.ceil(len(rows) / options.batch_size)))
        dataset = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            RayEncodeWorker,
            fn_constructor_kwargs={
                "model": job.model,
                "max_tokens": job.max_tokens,
                "batch_tokens": job.batch_tokens,
                "store_uris": uris,
                "write_indices": self.worker_targets,
                "fingerprint_json": job.fingerprint.to_json(),
                "return_vectors": return_vectors,
                "num_threads": num_threads,
            },
            batch_size=options.batch_size,
            compute=ray.data.ActorPoolStrategy(size=options.concurrency),
            num_cpus=options.num_cpus,
            num_gpus=options.num_gpus or None,
            batch_format="numpy",
        )
        # Results stream back in any order; each step is written (driver stores) and counted
        # once all its chunks are back.
        index = {
            chunk.id: (wi, ci)
            for wi, work in enumerate(window)
            for ci, chunk in enumerate(work.chunks)
        }
        received: list[dict[int, Any]] = [{} for _ in window]
        done = [False] * len(window)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            for k, chunk_id in enumerate(batch["id"]):
                wi, ci = index[str(chunk_id)]
                received[wi][ci] = pickle.loads(batch["vectors"][k]) if return_vectors else None
            for wi, work in enumerate(window):
                if not done[wi] and len(received[wi]) == len(work.chunks):
                    done[wi] = True
                    if return_vectors:
                        parts = [received[wi][ci] for ci in range(len(work.chunks))]
                        output = M3Output(
                            dense=np.stack([p[0] for p in parts]),
                            sparse=[p[1] for p in parts],
                            colbert=[p[2] for p in parts],
                        )
                        started = time.perf_counter()
                        for ti in self.driver_targets:
                            _write_target(self.targets[ti].store, ti, work, output)
                        self.summary.write_seconds += time.perf_counter() - started
                    received[wi] = {}
                    job._account(self.summary, work, self.bar)
        if not all(done):  # pragma: no cover - Ray returns every row or raises
            raise IndexingError("the Ray run returned fewer chunks than it was given")
