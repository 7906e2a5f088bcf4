"""The sparse drop-ins inside LlamaIndex's own vector stores, built through
``VectorStoreIndex``: ``QdrantVectorStore(enable_hybrid=True)`` on Qdrant ``:memory:`` and
``MilvusVectorStore(enable_sparse=True)`` on Milvus Lite. Each node's text goes through the
model once, each query once; the scores are BGE-M3's, computed again here from the encoder's
own outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from llama_index.core import StorageContext, VectorStoreIndex
from llama_index.core.schema import TextNode
from llama_index.core.vector_stores.types import VectorStoreQueryResult
from llama_index.embeddings.m3connect import M3ConnectEmbedding, M3QdrantSparse

from m3connect.encoder import M3Encoder
from m3connect.fusion import rrf
from m3connect.scoring import lexical_scores
from m3connect.testing import ForwardPassCounter
from tests.conftest import TEXTS

QUERY = "how are dense, sparse and multi vector scores combined?"
IDS = [f"00000000-0000-0000-0000-{i:012d}" for i in range(1, len(TEXTS) + 1)]


def _nodes() -> list[TextNode]:
    return [TextNode(id_=i, text=t) for i, t in zip(IDS, TEXTS)]


def _reference(encoder: M3Encoder) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    docs = encoder.encode(TEXTS)
    q = encoder.encode_queries([QUERY])[0]
    dense = (docs.dense @ q.dense).tolist()  # type: ignore[operator]
    sparse = lexical_scores(q.sparse, docs.sparse).tolist()  # type: ignore[arg-type]
    dense_rank = sorted(zip(IDS, dense), key=lambda p: -p[1])
    sparse_rank = sorted(((i, s) for i, s in zip(IDS, sparse) if s > 0), key=lambda p: -p[1])
    return dense_rank, sparse_rank


def _assert_ranking(
    got: list[tuple[str, float]], want: list[tuple[str, float]], tol: float
) -> None:
    """Same scores in the same order; ids equal up to ties."""
    assert [s for _, s in got] == pytest.approx([s for _, s in want[: len(got)]], abs=tol)
    for (got_id, got_s), (want_id, _) in zip(got, want):
        if not any(abs(s - got_s) <= tol and i != got_id for i, s in want):
            assert got_id == want_id


def test_qdrant_hybrid_one_pass_per_text(encoder: M3Encoder) -> None:
    qdrant_client = pytest.importorskip("qdrant_client")
    qdrant = pytest.importorskip("llama_index.vector_stores.qdrant")
    from llama_index.vector_stores.qdrant.utils import relative_score_fusion

    embed_model = M3ConnectEmbedding(encoder=encoder)
    sparse = M3QdrantSparse(embed_model)
    client = qdrant_client.QdrantClient(":memory:")
    vector_store = qdrant.QdrantVectorStore(
        "m3",
        client=client,
        enable_hybrid=True,
        sparse_doc_fn=sparse.sparse_doc_fn,
        sparse_query_fn=sparse.sparse_query_fn,
    )
    storage = StorageContext.from_defaults(vector_store=vector_store)
    with ForwardPassCounter(encoder) as passes:
        index = VectorStoreIndex(_nodes(), storage_context=storage, embed_model=embed_model)
        assert passes.texts == len(TEXTS)
        passes.reset()
        k = 4
        hybrid = index.as_retriever(
            vector_store_query_mode="hybrid", similarity_top_k=k, sparse_top_k=k
        ).retrieve(QUERY)
        assert passes.texts == 1

    dense_rank, sparse_rank = _reference(encoder)

    def result(ranking: list[tuple[str, float]]) -> VectorStoreQueryResult:
        return VectorStoreQueryResult(
            nodes=[TextNode(id_=i, text="") for i, _ in ranking],
            similarities=[s for _, s in ranking],
            ids=[i for i, _ in ranking],
        )

    want = relative_score_fusion(result(dense_rank[:k]), result(sparse_rank[:k]), top_k=k)
    _assert_ranking(
        [(n.node.node_id, n.score) for n in hybrid],
        list(zip(want.ids, want.similarities)),  # type: ignore[arg-type]
        1e-5,
    )
    # Sparse-only retrieval: Qdrant's scores are BGE-M3's lexical scores.
    got_sparse = index.as_retriever(
        vector_store_query_mode="sparse", similarity_top_k=len(TEXTS), sparse_top_k=len(TEXTS)
    ).retrieve(QUERY)
    _assert_ranking([(n.node.node_id, n.score) for n in got_sparse], sparse_rank, 1e-5)


def test_milvus_hybrid_one_pass_per_text(encoder: M3Encoder, tmp_path: Path) -> None:
    milvus = pytest.importorskip("llama_index.vector_stores.milvus")
    pytest.importorskip("milvus_lite")
    from llama_index.embeddings.m3connect import M3MilvusSparseEmbeddingFunction

    embed_model = M3ConnectEmbedding(encoder=encoder)
    vector_store = milvus.MilvusVectorStore(
        uri=str(tmp_path / "milvus.db"),
        collection_name="m3",
        dim=encoder.dense_dim,
        similarity_metric="IP",
        enable_sparse=True,
        sparse_embedding_function=M3MilvusSparseEmbeddingFunction(embed_model),
        hybrid_ranker="RRFRanker",
        hybrid_ranker_params={"k": 60},
    )
    storage = StorageContext.from_defaults(vector_store=vector_store)
    with ForwardPassCounter(encoder) as passes:
        index = VectorStoreIndex(_nodes(), storage_context=storage, embed_model=embed_model)
        assert passes.texts == len(TEXTS)
        passes.reset()
        k = 4
        hybrid = index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=k).retrieve(
            QUERY
        )
        assert passes.texts == 1

    dense_rank, sparse_rank = _reference(encoder)
    want = rrf([dense_rank[:k], sparse_rank[:k]], k=60)
    _assert_ranking([(n.node.node_id, n.score) for n in hybrid], want, 1e-5)
    # Milvus's sparse IP over the stored weights is BGE-M3's lexical score. (LlamaIndex's own
    # sparse-only mode asks for drop_ratio_search=0.2, which Milvus Lite refuses.)
    got_sparse = vector_store.client.search(
        "m3",
        data=[M3MilvusSparseEmbeddingFunction(embed_model).encode_queries([QUERY])[0]],
        anns_field=vector_store.sparse_embedding_field,
        limit=len(TEXTS),
        search_params={"metric_type": "IP"},
    )[0]
    _assert_ranking([(h["id"], h["distance"]) for h in got_sparse], sparse_rank, 1e-4)
    vector_store.client.close()


def test_sparse_functions_follow_the_embed_models_settings(encoder: M3Encoder) -> None:
    embed_model = M3ConnectEmbedding(
        encoder=encoder, encode_kwargs={"max_length": 8}, query_encode_kwargs={"max_length": 6}
    )
    sparse = M3QdrantSparse(embed_model)
    indices, values = sparse.sparse_doc_fn(TEXTS[:2])
    want = encoder.encode(TEXTS[:2], max_length=8).sparse
    assert [dict(zip(i, v)) for i, v in zip(indices, values)] == want
    assert all(i == sorted(i) for i in indices)
    q_indices, q_values = sparse.sparse_query_fn([QUERY])
    assert dict(zip(q_indices[0], q_values[0])) == encoder.encode([QUERY], max_length=6).sparse[0]
    with pytest.raises(TypeError, match="M3ConnectEmbedding"):
        M3QdrantSparse(encoder)
    assert np.asarray(values[0]).dtype == np.float64
