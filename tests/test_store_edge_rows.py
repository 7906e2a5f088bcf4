"""qdrant-edge's ColBERT row file: re-ranks and mode="colbert" scored from it by the core, and
it never changes an answer: missing, cut-short, torn or compacted files, shards from before
row files, and a writer killed mid-job all give the reference store's answers."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from store_contract import (
    FINGERPRINT,
    assert_same_hits,
    sigkill_edge_writer,
    synthetic_embeddings,
    synthetic_queries,
)

from m3connect.store import SearchParams
from m3connect.stores.memory import InMemoryStore

pytest.importorskip("qdrant_edge")

from m3connect.stores import colbert_rows  # noqa: E402
from m3connect.stores.colbert_rows import ROWS_KEY, ColbertRowFile  # noqa: E402
from m3connect.stores.qdrant import QdrantEdgeStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

#: The searches the row file answers (and one it does not: a fused ColBERT leg).
ROW_SEARCHES = {
    "colbert": {"mode": "colbert"},
    "colbert-rerank-all": {"mode": "colbert", "rerank": "all", "candidates": 6},
    "rerank-colbert": {"mode": "hybrid", "rerank": "colbert"},
    "rerank-all": {"mode": "hybrid", "rerank": "all"},
    "dense-rerank-colbert": {"mode": "dense", "rerank": "colbert", "candidates": 8},
    "filtered-colbert": {"mode": "colbert", "filter": {"half": "a"}},
    "filtered-rerank-all": {"mode": "hybrid", "rerank": "all", "filter": {"half": "b"}},
    "three-legs": {"mode": "hybrid", "hybrid_legs": ("dense", "sparse", "colbert")},
}


def corpus(n: int, seed: int, prefix: str = "d"):  # type: ignore[no-untyped-def]
    ids = [f"{prefix}{i}" for i in range(n)]
    metadatas = [{"half": "a" if i % 2 else "b"} for i in range(n)]
    return ids, synthetic_embeddings(n, seed=seed), [f"text {i}" for i in ids], metadatas


def same_answers(store, reference, queries, tol: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    """The reference's hits (ties in any order), scores within ``tol``, texts and metadata."""
    for spec in ROW_SEARCHES.values():
        for query in queries:
            params = SearchParams(k=5, **spec)
            assert_same_hits(
                store.search(query, params),
                reference.search(query, params),
                reference.search(query, params.with_overrides(k=15)),
                tol,
            )


def same_records(store, reference) -> None:  # type: ignore[no-untyped-def]
    """Every document's vectors, bit for bit (the ColBERT rows in their order)."""
    expected = {r.id: r for r in reference.iter_records(with_vectors=True)}
    got = {r.id: r for r in store.iter_records(with_vectors=True)}
    assert got.keys() == expected.keys()
    for doc_id, record in expected.items():
        np.testing.assert_array_equal(got[doc_id].embedding.colbert, record.embedding.colbert)
        np.testing.assert_array_equal(got[doc_id].embedding.dense, record.embedding.dense)


def filled(path: Path, dtype: str = "float16", n: int = 40, seed: int = 3):  # type: ignore[no-untyped-def]
    store = QdrantEdgeStore(path, fingerprint=FINGERPRINT, colbert_dtype=dtype, batch_size=7)
    reference = InMemoryStore(fingerprint=FINGERPRINT, colbert_dtype=dtype)
    data = corpus(n, seed)
    for target in (store, reference):
        target.add(*data)
    return store, reference, synthetic_queries(data[1])


