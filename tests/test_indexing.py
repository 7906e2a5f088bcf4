"""Indexing jobs: encode once for every store, resume after an interruption with exact counts,
re-index what changed, refuse mixed chunking settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from m3connect.chunking import Chunker
from m3connect.indexing import IndexingError, IndexJob, index_fingerprint
from m3connect.sources import SourceError
from m3connect.stores.memory import InMemoryStore
from m3connect.stores.qdrant import QdrantStore
from m3connect.testing import SAMPLE_TEXTS
from m3connect.uris import open_store

MAX_TOKENS = 24


def write_corpus(path: Path, n: int = 40, *, bad_lines: dict[int, str] | None = None) -> Path:
    """``n`` documents, one to several chunks of MAX_TOKENS each; ``bad_lines`` replaces lines."""
    lines = []
    for i in range(n):
        text = " ".join(SAMPLE_TEXTS[(i + j) % len(SAMPLE_TEXTS)] for j in range(1 + i % 4))
        lines.append(
            json.dumps({"_id": f"doc-{i}", "text": text, "n": i, "tags": ["a", "b"][: 1 + i % 2]})
        )
    for line_no, content in (bad_lines or {}).items():
        lines[line_no - 1] = content
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class CountingEncoder:
    """The encoder, counting the texts it encodes."""

    def __init__(self, encoder: Any) -> None:
        self._encoder = encoder
        self.encoded = 0
        self.calls = 0

    def encode(self, texts, **kwargs):  # type: ignore[no-untyped-def]
        self.encoded += len(texts)
        self.calls += 1
        return self._encoder.encode(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)


def reference(m3_encoder, corpus: Path, **options: Any) -> InMemoryStore:
    store = InMemoryStore()
    IndexJob(m3_encoder, [store], max_tokens=MAX_TOKENS, **options).run(corpus)
    return store


def all_ids(store) -> list[str]:  # type: ignore[no-untyped-def]
    return sorted(str(h.id) for h in store.search(_probe(store), mode="dense", k=10_000))


def _probe(store):  # type: ignore[no-untyped-def]
    from m3connect.types import M3Embedding

    dim = store.fingerprint.dense_dim
    return M3Embedding(dense=np.ones(dim, dtype=np.float32) / np.sqrt(dim))


def assert_same_content(a, b, ids) -> None:  # type: ignore[no-untyped-def]
    ra, rb = a.get(ids, with_vectors=True), b.get(ids, with_vectors=True)
    assert [r.id for r in ra] == [r.id for r in rb] == list(ids)
    for x, y in zip(ra, rb, strict=True):
        assert x.text == y.text
        assert x.metadata == y.metadata
        # Equal up to float noise: another batch composition or thread count (Ray actors)
        # rounds differently.
        np.testing.assert_allclose(x.embedding.dense, y.embedding.dense, atol=1e-5)
        np.testing.assert_allclose(x.embedding.colbert, y.embedding.colbert, atol=1e-5)
        assert x.embedding.sparse.keys() == y.embedding.sparse.keys()
        np.testing.assert_allclose(
            [x.embedding.sparse[t] for t in sorted(x.embedding.sparse)],
            [y.embedding.sparse[t] for t in sorted(y.embedding.sparse)],
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl")


def test_index_and_summary(m3_encoder, corpus) -> None:
    store = InMemoryStore()
    summary = IndexJob(m3_encoder, [store], max_tokens=MAX_TOKENS).run(corpus)
    chunker = Chunker(m3_encoder.tokenizer, MAX_TOKENS)
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    chunks = [c for r in records for c in chunker.chunk(r["_id"], r["text"])]
    assert summary.docs == summary.indexed == 40
    assert (summary.skipped, summary.errors, summary.updated) == (0, 0, 0)
    assert summary.chunks == store.count() == len(chunks) > 40
    assert summary.tokens == sum(c.n_tokens for c in chunks)
    assert summary.seconds > 0 and summary.docs_per_s > 0 and summary.tokens_per_s > 0
    text = summary.format()
    for word in ("docs/s", "tokens/s", "skipped", "errors"):
        assert word in text
    assert json.loads(json.dumps(summary.to_dict()))["chunks"] == len(chunks)
    # Every chunk is stored with its document's metadata and the chunk keys.
    (record,) = store.get(["doc-3#1"])
    assert record.metadata["doc_id"] == "doc-3" and record.metadata["chunk_no"] == 1
    assert record.metadata["n"] == 3 and record.metadata["tags"] == ["a", "b"]
    assert record.text == chunks[[c.id for c in chunks].index("doc-3#1")].text
    # Chunking settings are in the store's fingerprint.
    assert store.fingerprint.extra["chunking"] == {
        "unit": "tokens",
        "max_tokens": MAX_TOKENS,
        "overlap": 0,
    }


@pytest.mark.slow
def test_encode_once_for_every_store(m3_encoder, corpus, tmp_path) -> None:
    counting = CountingEncoder(m3_encoder)
    uris = [
        f"qdrant:{tmp_path / 'q'}#docs",
        f"milvus:{tmp_path / 'm.db'}#docs",
        "memory:#encode-once",
    ]
    summary = IndexJob(counting, uris, max_tokens=MAX_TOKENS).run(corpus)
    assert counting.encoded == summary.chunks  # one forward pass per chunk, not one per store
    handles = [open_store(uri) for uri in uris]
    try:
        stores = [h.store for h in handles]
        assert [s.count() for s in stores] == [summary.chunks] * 3
        ids = all_ids(stores[2])
        assert_same_content(stores[2], stores[0], ids)
        assert_same_content(stores[2], stores[1], ids)
    finally:
        for h in handles:
            h.close()
    # A store added later gets every chunk; the others none; each chunk is encoded once.
    counting.encoded = 0
    new = InMemoryStore()
    summary = IndexJob(counting, [*uris, new], max_tokens=MAX_TOKENS).run(corpus)
    assert counting.encoded == new.count() == summary.chunks
    assert summary.indexed == 40 and summary.skipped == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "failure", [ConnectionError("the database went away"), KeyboardInterrupt()]
)
def test_interrupted_job_resumes_with_exact_counts(
    m3_encoder, corpus, tmp_path, monkeypatch, failure
) -> None:
    expected = reference(m3_encoder, corpus)
    uri = f"qdrant:{tmp_path / 'q'}"
    original_add = QdrantStore.add
    calls = {"n": 0}

    def failing_add(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise failure
        return original_add(self, *args, **kwargs)

    monkeypatch.setattr(QdrantStore, "add", failing_add)
    job = IndexJob(m3_encoder, [uri], max_tokens=MAX_TOKENS, write_chunks=10)
    with pytest.raises(type(failure)):
        job.run(corpus)
    first = job.summary
    assert first.stopped is not None and "run the same command again" in first.format()
    monkeypatch.setattr(QdrantStore, "add", original_add)
    with open_store(uri) as handle:
        written = handle.store.count()
    assert written == first.chunks > 0  # three steps written, nothing of the fourth
    assert first.indexed < 40

    counting = CountingEncoder(m3_encoder)
    second = IndexJob(counting, [uri], max_tokens=MAX_TOKENS, write_chunks=10).run(corpus)
    assert second.stopped is None
    assert second.skipped == first.indexed  # what was written is not encoded again
    assert second.indexed == 40 - first.indexed
    assert counting.encoded == second.chunks == expected.count() - written
    with open_store(uri) as handle:
        assert handle.store.count() == expected.count()  # nothing lost, nothing duplicated
        ids = all_ids(expected)
        assert all_ids(handle.store) == ids
        assert_same_content(expected, handle.store, ids)

    counting.encoded = 0
    third = IndexJob(counting, [uri], max_tokens=MAX_TOKENS).run(corpus)
    assert (third.skipped, third.indexed, counting.encoded) == (40, 0, 0)


def test_partly_written_document_gets_its_missing_chunks(m3_encoder, corpus) -> None:
    store = reference(m3_encoder, corpus)
    total = store.count()
    store.delete(["doc-3#1", "doc-7#0"])
    counting = CountingEncoder(m3_encoder)
    summary = IndexJob(counting, [store], max_tokens=MAX_TOKENS).run(corpus)
    assert (summary.indexed, summary.skipped, summary.chunks, counting.encoded) == (2, 38, 2, 2)
    assert store.count() == total


def _change(corpus: Path, tmp_path: Path) -> Path:
    """doc-3 (several chunks) becomes one short text; doc-5 changes only its metadata."""
    lines = corpus.read_text().splitlines()
    long_doc = json.loads(lines[3])
    long_doc["text"] = "Now a short text."
    lines[3] = json.dumps(long_doc)
    meta_doc = json.loads(lines[5])
    meta_doc["n"] = 500
    lines[5] = json.dumps(meta_doc)
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(lines) + "\n")
    return changed


def test_changed_documents_are_reindexed(m3_encoder, corpus, tmp_path) -> None:
    store = reference(m3_encoder, corpus)
    before = store.count()
    assert len(store.get([f"doc-3#{i}" for i in range(10)])) > 1
    changed = _change(corpus, tmp_path)
    summary = IndexJob(m3_encoder, [store], max_tokens=MAX_TOKENS).run(changed)
    assert (summary.updated, summary.indexed, summary.skipped) == (2, 2, 38)
    assert [r.id for r in store.get([f"doc-3#{i}" for i in range(10)])] == ["doc-3#0"]
    assert store.get(["doc-3#0"])[0].text == "Now a short text."
    assert all(r.metadata["n"] == 500 for r in store.get([f"doc-5#{i}" for i in range(10)]))
    # The same as indexing the changed corpus from scratch.
    fresh = reference(m3_encoder, changed)
    assert store.count() == fresh.count() < before
    ids = all_ids(fresh)
    assert all_ids(store) == ids
    assert_same_content(fresh, store, ids)


@pytest.mark.slow
def test_changed_documents_are_reindexed_in_a_database(m3_encoder, corpus, tmp_path) -> None:
    """The same through a database's own delete-by-filter (on the chunks' doc_id)."""
    uri = f"qdrant:{tmp_path / 'q'}"
    IndexJob(m3_encoder, [uri], max_tokens=MAX_TOKENS).run(corpus)
    changed = _change(corpus, tmp_path)
    summary = IndexJob(m3_encoder, [uri], max_tokens=MAX_TOKENS).run(changed)
    assert (summary.updated, summary.indexed, summary.skipped) == (2, 2, 38)
    fresh = reference(m3_encoder, changed)
    with open_store(uri) as handle:
        assert handle.store.count() == fresh.count()
        ids = all_ids(fresh)
        assert all_ids(handle.store) == ids
        assert_same_content(fresh, handle.store, ids)


@pytest.mark.slow
def test_changed_chunking_is_a_clear_error_or_a_clean_rebuild(m3_encoder, corpus, tmp_path) -> None:
    uri = f"qdrant:{tmp_path / 'q'}#docs"
    IndexJob(m3_encoder, [uri], max_tokens=MAX_TOKENS).run(corpus)
    with pytest.raises(IndexingError) as info:
        IndexJob(m3_encoder, [uri], max_tokens=32, overlap=4).run(corpus)
    message = str(info.value)
    assert "max_tokens 24, overlap 0" in message and "max_tokens 32, overlap 4" in message
    assert "--rebuild" in message
    with open_store(uri) as handle:  # untouched
        assert handle.store.fingerprint.extra["chunking"]["max_tokens"] == MAX_TOKENS
    summary = IndexJob(m3_encoder, [uri], max_tokens=32, overlap=4, rebuild=True).run(corpus)
    expected = InMemoryStore()
    IndexJob(m3_encoder, [expected], max_tokens=32, overlap=4).run(corpus)
    with open_store(uri) as handle:
        assert handle.store.count() == summary.chunks == expected.count()  # no chunk of 24 left
        assert handle.store.fingerprint.extra["chunking"] == {
            "unit": "tokens",
            "max_tokens": 32,
            "overlap": 4,
        }
        assert all_ids(handle.store) == all_ids(expected)


def test_another_model_is_an_error(m3_encoder, corpus, tmp_path) -> None:
    from m3connect.fingerprint import ModelFingerprint

    uri = f"qdrant:{tmp_path / 'q'}"
    other = ModelFingerprint("other/model", m3_encoder.dense_dim, m3_encoder.colbert_dim, "f" * 64)
    chunker = Chunker(m3_encoder.tokenizer, MAX_TOKENS)
    open_store(uri, fingerprint=index_fingerprint(other, chunker)).close()
    with pytest.raises(IndexingError, match="another model"):
        IndexJob(m3_encoder, [uri], max_tokens=MAX_TOKENS).run(corpus)


def test_bad_records_skip_or_stop(m3_encoder, tmp_path) -> None:
    path = write_corpus(
        tmp_path / "bad.jsonl", 12, bad_lines={5: "{oops", 9: json.dumps({"_id": "x", "text": 3})}
    )
    store = InMemoryStore()
    summary = IndexJob(m3_encoder, [store], max_tokens=MAX_TOKENS).run(path, on_error="skip")
    assert (summary.docs, summary.errors) == (10, 2)
    assert [b.line for b in summary.bad_records] == [5, 9]
    assert "line 5: invalid JSON" in summary.format()

    store = InMemoryStore()
    job = IndexJob(m3_encoder, [store], max_tokens=MAX_TOKENS)
    with pytest.raises(SourceError, match=r"line 5: invalid JSON"):
        job.run(path, on_error="stop")
    # Everything before the bad record is indexed: fixing it and running again finishes the job.
    assert job.summary.docs == 4
    assert {r.metadata["doc_id"] for r in store.get([f"doc-{i}#0" for i in range(12)])} == {
        f"doc-{i}" for i in range(4)
    }


def test_records_from_code(m3_encoder) -> None:
    from m3connect.sources import SourceRecord

    store = InMemoryStore()
    records = [
        SourceRecord(i, t, {"k": i}, i + 1, "<memory>") for i, t in enumerate(SAMPLE_TEXTS[:5])
    ]
    summary = IndexJob(m3_encoder, [store]).run(records)
    assert summary.chunks == 5 and store.get(["3#0"])[0].metadata["doc_id"] == 3


def test_max_tokens_beyond_the_model_is_refused(m3_encoder) -> None:
    with pytest.raises(IndexingError, match="model allows"):
        IndexJob(m3_encoder, [InMemoryStore()], max_tokens=m3_encoder.max_length + 1)
    with pytest.raises(IndexingError, match="overlap"):
        IndexJob(m3_encoder, [InMemoryStore()], max_tokens=10, overlap=9)
