"""The sparse drop-ins inside the framework's own vector stores: ``langchain_qdrant``'s
``QdrantVectorStore`` (Qdrant ``:memory:``) and ``langchain_milvus``'s ``Milvus`` (Milvus Lite),
with hybrid search. Each text goes through the model once, each query once; the scores are
BGE-M3's, computed again here in numpy from the encoder's own outputs."""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
from langchain_m3connect import M3Embeddings

from m3connect.fusion import rrf
from m3connect.scoring import lexical_scores
from m3connect.testing import ForwardPassCounter
from tests.support import METADATAS, TEXTS, assert_same_ranking, shared_encoder

QUERY = "how are dense, sparse and multi vector scores combined?"
IDS = [str(uuid.UUID(int=i + 1)) for i in range(len(TEXTS))]


def _reference_legs(query: str) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The dense and sparse rankings of QUERY over TEXTS, by the encoder's outputs."""
    encoder = shared_encoder()
    docs = encoder.encode(TEXTS)
    q = encoder.encode_queries([query])[0]
    dense = docs.dense @ q.dense  # type: ignore[operator]
    sparse = lexical_scores(q.sparse, docs.sparse)  # type: ignore[arg-type]
    dense_rank = sorted(zip(IDS, dense.tolist()), key=lambda p: -p[1])
    sparse_rank = sorted(
        ((i, s) for i, s in zip(IDS, sparse.tolist()) if s > 0), key=lambda p: -p[1]
    )
    return dense_rank, sparse_rank


def test_qdrant_hybrid_one_pass_per_text() -> None:
    qdrant = pytest.importorskip("langchain_qdrant")
    from langchain_m3connect.qdrant import M3QdrantSparseEmbeddings

    dense = M3Embeddings(encoder=shared_encoder())
    sparse = M3QdrantSparseEmbeddings(dense)
    with ForwardPassCounter(shared_encoder()) as passes:
        store = qdrant.QdrantVectorStore.from_texts(
            TEXTS,
            dense,
            metadatas=METADATAS,
            ids=IDS,
            sparse_embedding=sparse,
            retrieval_mode=qdrant.RetrievalMode.HYBRID,
            location=":memory:",
            collection_name="m3",
        )
        # langchain-qdrant encodes "dummy_text" once to size a new collection.
        assert passes.texts == len(TEXTS) + 1
        passes.reset()
        k = 4
        got = store.similarity_search_with_score(QUERY, k=k)
        assert passes.texts == 1

    dense_rank, sparse_rank = _reference_legs(QUERY)
    # langchain-qdrant prefetches k per leg and fuses with Qdrant's RRF, 1 / (1 + rank).
    want = rrf([dense_rank[:k], sparse_rank[:k]], k=1)
    assert_same_ranking([(d.metadata["_id"], s) for d, s in got], want, tol=1e-6)

    # The stored sparse vectors are BGE-M3's weights, exactly.
    point = store.client.retrieve("m3", [IDS[3]], with_vectors=True)[0]
    stored = point.vector[store.sparse_vector_name]
    weights = shared_encoder().encode([TEXTS[3]]).sparse[0]  # type: ignore[index]
    assert dict(zip(stored.indices, stored.values)) == pytest.approx(weights, rel=1e-6)

    # Sparse-only retrieval: Qdrant's scores are BGE-M3's lexical scores.
    sparse_store = qdrant.QdrantVectorStore(
        store.client,
        "m3",
        embedding=dense,
        sparse_embedding=sparse,
        retrieval_mode=qdrant.RetrievalMode.SPARSE,
    )
    got_sparse = sparse_store.similarity_search_with_score(QUERY, k=len(TEXTS))
    assert_same_ranking([(d.metadata["_id"], s) for d, s in got_sparse], sparse_rank, tol=1e-5)


