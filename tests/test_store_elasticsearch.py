"""The Elasticsearch adapter against a fake node (tests/es_fake.py) that answers like
Elasticsearch for the basic and the trial/enterprise licences and checks every request, through
the real ``elasticsearch`` client; and, when ``ES_URL`` is set, against a real cluster.

Tolerances: scores are float32 in Elasticsearch (kNN ``(1 + dot) / 2``, ``script_score``), so
every score is within 1e-5 of the reference (measured: < 2e-7). Sparse scores are exact: ES ranks
the sparse leg with weights kept to 9 significant bits, the adapter rescores it from the stored
weights. The one place ES's 9-bit ranks remain is the server-side ``rrf`` retriever
(Enterprise): see ``test_server_rrf_ranks_sparse_with_nine_bit_weights``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
import os
import uuid

import numpy as np
import pytest
from elastic_transport import TransportError
from es_fake import FakeElasticsearch, quantize_feature
from store_contract import (
    COLBERT_DIM,
    DENSE_DIM,
    FINGERPRINT,
    OTHER_FINGERPRINT,
    SEARCH_CASES,
    StoreContract,
    assert_same_hits,
    synthetic_corpus,
    synthetic_embeddings,
    synthetic_queries,
)

from m3connect.filters import Field, RawFilter
from m3connect.fingerprint import FingerprintMismatchError
from m3connect.store import SearchParams, StoreError
from m3connect.stores import elasticsearch as es_store
from m3connect.stores.elasticsearch import (
    AsyncElasticsearchStore,
    BulkWriteError,
    ElasticsearchStore,
    build_mapping,
)
from m3connect.stores.memory import InMemoryStore
from m3connect.types import M3Embedding, M3Output

SCORE_TOL = 1e-5
LIVE_SCORE_TOL = 1e-4


@pytest.fixture
def make_cluster():
    """Fake clusters; each must have seen only well-formed requests when the test ends."""
    clusters: list[FakeElasticsearch] = []

    def make(licence: str = "basic", **options) -> FakeElasticsearch:
        clusters.append(FakeElasticsearch(licence, **options))
        return clusters[-1]

    yield make
    for cluster in clusters:
        assert cluster.violations == [], cluster.violations


def fill(*stores) -> None:
    ids, embeddings, texts, metadatas = synthetic_corpus()
    for store in stores:
        store.add(ids[:20], embeddings[:20], texts[:20], metadatas[:20])
        store.add(ids[20:], embeddings[20:], texts[20:], metadatas[20:])


def searches(cluster: FakeElasticsearch) -> list[dict]:
    return [r["body"] for r in cluster.requests if r["path"].endswith("/_search")]


# --- the contract, on both licences -------------------------------------------------------------


class TestElasticsearchBasicContract(StoreContract):
    """Basic licence (Elasticsearch 9.2): legs in the server, fusion and ColBERT in the client."""

    small_batch_options = {"chunk_size": 3}
    one_write_call = True

    @contextlib.contextmanager
    def failing_write(self, store, step):
        """The ``step``-th bulk or delete-by-query fails part way: a bulk writes the first half
        of its items and the node refuses the rest (a bulk is not atomic)."""
        made = [0]
        original = store._call

        def call(request):
            api, kwargs = request
            if api in ("bulk", "delete_by_query"):
                made[0] += 1
                if made[0] == step and api == "bulk":
                    actions = list(kwargs["actions"])
                    half = len(actions) // 2
                    done = original(("bulk", {"actions": actions[:half]}))
                    refused = {"type": "es_rejected_execution_exception", "reason": "injected"}
                    return done + [
                        (False, {a["_op_type"]: {"_id": a["_id"], "status": 500, "error": refused}})
                        for a in actions[half:]
                    ]
                if made[0] == step:
                    raise TransportError("injected")
            return original(request)

        store._call = call
        try:
            yield made
        finally:
            del store._call

    score_tol = SCORE_TOL
    licence = "basic"
    version = "9.2.0"

    @pytest.fixture
    def store_factory(self, make_cluster):
        client = make_cluster(self.licence, version=self.version).client()
        return lambda fingerprint, name="contract", **options: ElasticsearchStore(
            client, name, fingerprint=fingerprint, **options
        )


class TestElasticsearchEnterpriseContract(TestElasticsearchBasicContract):
    """Trial licence (Elasticsearch 9.1): rank_vectors, the rrf retriever and maxSimDotProduct."""

    licence = "trial"
    version = "9.1.0"


class TestElasticsearchOldestContract(TestElasticsearchBasicContract):
    """Elasticsearch 8.18 (no sparse_vector index_options, no exclude_vectors), exact kNN."""

    version = "8.18.2"

    @pytest.fixture
    def store_factory(self, make_cluster):
        client = make_cluster("enterprise", version=self.version).client()
        return lambda fingerprint, name="contract", **options: ElasticsearchStore(
            client, name, fingerprint=fingerprint, dense_index_options={"type": "flat"}, **options
        )


# --- licences -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("licence", "status", "expected"),
    [
        ("basic", "active", "basic"),
        ("trial", "active", "enterprise"),
        ("enterprise", "active", "enterprise"),
        ("platinum", "active", "basic"),
        ("enterprise", "expired", "basic"),
    ],
)
def test_licence_is_detected_once(make_cluster, licence, status, expected):
    cluster = make_cluster(licence, status=status)
    store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)
    assert store.effective_licence == expected
    fill(store)
    store.search(synthetic_queries(synthetic_corpus()[1])[0], mode="hybrid", rerank="colbert")
    assert store.colbert_layout == ("rank_vectors" if expected == "enterprise" else "binary")
    assert sum(r["path"] == "/_license" for r in cluster.requests) == 1
    created = next(
        r["body"] for r in cluster.requests if r["method"] == "PUT" and r["path"] == "/docs"
    )
    assert created["mappings"]["properties"]["colbert"]["type"] == store.colbert_layout
    uses_rrf = any("retriever" in body for body in searches(cluster))
    assert uses_rrf == (expected == "enterprise")


def test_unreadable_licence_means_basic(make_cluster, caplog):
    cluster = make_cluster("trial")
    cluster.licence_readable = False  # a user without the monitor privilege
    with caplog.at_level(logging.WARNING, logger="m3connect.stores.elasticsearch"):
        store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)
    assert store.effective_licence == "basic"
    assert "could not read the Elasticsearch licence" in caplog.text


def test_enterprise_asked_of_a_basic_cluster_is_a_clear_error(make_cluster):
    cluster = make_cluster("basic")
    store = ElasticsearchStore(
        cluster.client(), "docs", fingerprint=FINGERPRINT, licence="enterprise"
    )
    assert not any(r["path"] == "/_license" for r in cluster.requests)
    with pytest.raises(StoreError, match="licen"):
        store.add(["a"], synthetic_embeddings(1, seed=1))
    assert "docs" not in cluster.indices


def test_basic_asked_of_an_enterprise_cluster_stays_in_the_client(make_cluster):
    cluster = make_cluster("enterprise")
    store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT, licence="basic")
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    fill(store, reference)
    query = synthetic_queries(synthetic_corpus()[1])[2]
    for case in ("hybrid-rrf", "hybrid-three-legs-rrf", "hybrid-rerank-colbert", "colbert"):
        params = SearchParams(k=5, **SEARCH_CASES[case])
        assert_same_hits(
            store.search(query, params),
            reference.search(query, params),
            reference.search(query, params),
            SCORE_TOL,
        )
    bodies = searches(cluster)
    assert store.colbert_layout == "binary"
    assert not any("retriever" in b or "maxSimDotProduct" in str(b) for b in bodies)


def test_losing_the_licence_falls_back_to_the_client(make_cluster, caplog):
    cluster = make_cluster("trial")
    store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    fill(store, reference)
    cluster.licence = "basic"  # the trial ended
    query = synthetic_queries(synthetic_corpus()[1])[1]
    params = SearchParams(
        mode="hybrid", hybrid_legs=("dense", "sparse", "colbert"), rerank="colbert", k=5
    )
    with caplog.at_level(logging.WARNING, logger="m3connect.stores.elasticsearch"):
        hits = store.search(query, params)
    assert "refused an Enterprise feature" in caplog.text
    assert store.effective_licence == "basic"
    expected = reference.search(query, params)
    assert_same_hits(
        hits, expected, expected, SCORE_TOL
    )  # ColBERT now read from rank_vectors' _source


def test_enterprise_licence_lost_is_an_error_when_asked_for(make_cluster):
    cluster = make_cluster("trial")
    store = ElasticsearchStore(
        cluster.client(), "docs", fingerprint=FINGERPRINT, licence="enterprise"
    )
    fill(store)
    cluster.licence = "basic"
    with pytest.raises(StoreError, match="Enterprise feature"):
        store.search(synthetic_queries(synthetic_corpus()[1])[0], mode="hybrid")


def test_server_rrf_ranks_sparse_with_nine_bit_weights(make_cluster):
    """ES keeps 9 significant bits of each stored sparse weight. Two documents whose exact
    sparse scores differ by less than that swap places in ES's sparse ranking (ties in index order); the client-side
    legs rescore from the stored weights, the rrf retriever cannot."""
    cluster = make_cluster("trial")
    rng = np.random.default_rng(3)
    dense = rng.normal(size=(3, DENSE_DIM))
    dense = (dense / np.linalg.norm(dense, axis=1, keepdims=True)).astype(np.float32)
    a, b = 0.29995, 0.2999  # a > b, but both keep the same 9 bits: a tie for ES, in index order
    assert quantize_feature(a) == quantize_feature(b)
    docs = M3Output(
        dense=dense,
        sparse=[{7: b}, {7: a}, {8: 0.1}],
        colbert=[np.eye(COLBERT_DIM, dtype=np.float32)[:2]] * 3,
    )
    ids = ["b", "a", "c"]
    query = M3Embedding(
        dense=dense[2], sparse={7: 1.0}, colbert=np.eye(COLBERT_DIM, dtype=np.float32)[:1]
    )
    params = SearchParams(mode="hybrid", k=3, rrf_k=1)
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    reference.add(ids, docs)
    exact = {h.id: h.score for h in reference.search(query, params)}
    server = ElasticsearchStore(cluster.client(), "server", fingerprint=FINGERPRINT)
    client_side = ElasticsearchStore(
        cluster.client(), "client", fingerprint=FINGERPRINT, server_rrf=False
    )
    for store in (server, client_side):
        store.add(ids, docs)
    assert {h.id: h.score for h in client_side.search(query, params)} == pytest.approx(
        exact, abs=1e-7
    )
    swapped = {h.id: h.score for h in server.search(query, params)}
    # a and b trade sparse ranks 1 and 2: each fused score moves by 1/(1+1) - 1/(1+2).
    assert swapped["a"] == pytest.approx(exact["a"] - (1 / 2 - 1 / 3), abs=1e-7)
    assert swapped["b"] == pytest.approx(exact["b"] + (1 / 2 - 1 / 3), abs=1e-7)
    hits = server.search(query, params)
    assert hits[0].scores["sparse"] == pytest.approx(
        a if hits[0].id == "a" else b, rel=1e-6
    )  # still exact


# --- requests -----------------------------------------------------------------------------------


def test_mapping_and_query_shapes(make_cluster):
    cluster = make_cluster("trial", version="9.2.0")
    store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)
    fill(store)
    create = next(
        r["body"] for r in cluster.requests if r["method"] == "PUT" and r["path"] == "/docs"
    )
    props = create["mappings"]["properties"]
    assert props["dense"] == {
        "type": "dense_vector",
        "dims": DENSE_DIM,
        "index": True,
        "similarity": "dot_product",
        "index_options": {"type": "int8_hnsw"},
    }
    assert props["sparse"] == {"type": "sparse_vector", "index_options": {"prune": False}}
    assert props["colbert"] == {
        "type": "rank_vectors",
        "dims": COLBERT_DIM,
        "element_type": "float",
    }
    assert create["mappings"]["_meta"]["m3connect"]["fingerprint"] == FINGERPRINT.to_dict()
    assert create["mappings"]["dynamic"] == "strict"
    assert create["settings"] == {"index.mapping.exclude_source_vectors": False}

    bulk = [r for r in cluster.requests if r["path"] == "/_bulk"]
    assert bulk and all(r["params"]["refresh"] == "wait_for" for r in bulk)
    lines = bulk[0]["body"]
    assert [next(iter(line)) for line in lines[:2]] == ["index", "uid"]
    assert lines[0]["index"]["_id"] == "i:0" and lines[2]["index"]["_id"] == "s:1"

    query = synthetic_queries(synthetic_corpus()[1])[0]
    cluster.requests.clear()
    store.search(query, mode="hybrid", k=5, candidates=30, filter={"lang": "ko"}, rerank="colbert")
    first = searches(cluster)[0]
    rrf = first["retriever"]["rrf"]
    assert rrf["rank_constant"] == 60 and rrf["rank_window_size"] == 30 and first["size"] == 30
    knn, sparse = (child for child in rrf["retrievers"])
    assert knn["knn"]["k"] == 30 and knn["knn"]["num_candidates"] >= 30
    assert knn["knn"]["filter"] == [{"term": {"metadata.lang": "ko"}}]
    assert knn["knn"]["rescore_vector"] == {"oversample": 2.0}
    clause = sparse["standard"]["query"]["bool"]
    assert clause["must"][0]["sparse_vector"]["prune"] is False
    assert clause["filter"] == [{"term": {"metadata.lang": "ko"}}]
    rerank = searches(cluster)[1]["query"]["script_score"]
    assert "maxSimDotProduct" in rerank["script"]["source"]


def test_basic_requests_are_separate_legs(make_cluster):
    cluster = make_cluster("basic")
    store = ElasticsearchStore(
        cluster.client(), "docs", fingerprint=FINGERPRINT, dense_index_options={"type": "flat"}
    )
    fill(store)
    cluster.requests.clear()
    store.search(synthetic_queries(synthetic_corpus()[1])[0], mode="hybrid", k=5)
    dense, sparse = searches(cluster)[:2]
    assert dense["knn"]["k"] == 100 and "rescore_vector" not in dense["knn"]  # flat: exact floats
    assert sparse["query"]["sparse_vector"]["prune"] is False
    assert not any("retriever" in body for body in searches(cluster))


def test_basic_colbert_leg_pages_through_the_index(make_cluster, monkeypatch):
    monkeypatch.setattr(es_store, "_SCROLL_PAGE", 7)
    cluster = make_cluster("basic")
    store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    fill(store, reference)
    query = synthetic_queries(synthetic_corpus()[1])[3]
    params = SearchParams(mode="colbert", k=6, filter=Field("year") >= 2005)
    expected = reference.search(query, params)
    assert_same_hits(store.search(query, params), expected, expected, SCORE_TOL)
    assert (
        sum(r["path"] == "/_search/scroll" and r["method"] == "POST" for r in cluster.requests) >= 4
    )
    assert any(r["path"] == "/_search/scroll" and r["method"] == "DELETE" for r in cluster.requests)


# --- attaching to an existing index -------------------------------------------------------------


def _existing(cluster, name="docs", **changes):
    mapping = build_mapping(
        FINGERPRINT, colbert_layout="binary", dense_index_options={"type": "flat"}
    )
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = mapping
        for part in parents:
            target = target[part]
        if value is None:
            del target[leaf]
        else:
            target[leaf] = value
    cluster.client().indices.create(index=name, mappings=mapping)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"properties__dense__dims": DENSE_DIM + 1}, "dense has dims 17"),
        ({"properties__dense__similarity": "cosine"}, "similarity 'cosine'"),
        ({"properties__sparse": None}, "field 'sparse' is missing"),
        ({"properties__colbert": {"type": "keyword"}}, "not rank_vectors or binary"),
        ({"_meta": None}, "not created by m3connect"),
    ],
)
def test_attaching_to_an_index_that_does_not_fit(make_cluster, change, message):
    cluster = make_cluster()
    _existing(cluster, **change)
    with pytest.raises(StoreError, match=message):
        ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)


def test_attaching_adopts_the_stored_fingerprint_and_checks_it(make_cluster):
    cluster = make_cluster()
    _existing(cluster)
    store = ElasticsearchStore(cluster.client(), "docs")
    assert store.fingerprint == FINGERPRINT
    with pytest.raises(FingerprintMismatchError):
        ElasticsearchStore(cluster.client(), "docs", fingerprint=OTHER_FINGERPRINT)


def test_vectors_left_out_of_source_are_rehydrated(make_cluster):
    """An index made on 9.2+ without index.mapping.exclude_source_vectors=false keeps vectors
    out of _source; the adapter asks for them back (sparse weights then have 9 bits)."""
    cluster = make_cluster("basic", version="9.2.0")
    _existing(cluster)
    assert cluster.indices["docs"].exclude_vectors
    store = ElasticsearchStore(cluster.client(), "docs")
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    fill(store, reference)
    ids, embeddings, _, _ = synthetic_corpus()
    record = store.get([ids[4]], with_vectors=True)[0]
    np.testing.assert_allclose(record.embedding.dense, embeddings.dense[4], atol=1e-6)
    for token, weight in embeddings.sparse[4].items():
        assert math.isclose(record.embedding.sparse[token], weight, rel_tol=4e-3)
    query = synthetic_queries(embeddings)[0]
    params = SearchParams(mode="hybrid", fusion="weighted", k=5)
    expected = reference.search(query, params)
    assert_same_hits(store.search(query, params), expected, expected, 2e-3)


def test_too_old_a_server_is_refused(make_cluster):
    with pytest.raises(StoreError, match="too old"):
        ElasticsearchStore(make_cluster(version="8.17.0").client(), "docs")


# --- writing ------------------------------------------------------------------------------------


def test_refused_documents_are_named_with_the_reason(make_cluster):
    cluster = make_cluster()
    store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)
    store.add(["a"], synthetic_embeddings(1, seed=1), metadatas=[{"year": 2020, "flag": True}])
    batch = synthetic_embeddings(4, seed=2)
    metadatas = [{"year": 2021}, {"year": "last year"}, {"flag": 3}, {"year": 1999}]
    with pytest.raises(BulkWriteError) as caught:
        store.add(["b", "c", 7, "d"], batch, metadatas=metadatas)
    assert set(caught.value.failed) == {"c", 7}
    assert "mapper_parsing_exception" in caught.value.failed["c"]
    assert "metadata.year" in str(caught.value) and "metadata.flag" in str(caught.value)
    assert "2 of 4" in str(caught.value)
    # The add is undone as a whole (issue 15): the documents the node took are removed again.
    assert store.count() == 1 and store.get(["b", "c", 7, "d"]) == []
    assert "none of it is kept" in str(caught.value)


def test_non_unit_dense_vectors_are_refused_before_writing(make_cluster):
    cluster = make_cluster()
    store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)
    batch = synthetic_embeddings(2, seed=3)
    batch.dense[1] *= 1.5
    with pytest.raises(StoreError, match="unit-length"):
        store.add(["a", "b"], batch)
    assert not any(r["path"] == "/_bulk" for r in cluster.requests)
    fill(store)
    query = synthetic_queries(synthetic_corpus()[1])[0]
    query.dense = query.dense * 2
    with pytest.raises(StoreError, match="unit-length query"):
        store.search(query, mode="dense")
    assert store.search(query, mode="sparse")  # no kNN, no need for a unit vector


def test_ids_keep_their_type_and_long_ids_are_hashed(make_cluster):
    cluster = make_cluster()
    store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)
    long_id = "x" * 600
    store.add(
        ["1", 1, long_id, -5], synthetic_embeddings(4, seed=4), texts=["s", "i", "long", "neg"]
    )
    assert [(type(r.id), r.id, r.text) for r in store.get([1, long_id, "1", -5])] == [
        (int, 1, "i"),
        (str, long_id, "long"),
        (str, "1", "s"),
        (int, -5, "neg"),
    ]
    hits = store.search(synthetic_embeddings(4, seed=4)[2], mode="dense", k=1)
    assert hits[0].id == long_id
    keys = {
        line["index"]["_id"]
        for r in cluster.requests
        if r["path"] == "/_bulk"
        for line in r["body"][::2]
    }
    assert keys >= {"s:1", "i:1", "i:-5"} and all(len(k.encode()) <= 512 for k in keys)


# --- filters ------------------------------------------------------------------------------------


def test_filters_with_quotes_and_unicode(make_cluster):
    cluster = make_cluster()
    store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    values = ["it's", 'say "hi"', "back\\slash", "한국어", "emoji 🙂", "new\nline", '{"json": 1}']
    embeddings = synthetic_embeddings(len(values), seed=8)
    ids = [f"doc-{i}" for i in range(len(values))]
    metadatas = [{"label": v, "tags": [v, "common"]} for v in values]
    for target in (store, reference):
        target.add(ids, embeddings, texts=values, metadatas=metadatas)
    query = embeddings[3]
    for value in values:
        for spec in (
            {"label": value},
            Field("tags").isin([value, "nothing"]),
            ~(Field("label") == value),
        ):
            assert store.count(filter=spec) == reference.count(filter=spec)
            params = SearchParams(mode="dense", k=10, filter=spec)
            expected = reference.search(query, params)
            assert_same_hits(store.search(query, params), expected, expected, SCORE_TOL)
    sent = [b["knn"]["filter"][0] for b in searches(cluster) if "knn" in b]
    assert {"term": {"metadata.label": "한국어"}} in sent and {
        "term": {"metadata.label": 'say "hi"'}
    } in sent


def test_filter_values_only_match_fields_of_their_kind(make_cluster):
    cluster = make_cluster()
    store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    metadatas = [
        {"n": 1, "s": "1", "b": True, "f": 1.5},
        {"n": 2.0, "s": "true", "b": False},
        {"obj": {"x": 1}},
    ]
    for target in (store, reference):
        target.add(["a", "b", "c"], synthetic_embeddings(3, seed=9), metadatas=metadatas)
    specs = [
        {"n": 1.0},
        {"n": "1"},
        {"s": 1},
        {"s": True},
        {"b": 1},
        {"b": "true"},
        {"n": True},
        Field("s") > 0,
        Field("b") >= 0,
        Field("n").isin([1, "2", True, 2]),
        {"obj": 1},
        ~(Field("s") > 0),
        {"f": 1.5},
        {"never": "mapped"},
        ~Field("never").isin(["x"]),
    ]
    for spec in specs:
        assert store.count(filter=spec) == reference.count(filter=spec), spec


def test_raw_filters_pass_through(make_cluster):
    cluster = make_cluster()
    store = ElasticsearchStore(cluster.client(), "docs", fingerprint=FINGERPRINT)
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    fill(store, reference)
    raw = RawFilter({"terms": {"metadata.lang": ["ko", "en"]}})
    assert store.count(filter=raw) == reference.count(filter=Field("lang").isin(["ko", "en"]))
    hits = store.search(
        synthetic_queries(synthetic_corpus()[1])[0], mode="sparse", k=50, filter=raw
    )
    assert hits and all(h.metadata["lang"] in ("ko", "en") for h in hits)
    with pytest.raises(StoreError):
        store.search(synthetic_queries(synthetic_corpus()[1])[0], filter=RawFilter("lang == 'ko'"))


# --- credentials --------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55"
API_KEY = "QUtJRFNFQ1JFVEtFWQ=="


@pytest.mark.parametrize(
    "auth",
    [
        {"basic_auth": ("elastic", SECRET)},
        {"api_key": API_KEY},
        {"hosts": f"http://elastic:{SECRET}@es.test:9200"},
    ],
)
def test_credentials_are_never_logged(make_cluster, caplog, auth):
    cluster = make_cluster("trial")
    cluster.licence_readable = False  # a warning is logged while connecting
    _existing(cluster, name="foreign", _meta=None)
    client = cluster.client(**auth)
    first = len(cluster.requests)
    caplog.set_level(logging.DEBUG)
    texts = []
    store = ElasticsearchStore(client, "docs", fingerprint=FINGERPRINT)
    texts.append(repr(store))
    fill(store)
    with pytest.raises(BulkWriteError) as bulk_error:
        store.add(["x"], synthetic_embeddings(1, seed=1), metadatas=[{"year": "not a year"}])
    with pytest.raises(StoreError) as attach_error:
        ElasticsearchStore(client, "foreign", fingerprint=FINGERPRINT)
    cluster.licence = "basic"
    store._enterprise = True  # as if the licence was lost mid-session: a 403 and a warning
    store.search(synthetic_queries(synthetic_corpus()[1])[0], mode="hybrid", k=3)
    texts += [caplog.text, str(bulk_error.value), str(attach_error.value), repr(attach_error.value)]
    secrets = [SECRET, API_KEY, base64.b64encode(f"elastic:{SECRET}".encode()).decode()]
    assert "refused an Enterprise feature" in caplog.text
    for text in texts:
        for secret in secrets:
            assert secret not in text
    assert all("authorization" in r["headers"] for r in cluster.requests[first:])  # auth was sent


# --- the async store ----------------------------------------------------------------------------


@pytest.mark.parametrize("licence", ["basic", "trial"])
async def test_async_store_gives_the_same_answers(make_cluster, licence):
    cluster = make_cluster(licence)
    client = cluster.async_client()
    store = AsyncElasticsearchStore(client, "docs", fingerprint=FINGERPRINT)
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    ids, embeddings, texts, metadatas = synthetic_corpus()
    await store.add(ids, embeddings, texts, metadatas)
    reference.add(ids, embeddings, texts, metadatas)
    assert await store.count() == 48 and await store.count(
        filter={"lang": "ko"}
    ) == reference.count(filter={"lang": "ko"})
    for query in synthetic_queries(embeddings)[:2]:
        for case in SEARCH_CASES.values():
            params = SearchParams(k=5, **case)
            expected = reference.search(query, params)
            extended = (
                reference.search(query, params.with_overrides(k=15))
                if len(params.legs) == 1 and params.rerank is None
                else expected
            )
            assert_same_hits(await store.search(query, params), expected, extended, SCORE_TOL)
    records = await store.get(["1", 1], with_vectors=True)
    assert [(type(r.id), r.id) for r in records] == [(str, "1"), (int, 1)]
    np.testing.assert_allclose(records[1].embedding.colbert, embeddings.colbert[3], atol=1e-6)
    await store.delete(["1"], filter={"lang": "ko"})
    reference.delete(["1"], filter={"lang": "ko"})
    assert await store.count() == reference.count()
    assert (await AsyncElasticsearchStore(client, "docs").open()).fingerprint == FINGERPRINT
    with pytest.raises(FingerprintMismatchError):
        await AsyncElasticsearchStore(client, "docs", fingerprint=OTHER_FINGERPRINT).count()
    assert store.effective_licence == ("enterprise" if licence == "trial" else "basic")
    listed = [r async for r in store.iter_records(batch_size=7, with_vectors=True)]
    assert sorted(repr(r.id) for r in listed) == sorted(
        repr(r.id) for r in reference.iter_records()
    )
    by_key = {(type(r.id), r.id): r for r in reference.get(ids, with_vectors=True)}
    for record in listed:
        want = by_key[(type(record.id), record.id)].embedding
        np.testing.assert_allclose(record.embedding.dense, want.dense, atol=1e-6)
    subset = ["1", 1, "doc-2", "doc-4", "no-such-id"]
    query = synthetic_queries(embeddings)[0]
    got = await store.search_within(subset, query, mode="hybrid", rerank="all", k=3)
    want_hits = reference.search_within(subset, query, mode="hybrid", rerank="all", k=3)
    assert [h.id for h in got] == [h.id for h in want_hits]
    await store.clear()
    assert await store.count() == 0
    await client.close()


def test_clients_of_the_wrong_kind_are_refused(make_cluster):
    cluster = make_cluster()
    with pytest.raises(StoreError, match="AsyncElasticsearchStore"):
        ElasticsearchStore(cluster.async_client(), "docs")  # type: ignore[arg-type]
    with pytest.raises(StoreError, match="use ElasticsearchStore"):
        AsyncElasticsearchStore(cluster.client(), "docs")  # type: ignore[arg-type]


# --- extras -------------------------------------------------------------------------------------


def test_texts_in_texts_out_with_the_encoder(make_cluster, m3_encoder):
    cluster = make_cluster("trial")
    store = ElasticsearchStore(cluster.client(), "docs", m3_encoder)
    texts = ["dense vectors in one pass", "sparse lexical weights", "late interaction with ColBERT"]
    ids = store.add_texts(texts, metadatas=[{"n": i} for i in range(3)])
    assert store.fingerprint == m3_encoder.fingerprint
    hits = store.search("lexical weights", mode="hybrid", rerank="all", k=3)
    assert {h.id for h in hits} == set(ids) and all(
        set(h.scores) == {"dense", "sparse", "colbert"} for h in hits
    )
    reopened = ElasticsearchStore(cluster.client(), "docs")
    assert reopened.fingerprint == m3_encoder.fingerprint


def test_bm25_search_over_the_text_field(make_cluster):
    store = ElasticsearchStore(make_cluster().client(), "docs", fingerprint=FINGERPRINT)
    fill(store)
    hits = store.search_text("passage", k=3, filter={"lang": "de"})
    assert len(hits) == 3 and all("passage" in h.text and h.metadata["lang"] == "de" for h in hits)
    assert set(hits[0].scores) == {"bm25"}


def test_score_conversions():
    q = es_store._Query.of(M3Embedding(colbert=np.eye(3, dtype=np.float32)))
    assert q.colbert_mean(q.colbert_offset + 1.5) == pytest.approx(0.5)  # a sum of 1.5 over 3 rows
    assert es_store._dense_from_knn(0.75) == pytest.approx(0.5)  # (1 + dot) / 2


# --- a real cluster -----------------------------------------------------------------------------

ES_URL = os.environ.get("ES_URL")


@pytest.mark.live
@pytest.mark.skipif(
    not ES_URL, reason="set ES_URL (and ES_API_KEY or user:password@ in it) for live tests"
)
class TestElasticsearchLiveContract(StoreContract):
    """The contract against a real cluster (see docs/elasticsearch.md for a docker one).
    Scores within 1e-4: Elasticsearch's float32 arithmetic, in another summation order."""

    score_tol = LIVE_SCORE_TOL
    licence = "auto"

    @pytest.fixture
    def store_factory(self):
        from elasticsearch import Elasticsearch

        options = {"api_key": os.environ["ES_API_KEY"]} if os.environ.get("ES_API_KEY") else {}
        if os.environ.get("ES_VERIFY_CERTS") == "0":
            options["verify_certs"] = False
        client = Elasticsearch(ES_URL, request_timeout=60, **options)
        prefix = f"m3connect-test-{uuid.uuid4().hex[:8]}"
        made: set[str] = set()

        def make(fingerprint, name="contract", **opts):
            made.add(f"{prefix}-{name}")
            return ElasticsearchStore(
                client, f"{prefix}-{name}", fingerprint=fingerprint, licence=self.licence, **opts
            )

        yield make
        for index in made:
            client.indices.delete(index=index, ignore_unavailable=True)
        client.close()


@pytest.mark.live
@pytest.mark.skipif(not ES_URL, reason="set ES_URL for live tests")
class TestElasticsearchLiveBasicContract(TestElasticsearchLiveContract):
    """The basic-licence code path on the same cluster, whatever its licence."""

    licence = "basic"
