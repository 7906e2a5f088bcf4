"""ColBERT scoring against the arithmetic: each path's median time over the numpy floor::

    python benchmarks/bench_colbert.py                      # ~25 min, 3.5 GB RSS on 2 cores
    python benchmarks/bench_colbert.py --docs 2000 --milvus-docs 300

The floor is numpy MaxSim over the same rows already in memory as one float32 array
(``rows @ query.T``, max per document, mean), timed in the same run, query by query alternating
with the path it is compared to (a busy machine slows both alike). Documents hold ColBERT rows
in float16 (BGE-M3's usual storage), queries 32 rows; every vector is 1024 wide.

Paths:

- ``core colbert_scores``: the core function on 100 candidates' float16 matrices;
- ``InMemoryStore rerank colbert`` / ``rerank all``: hybrid RRF then a re-rank of 100
  candidates, against (floor + the same hybrid search without re-rank), the issue's target;
- ``InMemoryStore mode colbert``: exact ColBERT over the whole collection, against one product
  over all its token rows (timed on the first ``--floor-docs`` documents and scaled by rows,
  because the whole collection in float32 does not fit in memory at 10,000 x 128);
- ``MilvusStore (Lite) rerank colbert`` and ``mode colbert`` on a smaller collection
  (``--milvus-docs`` 1,000 x ``--milvus-rows`` 32 by default: Milvus Lite 3 is a pure-Python
  engine that materializes every row it returns, about a millisecond per 1024-wide row, and
  scans its token collection in Python on every query); their answers are checked against
  the in-memory store first.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import DIM, sparse_row, unit  # noqa: E402

from m3connect.fingerprint import ModelFingerprint  # noqa: E402
from m3connect.scoring import colbert_scores  # noqa: E402
from m3connect.store import SearchParams  # noqa: E402
from m3connect.stores.memory import InMemoryStore  # noqa: E402
from m3connect.types import M3Embedding, M3Output  # noqa: E402

K = 10
CANDIDATES = 100
QUERY_ROWS = 32
FINGERPRINT = ModelFingerprint("bench/synthetic", DIM, DIM)


def batches(n: int, rows: int, seed: int, batch: int = 250):
    """``(ids, embeddings)`` of ``n`` synthetic documents, ``batch`` at a time (float16
    ColBERT, so the generator never holds the corpus in float32)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n, batch):
        size = min(batch, n - start)
        colbert = rng.standard_normal((size, rows, DIM), dtype=np.float32)
        colbert /= np.linalg.norm(colbert, axis=-1, keepdims=True)
        yield (
            [f"doc-{i}" for i in range(start, start + size)],
            M3Output(
                dense=unit(rng.normal(size=(size, DIM))),
                sparse=[sparse_row(rng, 100) for _ in range(size)],
                colbert=list(colbert.astype(np.float16)),
            ),
        )


def make_queries(n: int, seed: int = 1) -> list[M3Embedding]:
    rng = np.random.default_rng(seed)
    return [
        M3Embedding(
            dense=unit(rng.normal(size=DIM)),
            sparse=sparse_row(rng, 20),
            colbert=unit(rng.normal(size=(QUERY_ROWS, DIM))),
        )
        for _ in range(n)
    ]


