"""M3HybridRetriever: the paper's hybrid search, with the scores in each document's metadata."""

from __future__ import annotations

import pytest
from langchain_m3connect import (
    SCORE_KEY,
    SCORES_KEY,
    M3Embeddings,
    M3HybridRetriever,
    M3VectorStore,
)

from m3connect.filters import Field
from m3connect.store import SearchParams
from m3connect.stores.memory import InMemoryStore

QUERY = "which city is the capital?"


def test_default_is_hybrid_with_all_rerank(filled_vs: M3VectorStore, store: InMemoryStore) -> None:
    retriever = M3HybridRetriever(vectorstore=filled_vs, k=3)
    docs = retriever.invoke(QUERY)
    hits = store.search(
        QUERY, SearchParams(k=3, mode="hybrid", rerank="all", weights=(0.4, 0.2, 0.4))
    )
    assert [doc.id for doc in docs] == [str(h.id) for h in hits]
    for doc, hit in zip(docs, hits, strict=True):
        assert doc.metadata[SCORE_KEY] == pytest.approx(hit.score)
        assert doc.metadata[SCORES_KEY] == pytest.approx(hit.scores)
        assert set(doc.metadata[SCORES_KEY]) == {"dense", "sparse", "colbert"}
        s = doc.metadata[SCORES_KEY]
        assert doc.metadata[SCORE_KEY] == pytest.approx(
            0.4 * s["dense"] + 0.2 * s["sparse"] + 0.4 * s["colbert"]
        )


def test_fields_and_call_overrides(filled_vs: M3VectorStore, store: InMemoryStore) -> None:
    retriever = M3HybridRetriever(
        vectorstore=filled_vs,
        k=4,
        rerank="colbert",
        hybrid_legs=("dense", "sparse", "colbert"),
        fusion="weighted",
        filter={"topic": "geo"},
    )
    docs = retriever.invoke(QUERY)
    hits = store.search(
        QUERY,
        k=4,
        rerank="colbert",
        hybrid_legs=("dense", "sparse", "colbert"),
        fusion="weighted",
        filter={"topic": "geo"},
    )
    assert [doc.id for doc in docs] == [str(h.id) for h in hits]
    assert all(doc.metadata["topic"] == "geo" for doc in docs)

    docs = retriever.invoke(QUERY, k=1, rerank=None, filter=Field("lang") == "de")
    assert [doc.metadata["lang"] for doc in docs] == ["de"]
    assert "colbert" in docs[0].metadata[SCORES_KEY]  # a leg of the weighted fusion


def test_built_from_a_store(
    store: InMemoryStore, embeddings: M3Embeddings, filled_vs: M3VectorStore
) -> None:
    retriever = M3HybridRetriever(
        store=store, embeddings=embeddings, k=2, mode="dense", rerank=None
    )
    assert [d.id for d in retriever.invoke(QUERY)] == [
        str(h.id) for h in store.search(QUERY, k=2, mode="dense")
    ]
    retriever = M3HybridRetriever(store=store, k=2)  # the store's own encoder
    assert len(retriever.invoke(QUERY)) == 2
    assert isinstance(filled_vs.as_hybrid_retriever(k=2), M3HybridRetriever)
    with pytest.raises(ValueError, match="rerank"):
        M3HybridRetriever(vectorstore=filled_vs, rerank="bm25")
    with pytest.raises(ValueError, match="candidates"):  # a StoreError from SearchParams
        M3HybridRetriever(vectorstore=filled_vs, candidates=0)


async def test_async_matches_sync(filled_vs: M3VectorStore) -> None:
    retriever = M3HybridRetriever(vectorstore=filled_vs, k=3)
    sync = retriever.invoke(QUERY)
    got = await retriever.ainvoke(QUERY)
    assert [(d.id, d.metadata[SCORE_KEY]) for d in got] == [
        (d.id, d.metadata[SCORE_KEY]) for d in sync
    ]
    assert len(await retriever.ainvoke(QUERY, k=1)) == 1
