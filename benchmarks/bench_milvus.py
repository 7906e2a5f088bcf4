"""Adapter overhead of :class:`~m3connect.stores.milvus.MilvusStore` against hand-written raw
pymilvus calls with the same vectors, on Milvus Lite (a ``.db`` file, in process)::

    python benchmarks/bench_milvus.py                  # about 2 minutes on 2 cores
    python benchmarks/bench_milvus.py --docs 1000 --queries 20

Random vectors of BGE-M3's shapes: dense 1024, ~100 sparse tokens over a Zipf vocabulary (so
queries share tokens with documents), 20-60 ColBERT rows of 1024 per document, 32 ColBERT rows
per query. Milvus Lite has no multi-vector field, so both sides keep ColBERT rows in a token
collection (the adapter's "companion" layout; the raw side without generations).

Ingest: ``store.add`` (validation, typed filter values, token rows with a generation, stale-row
cleanup) against ``upsert`` / ``insert`` of hand-built rows in the same batches. Queries: for
each mode the median latency of ``store.search`` against the requests a user would write for
that ranking on Lite (texts and metadata included). The adapter does more where the contract
asks for it:

- every hit carries each representation's exact score (hybrid modes: the hits' dense and sparse
  vectors come back in the same call, ColBERT rows are fetched for the final hits);
- ``colbert``: the raw side is the usual candidates-then-MaxSim re-rank (top 256 tokens per query
  vector, one round, approximate); the adapter proves its top k exact (bounds, more rounds);
- ``dbsf`` and ``weighted``: Milvus has no DBSF and its ``WeightedRanker`` takes a missed leg's
  score as 0, so the raw side uses ``WeightedRanker`` and the adapter fuses exact scores on the
  client (two leg searches, then the candidates' missing scores).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pymilvus import (  # noqa: E402
    AnnSearchRequest,
    DataType,
    MilvusClient,
    RRFRanker,
    WeightedRanker,
)
from synthetic import DIM, corpus, interleaved, queries  # noqa: E402

from m3connect.fingerprint import ModelFingerprint  # noqa: E402
from m3connect.scoring import colbert_scores  # noqa: E402
from m3connect.store import SearchParams  # noqa: E402
from m3connect.stores.milvus import MilvusStore, encode_pk  # noqa: E402
from m3connect.types import M3Embedding, M3Output  # noqa: E402

K = 10
CANDIDATES = 100
TOKENS_PER_QUERY_VECTOR = 256
BATCH = 64

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


# --- hand-written raw requests ------------------------------------------------------------------


class Raw:
    """What a user writes with pymilvus on Milvus Lite for each mode."""

    def __init__(self, client: MilvusClient, name: str) -> None:
        self.client, self.name, self.tokens = client, name, name + "_tokens"

    def create(self) -> None:
        c = self.client
        schema = MilvusClient.create_schema(auto_id=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=65535)
        schema.add_field("dense", DataType.FLOAT_VECTOR, dim=DIM)
        schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
        schema.add_field("text", DataType.VARCHAR, max_length=65535)
        schema.add_field("metadata", DataType.JSON)
        index = MilvusClient.prepare_index_params()
        index.add_index("dense", index_type="FLAT", metric_type="IP")
        index.add_index("sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="IP")
        c.create_collection(self.name, schema=schema, consistency_level="Strong")
        c.create_index(self.name, index, sync=False)  # Lite builds at once; don't poll
        c.load_collection(self.name)
        tokens = MilvusClient.create_schema(auto_id=True)
        tokens.add_field("id", DataType.INT64, is_primary=True, auto_id=True)
        tokens.add_field("doc", DataType.VARCHAR, max_length=65535)
        tokens.add_field("pos", DataType.INT64)
        tokens.add_field("vec", DataType.FLOAT_VECTOR, dim=DIM)
        index = MilvusClient.prepare_index_params()
        index.add_index("vec", index_type="FLAT", metric_type="IP")
        c.create_collection(self.tokens, schema=tokens, consistency_level="Strong")
        c.create_index(self.tokens, index, sync=False)
        c.load_collection(self.tokens)

    def add(self, ids, emb: M3Output, texts, metas) -> None:
        for start in range(0, len(ids), BATCH):
            rows = range(start, min(start + BATCH, len(ids)))
            tokens = [
                {"doc": encode_pk(ids[i]), "pos": j, "vec": v}
                for i in rows
                for j, v in enumerate(emb.colbert[i].tolist())
            ]
            self.client.insert(self.tokens, tokens)
            self.client.upsert(
                self.name,
                [
                    {
                        "pk": encode_pk(ids[i]),
                        "dense": emb.dense[i].tolist(),
                        "sparse": emb.sparse[i],
                        "text": texts[i],
                        "metadata": metas[i],
                    }
                    for i in rows
                ],
            )

    def leg(self, q: M3Embedding, field: str, limit: int) -> AnnSearchRequest:
        data = q.dense.tolist() if field == "dense" else q.sparse
        return AnnSearchRequest([data], field, {"metric_type": "IP"}, limit)

    def colbert_of(self, pks: list[str]) -> dict[str, np.ndarray]:
        rows = self.client.query(
            self.tokens,
            filter="doc in [" + ", ".join(f'"{pk}"' for pk in pks) + "]",
            output_fields=["doc", "pos", "vec"],
            limit=16384,
        )
        by_doc: dict[str, list] = {}
        for row in rows:
            by_doc.setdefault(row["doc"], []).append((row["pos"], row["vec"]))
        return {
            pk: np.asarray([v for _, v in sorted(r)], dtype=np.float32) for pk, r in by_doc.items()
        }

    def texts(self, pks: list[str]) -> list:
        return self.client.get(self.name, ids=pks, output_fields=["text", "metadata"])

    def rerank(self, q: M3Embedding, pks: list[str], extra=None) -> list:
        vectors = self.colbert_of(pks)
        scores = colbert_scores(q.colbert, [vectors[pk] for pk in pks])
        if extra is not None:
            scores = extra(scores)
        top = [pks[i] for i in np.argsort(-scores)[:K]]
        return self.texts(top)

    def search(self, name: str, q: M3Embedding):
        c, out = self.client, ["text", "metadata"]
        if name in ("dense", "sparse"):
            data = [q.dense.tolist()] if name == "dense" else [q.sparse]
            return c.search(self.name, data, anns_field=name, limit=K, output_fields=out)
        if name == "colbert":  # candidates from the token collection, exact MaxSim re-rank
            hits = c.search(
                self.tokens,
                q.colbert.tolist(),
                anns_field="vec",
                limit=TOKENS_PER_QUERY_VECTOR,
                output_fields=["doc"],
            )
            pks = list({h["entity"]["doc"] for per_vector in hits for h in per_vector})
            return self.rerank(q, pks)
        legs = [self.leg(q, "dense", CANDIDATES), self.leg(q, "sparse", CANDIDATES)]
        if name == "hybrid rrf":
            return c.hybrid_search(self.name, legs, RRFRanker(60), limit=K, output_fields=out)
        if name == "hybrid dbsf":  # Milvus has no DBSF: its normalizing WeightedRanker instead
            return c.hybrid_search(
                self.name, legs, WeightedRanker(0.5, 0.5), limit=K, output_fields=out
            )
        if name == "hybrid weighted":  # raw weighted sum: a missed leg counts as 0
            ranker = WeightedRanker(1 / 1.3, 0.3 / 1.3, norm_score=False)
            return c.hybrid_search(self.name, legs, ranker, limit=K, output_fields=out)
        fields = ["pk"] if name == "hybrid rrf + colbert rerank" else ["pk", "dense", "sparse"]
        pool = c.hybrid_search(
            self.name, legs, RRFRanker(60), limit=CANDIDATES, output_fields=fields
        )[0]
        pks = [h["entity"]["pk"] for h in pool]
        if name == "hybrid rrf + colbert rerank":
            return self.rerank(q, pks)

        def all_three(colbert: np.ndarray) -> np.ndarray:
            dense = np.asarray([h["entity"]["dense"] for h in pool], dtype=np.float32) @ q.dense
            sparse = np.asarray(
                [
                    sum(w * h["entity"]["sparse"].get(t, 0.0) for t, w in q.sparse.items())
                    for h in pool
                ]
            )
            return 0.4 * dense + 0.2 * sparse + 0.4 * colbert

        return self.rerank(q, pks, all_three)


# --- the run ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=150)
    parser.add_argument("--queries", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)

    t0 = time.perf_counter()
    ids, emb, texts, metas = corpus(args.docs, colbert_rows=(20, 60))
    qs = queries(args.queries)
    n_tokens = sum(len(c) for c in emb.colbert)
    print(
        f"Milvus Lite, {args.docs} docs: dense {DIM}, ~100 sparse tokens, {n_tokens} ColBERT rows "
        f"of {DIM} (20-60 per doc); queries: 32 ColBERT rows; k={K}, candidates={CANDIDATES}"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-milvus-"))
    client = MilvusClient(str(tmp / "bench.db"))
    try:
        raw = Raw(client, "raw")
        raw.create()
        store = MilvusStore(
            client, "adapter", fingerprint=ModelFingerprint("bench/random-m3", DIM, DIM)
        )

        rows: list[tuple[str, float, float]] = []
        t = time.perf_counter()
        raw.add(ids, emb, texts, metas)
        raw_s = time.perf_counter() - t
        t = time.perf_counter()
        for start in range(0, len(ids), BATCH):
            stop = start + BATCH
            store.add(ids[start:stop], emb[start:stop], texts[start:stop], metas[start:stop])
        adapter_s = time.perf_counter() - t
        rows.append(("ingest (docs/s)", len(ids) / adapter_s, len(ids) / raw_s))

        for name, spec in MODES.items():
            params = SearchParams(k=K, candidates=CANDIDATES, **spec)
            # Modes that read no ColBERT rows take milliseconds: more samples for a stable median.
            reads_tokens = "colbert" in name or "rerank" in name
            adapter_ms, raw_ms = interleaved(
                lambda q, p=params: store.search(q, p),
                lambda q, n=name: raw.search(n, q),
                qs if reads_tokens else qs * 6,
            )
            rows.append((name, adapter_ms, raw_ms))
    finally:
        client.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'':32s} {'adapter':>10s} {'raw':>10s} {'ratio':>7s}")
    for name, adapter, raw_value in rows:
        if name.startswith("ingest"):
            print(
                f"{name:32s} {adapter:10.1f} {raw_value:10.1f} {raw_value / adapter:7.2f}  (time ratio)"
            )
        else:
            print(
                f"{name + ' (ms)':32s} {adapter:10.2f} {raw_value:10.2f} {adapter / raw_value:7.2f}"
            )
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