def rows_file(path: Path) -> Path:
    (found,) = (path / QdrantEdgeStore.ROWS_FOLDER).glob("rows-*.bin")
    return found


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_rows_hold_each_documents_colbert_matrix_and_answer_like_the_reference(
    tmp_path: Path, dtype: str
) -> None:
    store, reference, queries = filled(tmp_path / "s", dtype)
    # float32 rows whatever the storage dtype (BLAS reads them in place; float16 is exact).
    assert store._rows is not None and store._rows.dtype == np.float32
    # Every point says where its rows are, and they are its ColBERT matrix, bit for bit.
    for record, expected in zip(
        store.get([f"d{i}" for i in range(40)], with_vectors=True),
        reference.get([f"d{i}" for i in range(40)], with_vectors=True),
        strict=True,
    ):
        assert record.embedding.colbert.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(record.embedding.colbert, expected.embedding.colbert)
    (point,) = store.shard.retrieve(
        [str(p.id) for p in store.shard.scroll(_scroll(store))[0] if p.payload.get("doc_id")][:1],
        with_payload=True,
        with_vector=False,
    )
    generation, start, count = point.payload[ROWS_KEY]
    assert generation == 0 and count == len(
        reference.get(point.payload["doc_id"], with_vectors=True)[0].embedding.colbert
    )
    assert (
        rows_file(tmp_path / "s").stat().st_size == store._rows.rows_written * store._rows.row_bytes
    )
    same_answers(store, reference, queries)
    store.close()
    # Reopened, the file is found again and answers the same.
    with QdrantEdgeStore(tmp_path / "s") as again:
        assert again._rows is not None
        same_answers(again, reference, queries)


def _scroll(store):  # type: ignore[no-untyped-def]
    return store._dialect.e.ScrollRequest(limit=100, with_payload=True, with_vector=False)


def test_rows_answer_without_reading_vectors_from_the_engine(tmp_path: Path) -> None:
    store, _, queries = filled(tmp_path / "s")
    asked: list = []
    real = store.shard

    class Spy:
        def retrieve(self, ids, with_payload=None, with_vector=None):  # type: ignore[no-untyped-def]
            asked.append(with_vector)
            return real.retrieve(ids, with_payload=with_payload, with_vector=with_vector)

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(real, name)

    store.shard = Spy()
    for name in ("colbert", "rerank-all", "rerank-colbert"):
        store.search(queries[0], SearchParams(k=5, **ROW_SEARCHES[name]))
    store.get(["d1", "d2"], with_vectors=True)
    assert asked and all(v is False or "colbert" not in v for v in asked)
    store.shard = real
    store.close()


def test_a_shard_from_before_row_files_is_scored_by_the_engine(tmp_path: Path) -> None:
    store, reference, queries = filled(tmp_path / "old")
    store.close()
    import shutil

    shutil.rmtree(tmp_path / "old" / QdrantEdgeStore.ROWS_FOLDER)
    with QdrantEdgeStore(tmp_path / "old") as old:
        assert old._rows is None  # no file is started for a shard whose points have none
        same_answers(old, reference, queries)
        more = corpus(6, seed=9, prefix="new")
        old.add(*more)
        reference.add(*more)
        same_answers(old, reference, queries)
    assert not (tmp_path / "old" / QdrantEdgeStore.ROWS_FOLDER).exists()


