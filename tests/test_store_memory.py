"""The reference store: its answers follow from the core scoring and fusion, by hand."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from store_contract import (
    FINGERPRINT,
    StoreContract,
    synthetic_corpus,
    synthetic_embeddings,
    synthetic_queries,
)

from m3connect import fusion
from m3connect.filters import Field, RawFilter, matches
from m3connect.fingerprint import FingerprintMismatchError, ModelFingerprint
from m3connect.scoring import colbert_scores, combine_scores, dense_scores, lexical_scores
from m3connect.store import AsyncStoreAdapter, SearchParams, StoreError
from m3connect.stores.memory import InMemoryStore


class TestInMemoryContract(StoreContract):
    can_reopen = False
    one_write_call = True

    @contextlib.contextmanager
    def failing_write(self, store, step):
        made = [0]
        original = store._docs

        class FailingDocs(dict):
            def update(self, *args, **kwargs):
                made[0] += 1
                if made[0] == step:
                    raise MemoryError("injected")
                super().update(*args, **kwargs)

        store._docs = FailingDocs(original)
        try:
            yield made
        finally:
            store._docs = dict(store._docs)

    @pytest.fixture
    def store_factory(self):
        return lambda fingerprint, **options: InMemoryStore(fingerprint=fingerprint, **options)


@pytest.fixture
def corpus():
    return synthetic_corpus()


@pytest.fixture
def store(corpus):
    ids, embeddings, texts, metadatas = corpus
    s = InMemoryStore(fingerprint=FINGERPRINT)
    s.add(ids, embeddings, texts, metadatas)
    return s


def hand_scores(query, embeddings):
    return {
        "dense": dense_scores(query.dense, embeddings.dense),
        "sparse": lexical_scores(query.sparse, embeddings.sparse),
        "colbert": colbert_scores(query.colbert, embeddings.colbert),
    }


def assert_ranking(actual, expected):
    """Same ids in the same order, scores equal to rounding."""
    assert [doc_id for doc_id, _ in actual] == [doc_id for doc_id, _ in expected]
    assert [score for _, score in actual] == pytest.approx([score for _, score in expected])


def by_hand_ranking(ids, values, limit, positive_only=False):
    order = sorted(range(len(ids)), key=lambda i: -values[i])
    return [(ids[i], float(values[i])) for i in order if not positive_only or values[i] > 0][:limit]


@pytest.mark.parametrize("mode", ["dense", "sparse", "colbert"])
def test_single_mode_scores_are_the_core_scores(store, corpus, mode):
    ids, embeddings, _, _ = corpus
    query = synthetic_queries(embeddings)[0]
    expected = by_hand_ranking(ids, hand_scores(query, embeddings)[mode], 7, mode == "sparse")
    hits = store.search(query, mode=mode, k=7)
    assert [h.id for h in hits] == [doc_id for doc_id, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], rtol=1e-12)
    assert all(set(h.scores) == {mode} and h.scores[mode] == h.score for h in hits)


def test_hybrid_rrf_is_core_rrf_over_the_legs(store, corpus):
    ids, embeddings, _, _ = corpus
    query = synthetic_queries(embeddings)[1]
    scores = hand_scores(query, embeddings)
    dense_leg = by_hand_ranking(ids, scores["dense"], 10)
    sparse_leg = by_hand_ranking(ids, scores["sparse"], 10, positive_only=True)
    expected = fusion.rrf([dense_leg, sparse_leg], k=60)[:6]
    hits = store.search(query, mode="hybrid", k=6, candidates=10)
    assert_ranking([(h.id, h.score) for h in hits], expected)
    # Each hit carries both legs' exact scores, also where one leg missed it.
    for hit in hits:
        i = ids.index(hit.id)
        assert hit.scores == pytest.approx(
            {"dense": scores["dense"][i], "sparse": scores["sparse"][i]}
        )


def test_weighted_fusion_uses_exact_scores_for_missed_candidates(store, corpus):
    ids, embeddings, _, _ = corpus
    query = synthetic_queries(embeddings)[2]
    scores = hand_scores(query, embeddings)
    dense_leg = by_hand_ranking(ids, scores["dense"], 5)
    sparse_leg = by_hand_ranking(ids, scores["sparse"], 5, positive_only=True)
    pool = list(dict.fromkeys([d for d, _ in dense_leg] + [d for d, _ in sparse_leg]))
    # At least one candidate is missed by one leg, so "taken as 0" would differ.
    assert len(pool) > 5
    expected = sorted(
        (
            (d, (1.0 * scores["dense"][ids.index(d)] + 0.3 * scores["sparse"][ids.index(d)]) / 1.3)
            for d in pool
        ),
        key=lambda item: -item[1],
    )[:4]
    hits = store.search(
        query, mode="hybrid", fusion="weighted", weights=(1.0, 0.3, 1.0), k=4, candidates=5
    )
    assert [h.id for h in hits] == [d for d, _ in expected]
    np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], rtol=1e-9)


def test_dbsf_is_core_dbsf_over_the_legs(store, corpus):
    ids, embeddings, _, _ = corpus
    query = synthetic_queries(embeddings)[0]
    scores = hand_scores(query, embeddings)
    legs = [
        by_hand_ranking(ids, scores["dense"], 12),
        by_hand_ranking(ids, scores["sparse"], 12, True),
    ]
    expected = fusion.dbsf(legs)[:5]
    hits = store.search(query, mode="hybrid", fusion="dbsf", k=5, candidates=12)
    assert_ranking([(h.id, h.score) for h in hits], expected)


@pytest.mark.parametrize("rerank", ["colbert", "all"])
def test_rerank_rescores_the_top_fused_candidates(store, corpus, rerank):
    ids, embeddings, _, _ = corpus
    query = synthetic_queries(embeddings)[3]
    scores = hand_scores(query, embeddings)
    legs = [
        by_hand_ranking(ids, scores["dense"], 8),
        by_hand_ranking(ids, scores["sparse"], 8, True),
    ]
    pool = [d for d, _ in fusion.rrf(legs, k=60)[:8]]
    weights = (0.4, 0.2, 0.4)

    def final(d):
        i = ids.index(d)
        if rerank == "colbert":
            return scores["colbert"][i]
        return float(
            combine_scores(scores["dense"][i], scores["sparse"][i], scores["colbert"][i], weights)
        )

    expected = sorted(((d, final(d)) for d in pool), key=lambda item: -item[1])[:5]
    hits = store.search(query, mode="hybrid", rerank=rerank, k=5, candidates=8)
    assert_ranking([(h.id, h.score) for h in hits], expected)
    expected_parts = {"dense", "sparse", "colbert"}
    assert all(set(h.scores) == expected_parts for h in hits)


def test_filters_follow_the_reference_semantics(store, corpus):
    ids, embeddings, _, metadatas = corpus
    spec = (Field("year") >= 2010) & ~Field("lang").isin(["en"])
    allowed = {ids[i] for i, m in enumerate(metadatas) if matches(spec, m)}
    assert 0 < len(allowed) < len(ids)
    assert store.count(filter=spec) == len(allowed)
    hits = store.search(synthetic_queries(embeddings)[0], mode="dense", k=100, filter=spec)
    assert {h.id for h in hits} == allowed


def test_raw_filters_are_refused_by_the_reference(store, corpus):
    _, embeddings, _, _ = corpus
    with pytest.raises(StoreError, match="raw filter"):
        store.search(synthetic_queries(embeddings)[0], filter=RawFilter({"must": []}))


def test_fingerprint_of_another_model_is_refused_with_an_encoder():
    class FakeEncoder:
        fingerprint = ModelFingerprint("m", 16, 12, heads_sha256="c" * 64)

    with pytest.raises(FingerprintMismatchError):
        InMemoryStore(FakeEncoder(), fingerprint=FINGERPRINT)  # type: ignore[arg-type]


def test_fingerprint_is_learned_from_the_first_batch():
    store = InMemoryStore()
    store.add(["a"], synthetic_embeddings(1, seed=3))
    assert store.fingerprint is not None
    assert (store.fingerprint.dense_dim, store.fingerprint.colbert_dim) == (16, 12)


def test_search_without_encoder_needs_an_embedding(store):
    with pytest.raises(StoreError, match="no encoder"):
        store.search("a text query")


def test_delete_needs_ids_or_filter(store):
    with pytest.raises(StoreError):
        store.delete()


@pytest.mark.parametrize(
    "bad",
    [
        {"mode": "lexical"},
        {"k": 0},
        {"fusion": "borda"},
        {"rerank": "bm25"},
        {"hybrid_legs": ("dense",)},
        {"weights": (1.0, -1.0, 0.0)},
        {"mode": "hybrid", "fusion": "weighted", "weights": (0.0, 0.0, 1.0)},
        {"filter": {"year": {"$regex": "x"}}},
    ],
)
def test_bad_search_params_name_the_problem(bad):
    with pytest.raises(ValueError):
        SearchParams(**bad)


async def test_async_form_gives_the_same_answers(store, corpus):
    _, embeddings, _, _ = corpus
    query = synthetic_queries(embeddings)[0]
    async_store = AsyncStoreAdapter(store)
    assert await async_store.count() == store.count()
    got = await async_store.search(query, mode="hybrid", rerank="colbert", k=5)
    assert [(h.id, h.score) for h in got] == [
        (h.id, h.score) for h in store.search(query, mode="hybrid", rerank="colbert", k=5)
    ]
    await async_store.delete(["doc-2"])
    assert await async_store.get(["doc-2"]) == []


def test_query_sparse_weights_follow_the_stored_rules(store, corpus):
    _, embeddings, _, _ = corpus
    query = synthetic_queries(embeddings)[0]
    bad = type(query)(query.dense, {1: -0.5}, query.colbert)
    with pytest.raises(StoreError, match="must be >= 0"):
        store.search(bad, mode="sparse")
    zero = type(query)(query.dense, {**query.sparse, 10_000: 0.0}, query.colbert)
    assert [h.id for h in store.search(zero, mode="sparse")] == [
        h.id for h in store.search(query, mode="sparse")
    ]


def test_get_refuses_ids_of_other_types(store):
    # True hashes like 1 in Python: without the check it would find document 1.
    with pytest.raises(StoreError, match="ids must be"):
        store.get([True])
