"""Adapter overhead of the Qdrant stores: m3connect's calls against hand-written raw calls
with the same vectors, on qdrant-client's local mode and on qdrant-edge (the real engine).

    python benchmarks/bench_qdrant.py                       # ~2 minutes on 2 cores
    python benchmarks/bench_qdrant.py --docs 2000 --runs edge,edge-f16

Random vectors of BGE-M3's shapes: dense 1024, ~100 sparse tokens over a Zipf vocabulary (so
queries share tokens with documents), 60-140 ColBERT rows of 1024 per document (float16 by
default), 32 ColBERT rows per query.

Ingest: ``store.add`` (validation, float16 rounding, JSON checks, points) against
``upsert`` of hand-built points in the same batches, alternating. Queries (on the same
collection): for each mode, the median latency of ``store.search`` against the one raw
``query_points`` / ``EdgeShard.query`` request a user would write for that ranking (payload
included, no vectors; its results are read: ids, scores, payloads), alternating query by query.
Local mode is pure Python and slow: it gets the first 150 documents and a third of the queries. The adapter does more where the
contract asks for it, and the table says so:

- every hit carries each representation's exact score: where the final score is not that score
  (hybrid modes), a second, batched request has the engine score the hits by id (local mode:
  the hits' vectors come back with them instead, and the client scores them);
- weighted fusion and ``rerank="all"`` re-score the candidates' union with each representation
  (a raw ``FormulaQuery`` over the legs takes a missed leg's score as 0);
- with float16 ColBERT storage the engine rounds the query to float16, so the adapter asks for
  ``k + 10`` hits with their ColBERT vectors and re-scores them exactly (qdrant-edge only; local
  mode stores float32 whatever the datatype).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthetic import DIM, corpus, interleaved, queries  # noqa: E402

from m3connect.fingerprint import ModelFingerprint  # noqa: E402
from m3connect.store import SearchParams  # noqa: E402
from m3connect.stores.qdrant import point_id  # noqa: E402
from m3connect.types import M3Embedding, M3Output  # noqa: E402

K = 10
CANDIDATES = 100

MODES: dict[str, dict] = {
    "dense": {"mode": "dense"},
    "sparse": {"mode": "sparse"},
    "colbert": {"mode": "colbert"},
    "hybrid rrf": {"mode": "hybrid", "fusion": "rrf"},
    "hybrid dbsf": {"mode": "hybrid", "fusion": "dbsf"},
    "hybrid weighted": {"mode": "hybrid", "fusion": "weighted", "weights": (1.0, 0.3, 1.0)},
    "hybrid rrf + colbert rerank": {"mode": "hybrid", "rerank": "colbert"},
    "hybrid rrf + rerank all": {"mode": "hybrid", "rerank": "all"},
}


def read(points) -> list:
    """What a caller does with raw results: read each hit's id, score and payload."""
    points = getattr(points, "points", points)
    return [(p.id, p.score, p.payload) for p in points]


# --- hand-written raw requests ------------------------------------------------------------------


def payload(doc_id: str, text: str, meta: dict) -> dict:
    return {"doc_id": doc_id, "doc_id_type": "str", "text": text, "metadata": meta}