def test_unreadable_rows_fall_back_to_the_engines_copy(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    store, reference, queries = filled(tmp_path / "s")
    store.close()
    path = rows_file(tmp_path / "s")
    with open(path, "r+b") as f:  # a file cut short (a power failure): the last rows are gone
        f.truncate(path.stat().st_size // 2)
    with QdrantEdgeStore(tmp_path / "s") as cut, caplog.at_level(logging.WARNING):
        same_answers(cut, reference, queries)
        records = {r.id: r for r in cut.get([f"d{i}" for i in range(40)], with_vectors=True)}
        for expected in reference.get([f"d{i}" for i in range(40)], with_vectors=True):
            np.testing.assert_array_equal(
                records[expected.id].embedding.colbert, expected.embedding.colbert
            )
    assert "no readable ColBERT rows" in caplog.text


def test_a_torn_last_row_is_cut_off_and_appends_stay_aligned(tmp_path: Path) -> None:
    store, reference, queries = filled(tmp_path / "s")
    store.close()
    path = rows_file(tmp_path / "s")
    whole = path.stat().st_size
    with open(path, "ab") as f:  # a write killed part way through a row
        f.write(b"\x01" * 7)
    with QdrantEdgeStore(tmp_path / "s") as store:
        assert path.stat().st_size == whole
        more = corpus(9, seed=21, prefix="late")
        store.add(*more)
        reference.add(*more)
        same_answers(store, reference, queries)


def test_finish_compacts_dead_rows_and_answers_stay_the_same(tmp_path: Path) -> None:
    store, reference, queries = filled(tmp_path / "s", n=32)
    store.compact_min_bytes = 0
    ids, embeddings, texts, metadatas = corpus(32, seed=3)
    # Replace every document twice, then delete a third: most rows in the file are dead.
    for seed in (4, 5):
        replaced = synthetic_embeddings(32, seed=seed)
        store.add(ids, replaced, texts, metadatas)
        reference.add(ids, replaced, texts, metadatas)
    store.delete(ids[:10])
    reference.delete(ids[:10])
    live = sum(len(r.embedding.colbert) for r in reference.get(ids, with_vectors=True))
    assert store._rows.rows_written > 2 * live
    store.finish()
    (path,) = (tmp_path / "s" / QdrantEdgeStore.ROWS_FOLDER).glob("rows-*.bin")
    assert path.name == "rows-1.bin"
    assert path.stat().st_size == live * store._rows.row_bytes
    same_answers(store, reference, queries)
    same_records(store, reference)
    # Below the threshold nothing is rewritten.
    store.add(ids[10:12], synthetic_embeddings(2, seed=8), texts[10:12], metadatas[10:12])
    reference.add(ids[10:12], synthetic_embeddings(2, seed=8), texts[10:12], metadatas[10:12])
    store.finish()
    assert [p.name for p in (tmp_path / "s" / QdrantEdgeStore.ROWS_FOLDER).glob("rows-*.bin")] == [
        "rows-1.bin"
    ]
    store.close()
    with QdrantEdgeStore(tmp_path / "s") as again:
        same_answers(again, reference, queries)


def test_a_compaction_killed_part_way_keeps_both_files_and_every_answer(tmp_path: Path) -> None:
    store, reference, queries = filled(tmp_path / "s", n=32)
    store.compact_min_bytes = 0
    ids, _, texts, metadatas = corpus(32, seed=3)
    replaced = synthetic_embeddings(32, seed=6)
    store.add(ids, replaced, texts, metadatas)
    reference.add(ids, replaced, texts, metadatas)
    real = store.shard
    updates = [0]

    class DiesAfterTenPointsMove:
        def update(self, op):  # type: ignore[no-untyped-def]
            updates[0] += 1
            if updates[0] > 10:
                raise RuntimeError("killed")
            return real.update(op)

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(real, name)

    store.shard = DiesAfterTenPointsMove()
    with pytest.raises(RuntimeError, match="killed"):
        store.finish()
    store.shard = real
    folder = tmp_path / "s" / QdrantEdgeStore.ROWS_FOLDER
    assert sorted(p.name for p in folder.glob("rows-*.bin")) == ["rows-0.bin", "rows-1.bin"]
    same_answers(store, reference, queries)
    store.close()
    with QdrantEdgeStore(tmp_path / "s") as again:
        same_answers(again, reference, queries)
        again.compact_min_bytes = 0
        again._dirty = True
        again.finish()  # the next compaction gathers both files into one
        assert [p.name for p in folder.glob("rows-*.bin")] == ["rows-2.bin"]
        same_answers(again, reference, queries)
        same_records(again, reference)


def test_stores_sharing_a_shard_share_its_row_file(tmp_path: Path) -> None:
    store, reference, queries = filled(tmp_path / "s")
    second = QdrantEdgeStore(tmp_path / "s", shard=store.shard)
    assert second._rows is store._rows
    for target, seed, prefix in ((second, 30, "x"), (store, 31, "y")):
        more = corpus(5, seed=seed, prefix=prefix)
        target.add(*more)
        reference.add(*more)
    same_answers(second, reference, queries)
    same_answers(store, reference, queries)
    store.close()


def test_a_dropped_shard_starts_a_new_row_file(tmp_path: Path) -> None:
    store, _, queries = filled(tmp_path / "s")
    store.close()
    QdrantEdgeStore.drop(tmp_path / "s")
    store, reference, queries = filled(tmp_path / "s", seed=12)
    assert store._rows.rows_written == sum(
        len(r.embedding.colbert)
        for r in reference.get([f"d{i}" for i in range(40)], with_vectors=True)
    )
    same_answers(store, reference, queries)
    store.close()


def test_row_file_refuses_another_dimension(tmp_path: Path) -> None:
    rows = ColbertRowFile(tmp_path / "rows", 12, "float16")
    spans = rows.append([np.ones((3, 12), np.float32), np.zeros((0, 12), np.float32)])
    assert spans == [[0, 0, 3], [0, 3, 0]]
    with pytest.raises(ValueError, match="shape"):
        rows.append([np.ones((2, 13), np.float32)])
    assert (
        rows.rows([0, 0, 4]) is None and rows.rows("junk") is None and rows.rows([9, 0, 1]) is None
    )
    rows.close()
    assert ColbertRowFile.open_existing(tmp_path / "rows", 16) is None
    reopened = ColbertRowFile.open_existing(tmp_path / "rows", 12)
    assert reopened is not None and reopened.dtype == np.float16
    np.testing.assert_array_equal(reopened.rows([0, 0, 3]), np.ones((3, 12), np.float16))
    reopened.close()


@pytest.mark.slow
def test_sigkilled_writer_leaves_rows_that_answer_like_the_reference(tmp_path: Path) -> None:
    """Killed at any point of a job (mid-append included), the shard reopens and every search
    the row file answers equals the reference over the documents the shard holds."""
    path = tmp_path / "killed"
    sigkill_edge_writer(path, 80, batch_size=3)
    with QdrantEdgeStore(path) as store:
        held = {r.id for r in store.iter_records()}
        reference = InMemoryStore(fingerprint=FINGERPRINT)
        step = 0
        while any(f"s{step}-{i}" in held for i in range(8)):
            embeddings = synthetic_embeddings(8, seed=step)
            keep = [i for i in range(8) if f"s{step}-{i}" in held]
            reference.add(
                [f"s{step}-{i}" for i in keep],
                type(embeddings)(
                    dense=embeddings.dense[keep],
                    sparse=[embeddings.sparse[i] for i in keep],
                    colbert=[embeddings.colbert[i] for i in keep],
                ),
            )
            step += 1
        assert reference.count() == len(held) >= 80
        queries = synthetic_queries(synthetic_embeddings(40, seed=0))
        for name in ("colbert", "rerank-all", "rerank-colbert"):
            for query in queries:
                params = SearchParams(k=5, **ROW_SEARCHES[name])
                assert_same_hits(
                    store.search(query, params),
                    reference.search(query, params),
                    reference.search(query, params.with_overrides(k=15)),
                    1e-5,
                )


def test_a_failed_append_leaves_no_torn_row(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A write that fails part way (a full disk) is cut back to the last whole row: the next
    rows land where their spans say."""
    rows = ColbertRowFile(tmp_path / "rows", 4, "float32")
    first = rows.append([np.full((2, 4), 1.0, np.float32)])
    real = colbert_rows._pwritev

    def disk_full(fd, views, offset):  # type: ignore[no-untyped-def]
        real(fd, [bytes(views[0])[:5]], offset)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(colbert_rows, "_pwritev", disk_full)
    with pytest.raises(OSError, match="No space"):
        rows.append([np.full((3, 4), 2.0, np.float32)])
    assert (tmp_path / "rows" / "rows-0.bin").stat().st_size == 2 * 4 * 4
    monkeypatch.setattr(colbert_rows, "_pwritev", real)
    second = rows.append([np.full((1, 4), 3.0, np.float32)])
    assert first == [[0, 0, 2]] and second == [[0, 2, 1]]
    np.testing.assert_array_equal(rows.rows(first[0]), np.full((2, 4), 1.0, np.float32))
    np.testing.assert_array_equal(rows.rows(second[0]), np.full((1, 4), 3.0, np.float32))
    rows.close()


def test_writes_queued_behind_a_failed_one_fail_too(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Writes run in the background in reservation order. When one fails, those reserved
    after it would land past the end of the file: they fail as well (their points are never
    sent), and the next reservation starts at the last whole row."""
    rows = ColbertRowFile(tmp_path / "rows", 4, "float32")
    real = colbert_rows._pwritev
    started, release = threading.Event(), threading.Event()

    def slow_then_full(fd, views, offset):  # type: ignore[no-untyped-def]
        started.set()
        release.wait(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(colbert_rows, "_pwritev", slow_then_full)
    spans_a, written_a = rows.append_later([np.full((2, 4), 1.0, np.float32)])
    assert started.wait(10)
    spans_b, written_b = rows.append_later([np.full((3, 4), 2.0, np.float32)])
    assert spans_a == [[0, 0, 2]] and spans_b == [[0, 2, 3]]
    monkeypatch.setattr(colbert_rows, "_pwritev", real)
    release.set()
    with pytest.raises(OSError, match="No space"):
        written_a.result(10)
    with pytest.raises(OSError, match="earlier write"):
        written_b.result(10)
    assert rows.rows(spans_b[0]) is None
    spans_c = rows.append([np.full((1, 4), 3.0, np.float32)])
    assert spans_c == [[0, 0, 1]] and rows.rows_written == 1
    np.testing.assert_array_equal(rows.rows(spans_c[0]), np.full((1, 4), 3.0, np.float32))
    rows.close()


def test_points_are_sent_only_after_their_rows_are_in_the_file(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The rows of a request are written in the background while its points are built; the
    points go to the engine only once every row they refer to is in the file."""
    store = QdrantEdgeStore(tmp_path / "s", fingerprint=FINGERPRINT, batch_size=4)
    real_shard, real_write = store.shard, colbert_rows._pwritev
    seen: list[tuple[int, int]] = []

    def slow_write(fd, views, offset):  # type: ignore[no-untyped-def]
        time.sleep(0.05)  # later than the points are ready
        return real_write(fd, views, offset)

    class Spy:
        def update(self, op):  # type: ignore[no-untyped-def]
            file_rows = rows_file(tmp_path / "s").stat().st_size // store._rows.row_bytes
            seen.append((file_rows, store._rows._rows_reserved))
            return real_shard.update(op)

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(real_shard, name)

    monkeypatch.setattr(colbert_rows, "_pwritev", slow_write)
    store.shard = Spy()
    data = corpus(40, seed=4)
    store.add(*data)
    assert len(seen) == 10 and seen[-1][1] == sum(len(m) for m in data[1].colbert)
    assert all(in_file == reserved for in_file, reserved in seen)
    store.shard = real_shard
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    reference.add(*data)
    same_answers(store, reference, synthetic_queries(data[1]))
    store.close()


def test_a_long_write_flushes_every_wal_flush_bytes(tmp_path: Path) -> None:
    """Without a flush the engine's write-ahead log keeps every request; the store flushes
    (row file first) each ``wal_flush_bytes`` of vectors, not per call."""
    store = QdrantEdgeStore(tmp_path / "s", fingerprint=FINGERPRINT, batch_size=5)
    real = store.shard
    calls: list[str] = []

    class Spy:
        def flush(self) -> None:
            calls.append("flush")
            real.flush()

        def update(self, op):  # type: ignore[no-untyped-def]
            calls.append("update")
            return real.update(op)

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(real, name)

    data = corpus(60, seed=2)
    per_doc = 4 * (data[1].dense.shape[1] + np.mean([len(m) for m in data[1].colbert]) * 12)
    store.wal_flush_bytes = int(20 * per_doc)  # about every 20 documents
    store.shard = Spy()
    store.add(*data)
    assert calls.count("update") == 12
    assert 2 <= calls.count("flush") <= 4  # by bytes: not per request, not never
    store.shard = real
    store.close()
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    reference.add(*data)
    with QdrantEdgeStore(tmp_path / "s") as again:
        same_answers(again, reference, synthetic_queries(data[1]))