def floor_maxsim(query: np.ndarray, rows: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The floor: numpy MaxSim over rows already in one float32 array."""
    return np.maximum.reduceat(rows @ query.T, offsets, axis=0).mean(axis=1)


def packed(matrices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([np.asarray(m, dtype=np.float32) for m in matrices])
    offsets = np.concatenate([[0], np.cumsum([len(m) for m in matrices])[:-1]]).astype(np.intp)
    return rows, offsets


def paired(
    path: Callable[[int], object], floor: Callable[[int], object], n: int, warmup: int = 1
) -> tuple[float, float]:
    """Median ms of ``path(i)`` and ``floor(i)`` over queries ``i``, alternating."""
    for i in range(min(warmup, n)):
        path(i)
        floor(i)
    a, b = [], []
    for i in range(n):
        t = time.perf_counter()
        floor(i)
        b.append(time.perf_counter() - t)
        t = time.perf_counter()
        path(i)
        a.append(time.perf_counter() - t)
    return 1000 * statistics.median(a), 1000 * statistics.median(b)


def report(name: str, path_ms: float, floor_ms: float, note: str = "") -> None:
    print(
        f"{name:<42} {path_ms:10.1f} ms  floor {floor_ms:9.1f} ms  ratio {path_ms / floor_ms:6.2f}"
        + (f"  ({note})" if note else ""),
        flush=True,
    )


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def candidate_ids(rng: np.random.Generator, n_docs: int, n: int) -> list[str]:
    return [f"doc-{i}" for i in rng.choice(n_docs, size=min(n, n_docs), replace=False)]


def bench_memory(args: argparse.Namespace, qs: list[M3Embedding]) -> None:
    store = InMemoryStore(fingerprint=FINGERPRINT, colbert_dtype="float16")
    t = time.perf_counter()
    for ids, emb in batches(args.docs, args.rows, seed=0):
        store.add(ids, emb)
    print(
        f"InMemoryStore: {args.docs} docs x {args.rows} float16 rows added in "
        f"{time.perf_counter() - t:.1f} s, peak RSS {rss_gb():.2f} GB",
        flush=True,
    )
    rng = np.random.default_rng(7)
    n = len(qs)

    # Core function on 100 candidates (float16 matrices as stored) against the floor.
    cands = [candidate_ids(rng, args.docs, CANDIDATES) for _ in qs]
    matrices = [[r.embedding.colbert for r in store.get(c, with_vectors=True)] for c in cands]
    floors = [packed(m) for m in matrices]
    core = paired(
        lambda i: colbert_scores(qs[i].colbert, matrices[i]),
        lambda i: floor_maxsim(qs[i].colbert, *floors[i]),
        n,
    )
    report("core colbert_scores (100 x float16)", *core)

    # Re-rank: the floor over the store's own candidates, plus the hybrid search without it.
    hybrid = SearchParams(mode="hybrid", k=CANDIDATES)
    pools = [[h.id for h in store.search(q, hybrid)] for q in qs]
    pool_floors = [
        packed([r.embedding.colbert for r in store.get(p, with_vectors=True)]) for p in pools
    ]
    for rerank in ("colbert", "all"):
        params = SearchParams(mode="hybrid", k=K, rerank=rerank, candidates=CANDIDATES)
        path_ms, floor_ms = paired(
            lambda i, p=params: store.search(qs[i], p),
            lambda i: (store.search(qs[i], hybrid), floor_maxsim(qs[i].colbert, *pool_floors[i])),
            n,
        )
        report(f"InMemoryStore rerank {rerank}", path_ms, floor_ms, "floor + hybrid search")
    matrices = floors = pool_floors = []  # free them before the next part
    gc.collect()

    # mode="colbert": the floor on the first floor_docs documents, scaled by rows.
    part = min(args.floor_docs, args.docs)
    rows_part, offsets_part = packed(
        [
            r.embedding.colbert
            for r in store.get([f"doc-{i}" for i in range(part)], with_vectors=True)
        ]
    )
    scale = args.docs / part
    colbert = SearchParams(mode="colbert", k=K)
    path_ms, floor_ms = paired(
        lambda i: store.search(qs[i], colbert),
        lambda i: floor_maxsim(qs[i].colbert, rows_part, offsets_part),
        n,
    )
    report(
        "InMemoryStore mode colbert",
        path_ms,
        floor_ms * scale,
        f"floor timed on {part} docs x {scale:g}" if scale != 1 else "",
    )
    print(f"peak RSS {rss_gb():.2f} GB", flush=True)


def bench_milvus(args: argparse.Namespace, qs: list[M3Embedding]) -> None:
    from pymilvus import MilvusClient

    from m3connect.stores.milvus import MilvusStore

    logging.getLogger("pymilvus").setLevel(logging.ERROR)
    folder = Path(tempfile.mkdtemp(prefix="bench_colbert_"))
    try:
        client = MilvusClient(str(folder / "m3.db"))
        store = MilvusStore(client, "bench", fingerprint=FINGERPRINT, colbert_dtype="float16")
        reference = InMemoryStore(fingerprint=FINGERPRINT, colbert_dtype="float16")
        t = time.perf_counter()
        for ids, emb in batches(args.milvus_docs, args.milvus_rows, seed=2, batch=100):
            store.add(ids, emb)
            reference.add(ids, emb)
        added = time.perf_counter() - t
        # Lite searches rows still in its memtable about 4x slower (it rebuilds arrays from
        # them on every request): flushed, as at the end of an indexing job.
        client.flush(store.collection)
        client.flush(store.companion)
        print(
            f"MilvusStore (Lite): {args.milvus_docs} docs x {args.milvus_rows} rows added in "
            f"{added:.1f} s, flushed in {time.perf_counter() - t - added:.1f} s",
            flush=True,
        )
        n = min(len(qs), args.milvus_queries)
        hybrid = SearchParams(mode="hybrid", k=CANDIDATES)
        pools = [[h.id for h in reference.search(q, hybrid)] for q in qs[:n]]
        pool_floors = [
            packed([r.embedding.colbert for r in reference.get(p, with_vectors=True)])
            for p in pools
        ]
        params = SearchParams(mode="hybrid", k=K, rerank="colbert", candidates=CANDIDATES)
        for i in range(n):  # the answers are the reference's
            got = [h.id for h in store.search(qs[i], params)]
            assert got == [h.id for h in reference.search(qs[i], params)], "rerank differs"
        path_ms, floor_ms = paired(
            lambda i: store.search(qs[i], params),
            lambda i: (store.search(qs[i], hybrid), floor_maxsim(qs[i].colbert, *pool_floors[i])),
            n,
            warmup=0,
        )
        report("MilvusStore (Lite) rerank colbert", path_ms, floor_ms, "floor + hybrid search")
        all_rows, all_offsets = packed(
            [
                r.embedding.colbert
                for r in reference.get(
                    [f"doc-{i}" for i in range(args.milvus_docs)], with_vectors=True
                )
            ]
        )
        colbert = SearchParams(mode="colbert", k=K)
        for i in range(n):
            got = [h.id for h in store.search(qs[i], colbert)]
            assert got == [h.id for h in reference.search(qs[i], colbert)], "mode colbert differs"
        path_ms, floor_ms = paired(
            lambda i: store.search(qs[i], colbert),
            lambda i: floor_maxsim(qs[i].colbert, all_rows, all_offsets),
            n,
            warmup=0,
        )
        report("MilvusStore (Lite) mode colbert", path_ms, floor_ms)
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=128, help="ColBERT rows per document")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--floor-docs", type=int, default=500)
    parser.add_argument("--milvus-docs", type=int, default=1_000, help="0 skips Milvus Lite")
    parser.add_argument("--milvus-rows", type=int, default=32)
    parser.add_argument("--milvus-queries", type=int, default=3)
    args = parser.parse_args()
    qs = make_queries(args.queries)
    print(
        f"{QUERY_ROWS} query rows, {CANDIDATES} candidates, k={K}, {args.queries} queries; "
        "medians, ratio = path / floor",
        flush=True,
    )
    if args.docs:
        bench_memory(args, qs)
    if args.milvus_docs:
        bench_milvus(args, qs)


if __name__ == "__main__":
    main()