async def test_qdrant_async_one_pass_per_text() -> None:
    qdrant = pytest.importorskip("langchain_qdrant")
    from langchain_m3connect.qdrant import M3QdrantSparseEmbeddings

    dense = M3Embeddings(encoder=shared_encoder())
    sparse = M3QdrantSparseEmbeddings(dense)
    store = qdrant.QdrantVectorStore.from_texts(
        [],
        dense,
        sparse_embedding=sparse,
        retrieval_mode=qdrant.RetrievalMode.HYBRID,
        location=":memory:",
        collection_name="m3-async",
    )
    with ForwardPassCounter(shared_encoder()) as passes:
        await store.aadd_texts(TEXTS, METADATAS, ids=IDS)
        assert passes.texts == len(TEXTS)
        passes.reset()
        got = await store.asimilarity_search(QUERY, k=3)
        assert passes.texts == 1
    assert len(got) == 3


def test_milvus_hybrid_one_pass_per_text(tmp_path: Path) -> None:
    langchain_milvus = pytest.importorskip("langchain_milvus")
    pytest.importorskip("milvus_lite")
    from langchain_m3connect.milvus import M3MilvusSparseEmbedding

    dense = M3Embeddings(encoder=shared_encoder())
    sparse = M3MilvusSparseEmbedding(dense)
    with ForwardPassCounter(shared_encoder()) as passes:
        store = langchain_milvus.Milvus.from_texts(
            TEXTS,
            [dense, sparse],
            metadatas=[{"lang": m["lang"], "year": m["year"]} for m in METADATAS],
            ids=IDS,
            vector_field=["dense", "sparse"],
            index_params=[
                {"index_type": "FLAT", "metric_type": "IP", "params": {}},
                {"index_type": "SPARSE_INVERTED_INDEX", "metric_type": "IP", "params": {}},
            ],
            connection_args={"uri": str(tmp_path / "milvus.db")},
            collection_name="m3",
        )
        assert passes.texts == len(TEXTS)
        passes.reset()
        k = 4
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # ranker_type: still supported
            got = store.similarity_search_with_score(
                QUERY,
                k=k,
                fetch_k=len(TEXTS),
                # Milvus Lite searches a sparse index exactly only (no drop ratio).
                param=[{"metric_type": "IP", "params": {}}] * 2,
                ranker_type="rrf",
                ranker_params={"k": 60},
            )
        assert passes.texts == 1

    dense_rank, sparse_rank = _reference_legs(QUERY)
    want = rrf([dense_rank, sparse_rank], k=60)
    assert_same_ranking([(d.metadata["pk"], s) for d, s in got], want, tol=1e-5)
    # Milvus's sparse IP is BGE-M3's lexical score.
    sparse_docs = store.client.search(
        "m3",
        data=[sparse.embed_query(QUERY)],
        anns_field="sparse",
        limit=len(TEXTS),
        search_params={"metric_type": "IP"},
    )[0]
    assert_same_ranking([(h["pk"], h["distance"]) for h in sparse_docs], sparse_rank, tol=1e-4)
    store.client.close()


def test_sparse_dropins_refuse_other_embeddings() -> None:
    pytest.importorskip("langchain_qdrant")
    from langchain_m3connect.qdrant import M3QdrantSparseEmbeddings

    with pytest.raises(TypeError, match="M3Embeddings"):
        M3QdrantSparseEmbeddings(object())  # type: ignore[arg-type]


def test_dense_then_sparse_shares_one_pass_and_respects_settings() -> None:
    pytest.importorskip("langchain_milvus")
    from langchain_m3connect.milvus import M3MilvusSparseEmbedding

    dense = M3Embeddings(encoder=shared_encoder(), encode_kwargs={"max_length": 8})
    sparse = M3MilvusSparseEmbedding(dense)
    with ForwardPassCounter(shared_encoder()) as passes:
        vectors = dense.embed_documents(TEXTS[:3])
        weights = sparse.embed_documents(TEXTS[:3])
        assert passes.texts == 3
    want = shared_encoder().encode(TEXTS[:3], max_length=8)
    np.testing.assert_allclose(np.asarray(vectors), want.dense, atol=1e-6)
    assert weights == want.sparse
