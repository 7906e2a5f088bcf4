"""M3VectorStore gives the wrapped m3connect store's answers, as LangChain documents."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from langchain_core.documents import Document
from langchain_m3connect import SCORE_KEY, SCORES_KEY, M3Embeddings, M3VectorStore

from m3connect.encoder import M3Encoder
from m3connect.filters import Field, matches, parse_filter
from m3connect.fingerprint import FingerprintMismatchError, ModelFingerprint
from m3connect.store import SearchParams, StoreError
from m3connect.stores.memory import InMemoryStore
from tests.support import METADATAS, TEXTS

QUERY = "how are dense, sparse and multi vector scores combined?"

SEARCHES: list[dict[str, Any]] = [
    {},
    {"mode": "dense"},
    {"mode": "sparse"},
    {"mode": "colbert"},
    {"fusion": "weighted", "weights": (0.5, 0.5, 0.0)},
    {"fusion": "dbsf", "hybrid_legs": ("dense", "sparse", "colbert")},
    {"rerank": "colbert", "candidates": 5},
    {"rerank": "all"},
    {"mode": "dense", "rerank": "all", "weights": (1.0, 0.3, 1.0)},
    {"filter": {"lang": "en", "year": {"$gte": 2016}}},
    {"filter": (Field("topic") == "geo") | Field("tags").isin(["fusion"]), "rerank": "all"},
]


def _ids(docs: list[Document]) -> list[str | None]:
    return [doc.id for doc in docs]


@pytest.mark.parametrize("options", SEARCHES, ids=[str(o) for o in SEARCHES])
def test_search_equals_the_stores_search(
    filled_vs: M3VectorStore, store: InMemoryStore, options: dict[str, Any]
) -> None:
    hits = store.search(QUERY, SearchParams(k=5, **options))
    assert hits, "the search found nothing"

    pairs = filled_vs.similarity_search_with_score(QUERY, k=5, **options)
    assert [doc.id for doc, _ in pairs] == [str(h.id) for h in hits]
    for (doc, score), hit in zip(pairs, hits, strict=True):
        assert score == pytest.approx(hit.score)
        assert doc.page_content == hit.text
        assert doc.metadata[SCORE_KEY] == pytest.approx(hit.score)
        assert doc.metadata[SCORES_KEY] == pytest.approx(hit.scores)
        assert set(doc.metadata[SCORES_KEY]) == set(SearchParams(**options).scored_parts)
        assert {k: v for k, v in doc.metadata.items() if not k.startswith("m3_")} == hit.metadata

    docs = filled_vs.similarity_search(QUERY, k=5, **options)
    assert _ids(docs) == [str(h.id) for h in hits]
    assert [doc.metadata for doc in docs] == [h.metadata for h in hits]  # no scores added


def test_one_encoder_pass_fills_all_three(store: InMemoryStore, encoder: M3Encoder) -> None:
    from m3connect.testing import ForwardPassCounter

    embeddings = M3Embeddings(encoder=encoder)  # a fresh cache
    vectorstore = M3VectorStore(store, embeddings)
    with ForwardPassCounter(encoder) as passes:
        ids = vectorstore.add_texts(TEXTS[:3], METADATAS[:3])
        assert passes.texts == 3
        passes.reset()
        vectorstore.similarity_search(QUERY, k=2, rerank="all")
        assert passes.texts == 1

    expected = encoder.encode(TEXTS[:3])
    for i, record in enumerate(store.get(ids, with_vectors=True)):
        assert record.text == TEXTS[i] and record.metadata == METADATAS[i]
        assert np.allclose(record.embedding.dense, expected.dense[i])
        assert record.embedding.sparse == pytest.approx(expected.sparse[i])
        assert np.allclose(record.embedding.colbert, expected.colbert[i])


def test_ids_and_batches(store: InMemoryStore, embeddings: M3Embeddings) -> None:
    vectorstore = M3VectorStore(store, embeddings)
    ids = vectorstore.add_texts(TEXTS[:5], ids=["a", None, "c", None, "e"], batch_size=2)
    assert ids[0] == "a" and ids[2] == "c" and ids[4] == "e"
    assert ids[1] and ids[3] and len(set(ids)) == 5
    assert store.count() == 5
    assert [d.page_content for d in vectorstore.get_by_ids(["e", "missing", "a"])] == [
        TEXTS[4],
        TEXTS[0],
    ]
    with pytest.raises(ValueError):
        vectorstore.add_texts(["x"], ids=["1", "2"])
    # A store's int ids come back as strings: LangChain's Document.id is a string.
    store.add_texts(["an int id"], ids=[7])
    assert vectorstore.similarity_search("an int id", k=1, mode="dense")[0].id == "7"


def test_filters_and_delete(filled_vs: M3VectorStore, store: InMemoryStore) -> None:
    spec = {"lang": {"$in": ["de", "zh"]}}
    docs = filled_vs.similarity_search("capital city", k=8, filter=spec)
    assert {doc.metadata["lang"] for doc in docs} == {"de", "zh"}
    docs = filled_vs.similarity_search("capital city", k=8, filter=Field("year") < 2016)
    assert [doc.metadata["year"] for doc in docs] == [2015]

    filled_vs.delete(filter={"topic": "geo"})
    assert store.count() == 4
    assert all(
        matches(parse_filter({"topic": "retrieval"}), r.metadata)
        for r in store.get([f"doc-{i}" for i in range(8)])
    )
    filled_vs.delete(["doc-0", "never-stored"])
    assert store.count() == 3
    with pytest.raises(TypeError):
        filled_vs.delete(["doc-1"], where="x")
    filled_vs.delete()  # LangChain's contract: no ids, delete everything
    assert store.count() == 0


def test_search_by_vector_is_a_dense_search(
    filled_vs: M3VectorStore, store: InMemoryStore, embeddings: M3Embeddings
) -> None:
    vector = embeddings.embed_query(QUERY)
    docs = filled_vs.similarity_search_by_vector(vector, k=3, filter={"lang": "en"})
    hits = store.search(QUERY, mode="dense", k=3, filter={"lang": "en"})
    assert _ids(docs) == [str(h.id) for h in hits]
    with pytest.raises(ValueError):
        filled_vs.similarity_search_by_vector(vector, k=3, mode="hybrid")


def test_relevance_scores(filled_vs: M3VectorStore, store: InMemoryStore) -> None:
    pairs = filled_vs.similarity_search_with_relevance_scores(QUERY, k=3, mode="dense")
    hits = store.search(QUERY, mode="dense", k=3)
    assert [score for _, score in pairs] == pytest.approx([(1 + h.score) / 2 for h in hits])
    assert all(0 <= score <= 1 for _, score in pairs)
    threshold = pairs[1][1]
    kept = filled_vs.similarity_search_with_relevance_scores(
        QUERY, k=3, mode="dense", score_threshold=threshold
    )
    assert len(kept) == 2
    # The default hybrid search (RRF of dense and sparse, rrf_k=60): the fused score over the
    # best one possible, 2 / 61.
    pairs = filled_vs.similarity_search_with_relevance_scores(QUERY, k=3)
    hits = store.search(QUERY, k=3)
    assert [score for _, score in pairs] == pytest.approx([h.score * 61 / 2 for h in hits])
    assert all(0 < score <= 1 for _, score in pairs)
    pairs = filled_vs.similarity_search_with_relevance_scores(QUERY, k=3, fusion="dbsf")
    hits = store.search(QUERY, k=3, fusion="dbsf")
    assert [score for _, score in pairs] == pytest.approx([min(1, h.score / 2) for h in hits])
    with pytest.raises(ValueError, match="relevance_score_fn"):
        filled_vs.similarity_search_with_relevance_scores(QUERY, k=3, mode="sparse")
    custom = M3VectorStore(store, filled_vs.embeddings, relevance_score_fn=lambda s: 0.5)
    assert [s for _, s in custom.similarity_search_with_relevance_scores(QUERY, k=2)] == [0.5, 0.5]


def test_max_marginal_relevance(filled_vs: M3VectorStore, store: InMemoryStore) -> None:
    candidates = store.search(QUERY, k=6)
    docs = filled_vs.max_marginal_relevance_search(QUERY, k=3, fetch_k=6, lambda_mult=0.3)
    assert len(docs) == 3 and len(set(_ids(docs))) == 3
    assert set(_ids(docs)) <= {str(h.id) for h in candidates}
    # lambda_mult=1 is pure relevance: the candidates in dense-score order.
    pure = filled_vs.max_marginal_relevance_search(
        QUERY, k=3, fetch_k=8, lambda_mult=1.0, mode="dense"
    )
    assert _ids(pure) == [str(h.id) for h in store.search(QUERY, k=3, mode="dense")]
    assert filled_vs.max_marginal_relevance_search(QUERY, k=3, filter={"lang": "xx"}) == []


def test_search_options_are_checked(filled_vs: M3VectorStore) -> None:
    with pytest.raises(TypeError, match="unknown search option"):
        filled_vs.similarity_search(QUERY, k=2, top_p=3)
    with pytest.raises(StoreError):
        filled_vs.similarity_search(QUERY, k=2, mode="bm25")


def test_default_search_params_and_overrides(
    store: InMemoryStore, embeddings: M3Embeddings
) -> None:
    vectorstore = M3VectorStore(store, embeddings, search_params=SearchParams(rerank="colbert"))
    vectorstore.add_texts(TEXTS)
    pairs = vectorstore.similarity_search_with_score(QUERY, k=2)
    assert pairs[0][0].metadata[SCORE_KEY] == pairs[0][0].metadata[SCORES_KEY]["colbert"]
    plain = vectorstore.similarity_search_with_score(QUERY, k=2, rerank=None)
    assert "colbert" not in plain[0][0].metadata[SCORES_KEY]


def test_from_texts_and_retriever(embeddings: M3Embeddings) -> None:
    vectorstore = M3VectorStore.from_texts(
        TEXTS, embeddings, METADATAS, ids=[str(i) for i in range(8)]
    )
    assert isinstance(vectorstore.store, InMemoryStore) and vectorstore.store.count() == 8
    retriever = vectorstore.as_retriever(
        search_kwargs={"k": 2, "mode": "sparse", "filter": {"lang": "en"}}
    )
    docs = retriever.invoke("Seoul people")
    hits = vectorstore.store.search("Seoul people", k=2, mode="sparse", filter={"lang": "en"})
    assert _ids(docs) == [str(h.id) for h in hits]
    mmr = vectorstore.as_retriever(search_type="mmr", search_kwargs={"k": 2, "fetch_k": 5})
    assert len(mmr.invoke("Seoul people")) == 2
    with pytest.raises(TypeError):
        M3VectorStore.from_texts(TEXTS, object())  # type: ignore[arg-type]


def test_needs_a_compatible_encoder(embeddings: M3Embeddings) -> None:
    with pytest.raises(ValueError, match="encoder"):
        M3VectorStore(InMemoryStore())
    other = InMemoryStore(fingerprint=ModelFingerprint("other", 16, 12, heads_sha256="b" * 64))
    with pytest.raises(FingerprintMismatchError):
        M3VectorStore(other, embeddings)
    with pytest.raises(TypeError):
        M3VectorStore(InMemoryStore(), object())  # type: ignore[arg-type]


async def test_async_matches_sync(filled_vs: M3VectorStore) -> None:
    for options in ({}, {"rerank": "all", "filter": {"lang": "en"}}):
        sync = filled_vs.similarity_search_with_score(QUERY, k=4, **options)
        got = await filled_vs.asimilarity_search_with_score(QUERY, k=4, **options)
        assert [(d.id, s) for d, s in got] == [(d.id, s) for d, s in sync]
    assert _ids(await filled_vs.asimilarity_search(QUERY, k=3)) == _ids(
        filled_vs.similarity_search(QUERY, k=3)
    )
    mmr = await filled_vs.amax_marginal_relevance_search(QUERY, k=2, fetch_k=5)
    assert _ids(mmr) == _ids(filled_vs.max_marginal_relevance_search(QUERY, k=2, fetch_k=5))
    ids = await filled_vs.aadd_texts(["async text"], [{"lang": "xx"}], ids=["async-1"])
    assert [d.page_content for d in await filled_vs.aget_by_ids(ids)] == ["async text"]
    await filled_vs.adelete(filter={"lang": "xx"})
    assert await filled_vs.aget_by_ids(ids) == []
    relevance = await filled_vs.asimilarity_search_with_relevance_scores(QUERY, k=2, mode="colbert")
    assert len(relevance) == 2 and all(0 <= s <= 1 for _, s in relevance)


def test_langchain_indexing_api(store: InMemoryStore, embeddings: M3Embeddings) -> None:
    from langchain_core.indexing import InMemoryRecordManager, index

    vectorstore = M3VectorStore(store, embeddings)
    manager = InMemoryRecordManager(namespace="m3connect-test")
    manager.create_schema()
    docs = [Document(page_content=t, metadata={"source": f"s{i}"}) for i, t in enumerate(TEXTS[:4])]
    first = index(
        docs, manager, vectorstore, cleanup="full", source_id_key="source", key_encoder="sha256"
    )
    assert first["num_added"] == 4 and store.count() == 4
    again = index(
        docs[:3], manager, vectorstore, cleanup="full", source_id_key="source", key_encoder="sha256"
    )
    assert again["num_skipped"] == 3 and again["num_deleted"] == 1 and store.count() == 3


def test_score_threshold_on_the_default_hybrid_search(
    filled_vs: M3VectorStore, store: InMemoryStore
) -> None:
    hits = store.search(QUERY, k=8)
    relevance = [h.score * 61 / 2 for h in hits]
    threshold = (relevance[2] + relevance[3]) / 2
    want = [str(h.id) for h, r in zip(hits, relevance) if r >= threshold]
    assert len(want) == 3
    assert _ids(filled_vs.similarity_search(QUERY, k=8, score_threshold=threshold)) == want
    pairs = filled_vs.similarity_search_with_score(QUERY, k=8, score_threshold=threshold)
    assert [doc.id for doc, _ in pairs] == want
    retriever = filled_vs.as_retriever(
        search_type="similarity_score_threshold",
        search_kwargs={"k": 8, "score_threshold": threshold},
    )
    assert _ids(retriever.invoke(QUERY)) == want


def test_sparse_search_may_return_fewer_than_k(filled_vs: M3VectorStore) -> None:
    docs = filled_vs.similarity_search("北京", k=8, mode="sparse")
    assert len(docs) < 8


def test_a_bare_id_is_one_id(store: InMemoryStore, embeddings: M3Embeddings) -> None:
    """Issue 15: ``delete("abc")`` deletes ``abc``, never ``a``, ``b`` and ``c``."""
    vectorstore = M3VectorStore(store, embeddings)
    vectorstore.add_texts(TEXTS[:4], ids=["a", "b", "c", "abc"])
    assert [d.id for d in vectorstore.get_by_ids("abc")] == ["abc"]  # type: ignore[arg-type]
    vectorstore.delete("abc")  # type: ignore[arg-type]
    assert sorted(d.id for d in vectorstore.get_by_ids(["a", "b", "c", "abc"])) == ["a", "b", "c"]
    assert vectorstore.add_texts(TEXTS[4:5], ids="xyz") == ["xyz"]  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        vectorstore.delete(b"a")  # type: ignore[arg-type]
    assert store.count() == 4