class RawClient:
    """What a user writes with qdrant-client for each mode."""

    def __init__(self, client, collection: str) -> None:
        from qdrant_client import models

        self.m, self.client, self.collection = models, client, collection

    def create(self, colbert_dtype: str) -> None:
        m = self.m
        self.client.create_collection(
            self.collection,
            vectors_config={
                "dense": m.VectorParams(size=DIM, distance=m.Distance.DOT),
                "colbert": m.VectorParams(
                    size=DIM,
                    distance=m.Distance.DOT,
                    multivector_config=m.MultiVectorConfig(
                        comparator=m.MultiVectorComparator.MAX_SIM
                    ),
                    hnsw_config=m.HnswConfigDiff(m=0),
                    datatype=m.Datatype.FLOAT16 if colbert_dtype == "float16" else None,
                ),
            },
            sparse_vectors_config={"sparse": m.SparseVectorParams()},
        )

    def add(self, ids, emb: M3Output, texts, metas, batch: int = 64) -> None:
        m = self.m
        for start in range(0, len(ids), batch):
            points = [
                m.PointStruct(
                    id=point_id(ids[i]),
                    vector={
                        "dense": emb.dense[i].tolist(),
                        "sparse": m.SparseVector(
                            indices=list(emb.sparse[i]), values=list(emb.sparse[i].values())
                        ),
                        "colbert": emb.colbert[i].tolist(),
                    },
                    payload=payload(ids[i], texts[i], metas[i]),
                )
                for i in range(start, min(start + batch, len(ids)))
            ]
            self.client.upsert(self.collection, points, wait=True)

    def search(self, name: str, q: M3Embedding):
        m = self.m
        call = dict(collection_name=self.collection, limit=K, with_payload=True)
        sparse = m.SparseVector(indices=list(q.sparse), values=list(q.sparse.values()))
        if name == "sparse":
            return self.client.query_points(query=sparse, using="sparse", **call)
        if name == "colbert":
            return self.client.query_points(query=q.colbert.tolist(), using="colbert", **call)
        dense = q.dense.tolist()
        if name == "dense":
            return self.client.query_points(query=dense, using="dense", **call)
        legs = [
            m.Prefetch(query=dense, using="dense", limit=CANDIDATES),
            m.Prefetch(query=sparse, using="sparse", limit=CANDIDATES),
        ]
        rrf = m.RrfQuery(rrf=m.Rrf(k=61))
        if name == "hybrid rrf":
            return self.client.query_points(prefetch=legs, query=rrf, **call)
        if name == "hybrid dbsf":
            return self.client.query_points(
                prefetch=legs, query=m.FusionQuery(fusion=m.Fusion.DBSF), **call
            )
        if name == "hybrid weighted":  # the usual formula: a leg's missed score counts as 0
            formula = m.SumExpression(
                sum=[
                    m.MultExpression(mult=[1 / 1.3, "$score[0]"]),
                    m.MultExpression(mult=[0.3 / 1.3, "$score[1]"]),
                ]
            )
            return self.client.query_points(
                prefetch=legs, query=m.FormulaQuery(formula=formula), **call
            )
        pool = m.Prefetch(prefetch=legs, query=rrf, limit=CANDIDATES)
        colbert = q.colbert.tolist()
        if name == "hybrid rrf + colbert rerank":
            return self.client.query_points(prefetch=[pool], query=colbert, using="colbert", **call)
        # rerank all: each representation's score of the fused pool, combined in a formula
        rescored = [
            m.Prefetch(prefetch=[pool], query=v, using=u, limit=CANDIDATES)
            for v, u in ((dense, "dense"), (sparse, "sparse"), (colbert, "colbert"))
        ]
        formula = m.SumExpression(
            sum=[
                m.MultExpression(mult=[0.4, "$score[0]"]),
                m.MultExpression(mult=[0.2, "$score[1]"]),
                m.MultExpression(mult=[0.4 / 32, "$score[2]"]),
            ]
        )
        return self.client.query_points(
            prefetch=rescored, query=m.FormulaQuery(formula=formula), **call
        )


class RawEdge:
    """The same requests, written for qdrant-edge."""

    def __init__(self, path: Path) -> None:
        import qdrant_edge as e

        self.e, self.path, self.shard = e, path, None

    def create(self, colbert_dtype: str) -> None:
        e = self.e
        config = e.EdgeConfig(
            vectors={
                "dense": e.EdgeVectorParams(DIM, e.Distance.Dot),
                "colbert": e.EdgeVectorParams(
                    DIM,
                    e.Distance.Dot,
                    multivector_config=e.MultiVectorConfig(e.MultiVectorComparator.MaxSim),
                    datatype=e.VectorStorageDatatype.Float16
                    if colbert_dtype == "float16"
                    else None,
                    hnsw_config=e.HnswIndexConfig(
                        m=0, ef_construct=100, full_scan_threshold=10_000
                    ),
                ),
            },
            sparse_vectors={"sparse": e.EdgeSparseVectorParams()},
        )
        self.shard = e.EdgeShard.create(str(self.path), config)

    def add(self, ids, emb: M3Output, texts, metas, batch: int = 64) -> None:
        e = self.e
        for start in range(0, len(ids), batch):
            points = [
                e.Point(
                    point_id(ids[i]),
                    {
                        "dense": emb.dense[i].tolist(),
                        "sparse": e.SparseVector(list(emb.sparse[i]), list(emb.sparse[i].values())),
                        "colbert": emb.colbert[i].tolist(),
                    },
                    payload(ids[i], texts[i], metas[i]),
                )
                for i in range(start, min(start + batch, len(ids)))
            ]
            self.shard.update(e.UpdateOperation.upsert_points(points))

    def search(self, name: str, q: M3Embedding):
        e = self.e
        near = e.Query.Nearest

        def run(query, prefetches=None):
            return self.shard.query(
                e.QueryRequest(K, query=query, prefetches=prefetches, with_payload=True)
            )

        if name == "colbert":
            return run(near(q.colbert.tolist(), using="colbert"))
        sparse = near(e.SparseVector(list(q.sparse), list(q.sparse.values())), using="sparse")
        if name == "sparse":
            return run(sparse)
        dense = near(q.dense.tolist(), using="dense")
        if name == "dense":
            return run(dense)
        legs = [e.Prefetch(CANDIDATES, query=dense), e.Prefetch(CANDIDATES, query=sparse)]
        rrf = e.Fusion.Rrf(k=61)
        if name == "hybrid rrf":
            return run(rrf, legs)
        if name == "hybrid dbsf":
            return run(e.Fusion.Dbsf(), legs)
        x = e.Expression
        if name == "hybrid weighted":
            terms = [
                x.Mult([x.Constant(1 / 1.3), x.Variable("$score[0]")]),
                x.Mult([x.Constant(0.3 / 1.3), x.Variable("$score[1]")]),
            ]
            return run(e.Formula(x.Sum(terms)), legs)
        pool = e.Prefetch(CANDIDATES, query=rrf, prefetches=legs)
        colbert = near(q.colbert.tolist(), using="colbert")
        if name == "hybrid rrf + colbert rerank":
            return run(colbert, [pool])
        rescored = [
            e.Prefetch(CANDIDATES, query=v, prefetches=[pool]) for v in (dense, sparse, colbert)
        ]
        terms = [
            x.Mult([x.Constant(c), x.Variable(f"$score[{i}]")])
            for i, c in enumerate((0.4, 0.2, 0.4 / 32))
        ]
        return run(e.Formula(x.Sum(terms)), rescored)


