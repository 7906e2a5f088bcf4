"""M3HybridRetriever: the paper's hybrid search as LlamaIndex NodeWithScores."""

from __future__ import annotations

import pytest
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.llms import MockLLM
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode
from llama_index.core.vector_stores.types import FilterOperator, MetadataFilter, MetadataFilters
from llama_index.retrievers.m3connect import M3HybridRetriever
from llama_index.vector_stores.m3connect import SCORES_KEY, M3VectorStore

from m3connect.encoder import M3Encoder
from m3connect.filters import Field
from m3connect.store import SearchParams
from m3connect.stores.memory import InMemoryStore
from tests.conftest import METADATAS, TEXTS

QUERY = "which city is the capital?"


@pytest.fixture
def store(encoder: M3Encoder) -> InMemoryStore:
    return InMemoryStore(encoder=encoder)


@pytest.fixture
def vector_store(store: InMemoryStore) -> M3VectorStore:
    vs = M3VectorStore(store)
    vs.add(
        [
            TextNode(id_=f"node-{i}", text=t, metadata=dict(m))
            for i, (t, m) in enumerate(zip(TEXTS, METADATAS, strict=True))
        ]
    )
    return vs


def test_default_is_hybrid_with_all_rerank(
    vector_store: M3VectorStore, store: InMemoryStore
) -> None:
    retriever = M3HybridRetriever(vector_store, similarity_top_k=3)
    assert isinstance(retriever, BaseRetriever)
    got = retriever.retrieve(QUERY)
    hits = store.search(QUERY, SearchParams(k=3, mode="hybrid", rerank="all"))
    assert all(isinstance(n, NodeWithScore) for n in got)
    assert [n.node.node_id for n in got] == [str(h.id) for h in hits]
    for n, hit in zip(got, hits, strict=True):
        scores = n.node.metadata[SCORES_KEY]
        assert n.score == pytest.approx(hit.score)
        assert scores == pytest.approx(hit.scores)
        assert n.score == pytest.approx(
            0.4 * scores["dense"] + 0.2 * scores["sparse"] + 0.4 * scores["colbert"]
        )
        assert SCORES_KEY not in n.node.get_content(metadata_mode=MetadataMode.LLM)
    assert retriever.search_params == SearchParams(k=3, rerank="all")


@pytest.mark.parametrize(
    "filters",
    [
        MetadataFilters(
            filters=[MetadataFilter(key="year", value=2017, operator=FilterOperator.GTE)]
        ),
        {"year": {"$gte": 2017}},
        Field("year") >= 2017,
    ],
    ids=["MetadataFilters", "dict", "Field"],
)
def test_filters_and_settings(
    vector_store: M3VectorStore, store: InMemoryStore, filters: object
) -> None:
    retriever = M3HybridRetriever(
        vector_store, similarity_top_k=5, rerank="colbert", fusion="dbsf", filters=filters
    )
    got = retriever.retrieve(QUERY)
    hits = store.search(
        QUERY, k=5, rerank="colbert", fusion="dbsf", filter={"year": {"$gte": 2017}}
    )
    assert [n.node.node_id for n in got] == [str(h.id) for h in hits]
    assert {n.node.metadata["year"] for n in got} <= {2017, 2018, 2021, 2022, 2023, 2024}
    assert all(n.score == n.node.metadata[SCORES_KEY]["colbert"] for n in got)


def test_built_from_an_m3connect_store(store: InMemoryStore, encoder: M3Encoder) -> None:
    store.add_texts(TEXTS, ids=list(range(len(TEXTS))), metadatas=METADATAS)
    retriever = M3HybridRetriever(store, similarity_top_k=2, mode="dense", rerank=None)
    got = retriever.retrieve(QUERY)
    assert [n.node.node_id for n in got] == [
        str(h.id) for h in store.search(QUERY, k=2, mode="dense")
    ]
    assert got[0].node.get_content() in TEXTS
    bare = InMemoryStore()  # no encoder: the retriever needs encoder=
    with pytest.raises(ValueError, match="encoder"):
        M3HybridRetriever(bare)
    assert M3HybridRetriever(bare, encoder=encoder).retrieve(QUERY) == []
    with pytest.raises(ValueError):
        M3HybridRetriever(store, rerank="bm25")  # type: ignore[arg-type]
    retriever.similarity_top_k = 1
    assert len(retriever.retrieve(QUERY)) == 1


async def test_async_and_query_engine(vector_store: M3VectorStore) -> None:
    retriever = M3HybridRetriever(vector_store, similarity_top_k=3)
    sync = retriever.retrieve(QUERY)
    got = await retriever.aretrieve(QUERY)
    assert [(n.node.node_id, n.score) for n in got] == [(n.node.node_id, n.score) for n in sync]
    engine = RetrieverQueryEngine.from_args(retriever, llm=MockLLM())
    response = engine.query(QUERY)
    assert [n.node.node_id for n in response.source_nodes] == [n.node.node_id for n in sync]
