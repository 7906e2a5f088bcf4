"""qdrant-edge as a store URI and the embedded default: one shard folder per collection, one
writer (a second process gets one clear error and the shard stays whole), the job's end hook."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from store_contract import (
    FINGERPRINT,
    sigkill_edge_writer,
    synthetic_embeddings,
    synthetic_queries,
)

from m3connect.indexing import IndexJob, drop_collection
from m3connect.store import StoreError
from m3connect.stores.memory import InMemoryStore
from m3connect.uris import DEFAULT_STORE_URI, open_store, parse_store_uri

pytest.importorskip("qdrant_edge")

from m3connect.stores.qdrant import QdrantEdgeStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fill(store, n: int = 32, seed: int = 5) -> list[str]:  # type: ignore[no-untyped-def]
    ids = [f"d{i}" for i in range(n)]
    store.add(ids, synthetic_embeddings(n, seed=seed), [f"text {i}" for i in ids])
    return ids


def test_edge_uri_opens_a_shard_per_collection(tmp_path: Path) -> None:
    uri = f"qdrant-edge:{tmp_path / 'edge'}#docs"
    assert parse_store_uri(uri).edge_path() == tmp_path / "edge" / "docs"
    with open_store(uri, fingerprint=FINGERPRINT) as handle:
        assert isinstance(handle.store, QdrantEdgeStore)
        ids = fill(handle.store)
        embeddings = synthetic_embeddings(len(ids), seed=5)
        query = synthetic_queries(embeddings)[0]
        expected = [h.id for h in handle.store.search(query, mode="hybrid", k=5)]
    assert (tmp_path / "edge" / "docs" / QdrantEdgeStore.CONFIG_FILE).exists()
    # Reopened (fingerprint from the shard), the same documents and the same answers.
    with open_store(uri) as handle:
        assert handle.store.count() == len(ids)
        assert [h.id for h in handle.store.search(query, mode="hybrid", k=5)] == expected
    # Another collection is another shard, empty.
    with open_store(f"qdrant-edge:{tmp_path / 'edge'}#other", fingerprint=FINGERPRINT) as h:
        assert h.store.count() == 0


def test_second_process_gets_one_clear_error_and_nothing_breaks(tmp_path: Path) -> None:
    uri = f"qdrant-edge:{tmp_path / 'edge'}"
    shard = parse_store_uri(uri).edge_path()
    handle = open_store(uri, fingerprint=FINGERPRINT)
    ids = fill(handle.store)
    script = textwrap.dedent(
        f"""
        import json, sys
        from m3connect.store import StoreError
        from m3connect.uris import open_store
        try:
            open_store({uri!r})
        except StoreError as exc:
            print(json.dumps({{"error": str(exc)}}))
            sys.exit(3)
        print(json.dumps({{"error": None}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 3, done.stderr
    message = json.loads(done.stdout)["error"]
    assert str(shard) in message and "one writer" in message
    assert "\n" not in message
    # The first store still works, and the shard is whole after it closes.
    more = fill(handle.store, n=3, seed=9)
    assert handle.store.count() == len(set(ids) | set(more))
    handle.close()
    with open_store(uri) as again:
        assert again.store.count() == len(set(ids) | set(more))


def test_second_store_in_one_process_and_drop_are_refused_while_open(tmp_path: Path) -> None:
    store = QdrantEdgeStore(tmp_path / "s", fingerprint=FINGERPRINT)
    fill(store)
    with pytest.raises(StoreError, match="one writer"):
        QdrantEdgeStore(tmp_path / "s")
    with pytest.raises(StoreError, match="one writer"):
        drop_collection(f"qdrant-edge:{tmp_path}#s")
    assert store.count() == 32
    store.close()
    drop_collection(f"qdrant-edge:{tmp_path}#s")
    with QdrantEdgeStore(tmp_path / "s", fingerprint=FINGERPRINT) as fresh:
        assert fresh.count() == 0


def test_finish_flushes_and_optimizes_once_with_the_same_answers(tmp_path: Path) -> None:
    store = QdrantEdgeStore(tmp_path / "s", fingerprint=FINGERPRINT, colbert_dtype="float16")
    ids = fill(store, n=40)
    query = synthetic_queries(synthetic_embeddings(len(ids), seed=5))[1]
    before = store.search(query, mode="hybrid", rerank="all", k=8)
    store.finish()
    assert not store._dirty
    after = store.search(query, mode="hybrid", rerank="all", k=8)
    assert [(h.id, h.score) for h in after] == [(h.id, h.score) for h in before]
    store.close()


class FinishCounting(InMemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.finished = 0
        self.adds_after_finish = 0

    def add(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.adds_after_finish += self.finished
        return super().add(*args, **kwargs)

    def finish(self) -> None:
        self.finished += 1


def test_index_job_calls_the_end_hook_once_after_all_writes(m3_encoder, tmp_path: Path) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        "".join(
            json.dumps({"_id": f"d{i}", "text": f"passage number {i} " * 3}) + "\n"
            for i in range(9)
        ),
        encoding="utf-8",
    )
    store = FinishCounting()
    summary = IndexJob(m3_encoder, [store], max_tokens=16, write_chunks=2).run(corpus)
    assert summary.docs == 9 and store.count() == summary.chunks > 9
    assert store.finished == 1 and store.adds_after_finish == 0


def test_default_store_is_edge() -> None:
    assert parse_store_uri(DEFAULT_STORE_URI).kind == "qdrant-edge"


def test_float16_maxsim_at_bge_m3_size_is_the_engines_within_tolerance(tmp_path: Path) -> None:
    """1024-dim unit rows: the engine's half-precision MaxSim is within 1e-4 of the float32
    reference, so the store's plans use it (no ColBERT matrices come back): a fused ColBERT leg
    is scored by the engine, re-ranks and mode="colbert" by the core from the row file; a dozen
    dimensions are not, and are re-scored (the contract suite checks those answers at 1e-5)."""
    import numpy as np

    from m3connect.fingerprint import ModelFingerprint
    from m3connect.store import SearchParams
    from m3connect.stores.qdrant import HALF_MAXSIM_TOLERANCE
    from m3connect.types import M3Embedding, M3Output

    rng = np.random.default_rng(4)

    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    n, dim = 40, 1024
    fp = ModelFingerprint("bench/m3-size", dim, dim)
    embeddings = M3Output(
        dense=unit(rng.normal(size=(n, dim))),
        sparse=[{int(t): 0.1 for t in rng.choice(500, 20, replace=False)} for _ in range(n)],
        colbert=[unit(rng.normal(size=(int(rng.integers(20, 64)), dim))) for _ in range(n)],
    )
    ids = [f"d{i}" for i in range(n)]
    store = QdrantEdgeStore(tmp_path / "big", fingerprint=fp, colbert_dtype="float16")
    reference = InMemoryStore(fingerprint=fp, colbert_dtype="float16")
    for target in (store, reference):
        target.add(ids, embeddings)
    query = M3Embedding(
        dense=unit(rng.normal(size=dim)),
        sparse={int(t): 0.2 for t in rng.choice(500, 8, replace=False)},
        colbert=unit(embeddings.colbert[3][:16] + 0.5 * rng.normal(size=(16, dim))),
    )
    for spec in (
        {"mode": "colbert"},
        {"mode": "hybrid", "rerank": "colbert"},
        {"mode": "hybrid", "rerank": "all"},
        {"mode": "hybrid", "hybrid_legs": ("dense", "sparse", "colbert"), "fusion": "weighted"},
    ):
        params = SearchParams(k=10, candidates=30, **spec)
        plan = store._plan(params, store._query_vectors(query, params))
        assert plan is not None and plan.recompute is None and "colbert" not in plan.fetch_parts
        got, expected = store.search(query, params), reference.search(query, params)
        assert [h.id for h in got] == [h.id for h in expected]
        for a, e in zip(got, expected, strict=True):
            assert abs(a.score - e.score) <= HALF_MAXSIM_TOLERANCE
            assert all(abs(a.scores[p] - e.scores[p]) <= HALF_MAXSIM_TOLERANCE for p in e.scores)
    store.close()
    small = QdrantEdgeStore(tmp_path / "small", fingerprint=FINGERPRINT, colbert_dtype="float16")
    fill(small)
    q = synthetic_queries(synthetic_embeddings(32, seed=5))[0]
    params = SearchParams(k=5, mode="colbert")
    assert small._plan(params, small._query_vectors(q, params)).recompute == ("part", "colbert")
    small.close()


def test_sigkilled_writer_leaves_a_shard_that_opens_with_whole_writes(tmp_path: Path) -> None:
    """A writer killed with SIGKILL mid-job: the lock goes with the process, the shard opens
    (the engine replays its write-ahead log) and holds every write that returned."""
    path = tmp_path / "killed"
    written = sigkill_edge_writer(path, 40)
    with QdrantEdgeStore(path) as store:
        count = store.count()
        assert count >= written and count % 8 == 0
        assert len(store.get([f"s{written // 8 - 1}-{i}" for i in range(8)])) == 8