# --- the runs -----------------------------------------------------------------------------------


def bench_backend(
    backend: str, data, qs, colbert_dtype: str, tmp: Path
) -> list[tuple[str, float, float]]:
    from m3connect.stores.qdrant import QdrantEdgeStore, QdrantStore

    ids, emb, texts, metas = data
    fingerprint = ModelFingerprint("bench/random-m3", DIM, DIM)
    options = {"fingerprint": fingerprint, "colbert_dtype": colbert_dtype}
    rows: list[tuple[str, float, float]] = []

    if backend == "local":
        from qdrant_client import QdrantClient

        client = QdrantClient(":memory:")
        raw = RawClient(client, "raw")
        raw.create(colbert_dtype)
        store = QdrantStore(client, "adapter", **options)
    else:
        raw = RawEdge(tmp / "raw")
        raw.create(colbert_dtype)
        store = QdrantEdgeStore(tmp / "adapter", **options)

    # Batches of 64, alternating between the two so that both see the same machine state.
    raw_ingest = adapter_ingest = 0.0
    for start in range(0, len(ids), 64):
        part = slice(start, start + 64)
        batch = (ids[part], emb[part], texts[part], metas[part])
        t = time.perf_counter()
        raw.add(*batch)
        raw_ingest += time.perf_counter() - t
        t = time.perf_counter()
        store.add(*batch)
        adapter_ingest += time.perf_counter() - t
    n = len(ids)
    rows.append(("ingest (docs/s)", n / adapter_ingest, n / raw_ingest))
    # Both query the adapter's collection (same layout, same vector names): same data, same
    # caches; the raw copy goes.
    if backend == "local":
        client.delete_collection("raw")
        raw.collection = "adapter"
    else:
        raw.shard.close()
        raw.shard = store.shard
    gc.collect()

    for name, spec in MODES.items():
        params = SearchParams(k=K, candidates=CANDIDATES, **spec)
        adapter_ms, raw_ms = interleaved(
            lambda q, p=params: store.search(q, p), lambda q, n=name: read(raw.search(n, q)), qs
        )
        rows.append((name, adapter_ms, raw_ms))
    store.close()
    if backend == "local":
        client.close()
    return rows


RUNS = {
    "local": ("qdrant-client local mode (datatype ignored: float32)", "local", "float32"),
    "edge": ("qdrant-edge (EdgeShard), ColBERT float32", "edge", "float32"),
    "edge-f16": ("qdrant-edge (EdgeShard), ColBERT float16", "edge", "float16"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=300)
    parser.add_argument("--queries", type=int, default=20, help="per mode (local mode: a third)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"any of {', '.join(RUNS)}")
    args = parser.parse_args()

    t0 = time.perf_counter()
    data = corpus(args.docs, colbert_rows=(60, 140))
    qs = queries(args.queries)
    print(
        f"{args.docs} docs: dense {DIM}, ~100 sparse tokens, 60-140 x {DIM} ColBERT rows; "
        f"queries: ~20 sparse tokens, 32 ColBERT rows; k={K}, candidates={CANDIDATES}; "
        "query times are medians"
    )
    for run in args.runs.split(","):
        title, backend, dtype = RUNS[run]
        if backend == "edge":
            try:
                import qdrant_edge  # noqa: F401
            except ImportError:
                print(f"\n{title}: qdrant-edge-py is not installed, skipped")
                continue
        tmp = Path(tempfile.mkdtemp(prefix="bench-qdrant-"))
        try:
            run_qs, run_data = qs, data
            if backend == "local":
                n = min(args.docs, 150)
                run_qs = qs[: max(3, len(qs) // 3)]
                run_data = (data[0][:n], data[1][:n], data[2][:n], data[3][:n])
            rows = bench_backend(backend, run_data, run_qs, dtype, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"\n{title}: {len(run_data[0])} docs, {len(run_qs)} queries per mode")
        print(f"{'':30s} {'adapter':>10s} {'raw':>10s} {'ratio':>7s} {'extra':>8s}")
        for name, adapter, raw in rows:
            if name.startswith("ingest"):
                print(f"{name:30s} {adapter:10.1f} {raw:10.1f} {raw / adapter:7.2f}  (time ratio)")
            else:
                extra = adapter - raw
                print(
                    f"{name + ' (ms)':30s} {adapter:10.2f} {raw:10.2f} {adapter / raw:7.2f} {extra:+8.2f}"
                )
        sys.stdout.flush()
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
