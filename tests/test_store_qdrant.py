"""The Qdrant stores against the reference, on real engines: qdrant-client's local mode (sync
and async) and qdrant-edge (the Qdrant engine in-process). No mocks."""

from __future__ import annotations

import asyncio
import itertools
import math
import uuid
import warnings
from collections import Counter
from typing import Any

import numpy as np
import pytest
from store_contract import (
    COLBERT_DIM,
    DENSE_DIM,
    FINGERPRINT,
    OTHER_FINGERPRINT,
    SEARCH_CASES,
    StoreContract,
    failing_calls,
    synthetic_corpus,
    synthetic_embeddings,
    synthetic_queries,
)

from m3connect import fusion
from m3connect.filters import Field, RawFilter
from m3connect.fingerprint import FingerprintMismatchError, ModelFingerprint
from m3connect.scoring import colbert_scores
from m3connect.store import M3Store, SearchParams, StoreError
from m3connect.stores.memory import InMemoryStore
from m3connect.types import M3Embedding, M3Output

qdrant_client = pytest.importorskip("qdrant_client")
from qdrant_client import AsyncQdrantClient, QdrantClient, models  # noqa: E402

from m3connect.stores.qdrant import (  # noqa: E402
    RESERVED_POINT_ID,
    AsyncQdrantStore,
    QdrantEdgeStore,
    QdrantStore,
    _ClientDialect,
    _QdrantBase,
    metadata_path,
    point_id,
    translate_filter,
)

try:
    import qdrant_edge
except ImportError:  # pragma: no cover - the extra is optional
    qdrant_edge = None

needs_edge = pytest.mark.skipif(qdrant_edge is None, reason="qdrant-edge-py is not installed")


# --- the shared contract on each engine ------------------------------------------------------


class TestQdrantContract(StoreContract):
    """Local mode: one client, a new store handle per ``make`` call (``name=`` reopens a
    collection). In-memory for speed; ``test_local_mode_persists_and_reopens`` covers
    ``path=`` (a local path opens once per process: keep one client per path)."""

    small_batch_options = {"batch_size": 3}

    def failing_write(self, store, step):
        return failing_calls(
            store, "client", {"upsert", "delete"}, step, lambda: RuntimeError("injected")
        )

    @pytest.fixture
    def store_factory(self):
        client = QdrantClient(":memory:")
        names = itertools.count()

        def make(fingerprint, name=None, **options):
            name = name or f"c{next(names)}"
            return QdrantStore(client, name, fingerprint=fingerprint, exact=True, **options)

        yield make
        client.close()


@needs_edge
class TestQdrantEdgeContract(StoreContract):
    """The real engine, in-process; float16 ColBERT storage is really half precision here."""

    small_batch_options = {"batch_size": 3}

    def failing_write(self, store, step):
        return failing_calls(store, "shard", {"update"}, step, lambda: RuntimeError("injected"))

    @pytest.fixture
    def store_factory(self, tmp_path):
        shards: dict[str, Any] = {}
        names = itertools.count()
        stores: list[QdrantEdgeStore] = []

        def make(fingerprint, name=None, **options):
            name = name or f"s{next(names)}"
            store = QdrantEdgeStore(
                tmp_path / name,
                fingerprint=fingerprint,
                shard=shards.get(name),
                exact=True,
                **options,
            )
            if name not in shards and store.shard is not None:
                shards[name] = store.shard
                stores.append(store)
            return store

        yield make
        for store in stores:
            store.close()


class _SyncFacade(M3Store):
    """Runs an :class:`AsyncQdrantStore` on its own event loop so that the whole shared suite
    exercises the async code path (every call goes through the async store's methods)."""

    def __init__(self, store: AsyncQdrantStore, loop: asyncio.AbstractEventLoop) -> None:
        self.store, self.loop = store, loop

    def _run(self, coro):  # type: ignore[no-untyped-def]
        return self.loop.run_until_complete(coro)

    def add(self, ids, embeddings, texts=None, metadatas=None):  # type: ignore[no-untyped-def]
        self._run(self.store.add(ids, embeddings, texts, metadatas))

    def get(self, ids, *, with_vectors=False):  # type: ignore[no-untyped-def]
        return self._run(self.store.get(ids, with_vectors=with_vectors))

    def delete(self, ids=None, *, filter=None):  # type: ignore[no-untyped-def]
        self._run(self.store.delete(ids, filter=filter))

    def count(self, *, filter=None):  # type: ignore[no-untyped-def]
        return self._run(self.store.count(filter=filter))

    def search(self, query, params=None, **overrides):  # type: ignore[no-untyped-def]
        return self._run(self.store.search(query, params, **overrides))

    def clear(self):  # type: ignore[no-untyped-def]
        self._run(self.store.clear())

    def iter_records(self, *, filter=None, with_vectors=False, batch_size=256):  # type: ignore[no-untyped-def]
        async def collect():  # type: ignore[no-untyped-def]
            records = self.store.iter_records(
                filter=filter, with_vectors=with_vectors, batch_size=batch_size
            )
            return [r async for r in records]

        return iter(self._run(collect()))

    def search_within(self, ids, query, params=None, **overrides):  # type: ignore[no-untyped-def]
        return self._run(self.store.search_within(ids, query, params, **overrides))

    def _search(self, query, params):  # type: ignore[no-untyped-def]
        raise AssertionError("the facade searches through the async store")


class TestAsyncQdrantContract(StoreContract):
    small_batch_options = {"batch_size": 3}

    def failing_write(self, store, step):
        return failing_calls(
            store.store, "client", {"upsert", "delete"}, step, lambda: RuntimeError("injected")
        )

    @pytest.fixture
    def store_factory(self):
        loop = asyncio.new_event_loop()
        client = AsyncQdrantClient(":memory:")
        names = itertools.count()

        def make(fingerprint, name=None, **options):
            store = loop.run_until_complete(
                AsyncQdrantStore.open(
                    client, name or f"c{next(names)}", fingerprint=fingerprint, **options
                )
            )
            return _SyncFacade(store, loop)

        yield make
        loop.run_until_complete(client.close())
        loop.close()


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def client():
    c = QdrantClient(":memory:")
    yield c
    c.close()


@pytest.fixture
def corpus():
    return synthetic_corpus()


def filled_pair(store, corpus) -> InMemoryStore:
    ids, embeddings, texts, metadatas = corpus
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    for target in (store, reference):
        target.add(ids, embeddings, texts, metadatas)
    return reference


def same_hits(actual, expected, tol=1e-5) -> None:
    assert [h.id for h in actual] == [h.id for h in expected]
    for a, e in zip(actual, expected, strict=True):
        assert math.isclose(a.score, e.score, abs_tol=tol)
        assert a.scores.keys() == e.scores.keys()
        assert all(math.isclose(a.scores[p], e.scores[p], abs_tol=tol) for p in e.scores)


class CountingClient:
    """A real client that counts the calls made through it."""

    def __init__(self, inner: QdrantClient) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return call


# --- async, natively ---------------------------------------------------------------------------


async def test_async_store_answers_like_the_reference(corpus):
    client = AsyncQdrantClient(":memory:")
    store = await AsyncQdrantStore.open(client, "async", fingerprint=FINGERPRINT)
    ids, embeddings, texts, metadatas = corpus
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    reference.add(ids, embeddings, texts, metadatas)
    await store.add(ids, embeddings, texts, metadatas)
    assert await store.count() == len(ids)
    assert await store.count(filter={"lang": "ko"}) == reference.count(filter={"lang": "ko"})
    for query in synthetic_queries(embeddings)[:3]:
        for case in ("hybrid-rrf", "hybrid-weighted", "hybrid-rerank-all", "colbert"):
            params = SearchParams(k=5, **SEARCH_CASES[case])
            same_hits(await store.search(query, params), reference.search(query, params))
    await store.delete(["doc-2"], filter={"lang": "ko"})
    assert await store.get(["doc-2"]) == []
    assert await store.count(filter={"lang": "ko"}) == 0
    await store.close()
    await client.close()


async def test_async_open_refuses_another_fingerprint():
    client = AsyncQdrantClient(":memory:")
    store = await AsyncQdrantStore.open(client, "fp", fingerprint=FINGERPRINT)
    await store.add(["a"], synthetic_embeddings(1, seed=1), ["a"])
    with pytest.raises(FingerprintMismatchError):
        await AsyncQdrantStore.open(client, "fp", fingerprint=OTHER_FINGERPRINT)
    lazy = AsyncQdrantStore(client, "fp", fingerprint=OTHER_FINGERPRINT)
    with pytest.raises(FingerprintMismatchError):
        await lazy.count()
    await client.close()


# --- one request per search, every mode computed in the engine ---------------------------------


@pytest.mark.parametrize("case", list(SEARCH_CASES))
def test_local_mode_search_is_one_query_points_call(client, corpus, case):
    counting = CountingClient(client)
    store = QdrantStore(counting, "one-call", fingerprint=FINGERPRINT)  # type: ignore[arg-type]
    reference = filled_pair(store, corpus)
    query = synthetic_queries(corpus[1])[0]
    params = SearchParams(k=5, filter={"lang": {"$ne": "de"}}, **SEARCH_CASES[case])
    counting.calls.clear()
    same_hits(store.search(query, params), reference.search(query, params))
    assert counting.calls == {"query_points": 1}


class ByIdQdrantStore(QdrantStore):
    """What a server does: the hits' part scores come from one by-id batch (local mode itself
    fetches vectors instead, since it scores every point for any request)."""

    def _score_by_id(self, part: str) -> bool:
        return _QdrantBase._score_by_id(self, part)


@pytest.mark.parametrize(
    "case",
    [
        "hybrid-rrf",
        "hybrid-three-legs-rrf",
        "hybrid-rerank-all",
        "dense-few-candidates-rerank-colbert",
    ],
)
def test_server_path_scores_the_hits_by_id_in_one_batch(client, corpus, case):
    counting = CountingClient(client)
    store = ByIdQdrantStore(counting, "by-id", fingerprint=FINGERPRINT)  # type: ignore[arg-type]
    reference = filled_pair(store, corpus)
    query = synthetic_queries(corpus[1])[2]
    params = SearchParams(k=5, filter={"lang": {"$ne": "ko"}}, **SEARCH_CASES[case])
    counting.calls.clear()
    same_hits(store.search(query, params), reference.search(query, params))
    assert counting.calls == {"query_points": 1, "query_batch_points": 1}


def test_fractional_rrf_k_uses_weighted_rrf_in_the_engine(client, corpus):
    store = QdrantStore(client, "rrf", fingerprint=FINGERPRINT)
    reference = filled_pair(store, corpus)
    for query in synthetic_queries(corpus[1])[:3]:
        for rrf_k in (0, 10.5, 0.25):
            params = SearchParams(mode="hybrid", k=8, rrf_k=rrf_k)
            same_hits(store.search(query, params), reference.search(query, params))


def test_empty_sparse_query_is_a_leg_that_finds_nothing(client, corpus):
    store = QdrantStore(client, "empty-sparse", fingerprint=FINGERPRINT)
    reference = filled_pair(store, corpus)
    base = synthetic_queries(corpus[1])[1]
    query = M3Embedding(base.dense, {7: 0.0}, base.colbert)
    assert store.search(query, mode="sparse") == []
    for case in ("hybrid-rrf", "hybrid-dbsf", "hybrid-weighted", "hybrid-rerank-all"):
        params = SearchParams(k=5, **SEARCH_CASES[case])
        same_hits(store.search(query, params), reference.search(query, params))


# --- score conversion -------------------------------------------------------------------------


def test_maxsim_sum_over_query_rows_is_the_mean_times_rows(client, corpus):
    """Qdrant's MAX_SIM sums over query vectors; the core's ColBERT score is the mean."""
    ids, embeddings, _, _ = corpus
    store = QdrantStore(client, "maxsim", fingerprint=FINGERPRINT)
    store.add(ids, embeddings)
    query = synthetic_queries(embeddings)[2].colbert
    raw = client.query_points("maxsim", query=query.tolist(), using="colbert", limit=len(ids))
    core = colbert_scores(query, embeddings.colbert)
    by_point = {point_id(doc_id): core[i] for i, doc_id in enumerate(ids)}
    assert len(raw.points) == len(ids)
    for point in raw.points:
        assert math.isclose(point.score, len(query) * by_point[point.id], abs_tol=1e-5)
        assert math.isclose(point.score / len(query), by_point[point.id], abs_tol=1e-6)
    hits = store.search(M3Embedding(colbert=query), mode="colbert", k=len(ids))
    assert all(math.isclose(h.score, by_point[point_id(h.id)], abs_tol=1e-6) for h in hits)


def test_qdrant_rrf_k_is_the_contract_k_plus_one(client, corpus):
    ids, embeddings, _, _ = corpus
    store = QdrantStore(client, "rrf-raw", fingerprint=FINGERPRINT)
    store.add(ids, embeddings)
    query = synthetic_queries(embeddings)[0]
    sparse = models.SparseVector(indices=list(query.sparse), values=list(query.sparse.values()))
    legs = [
        models.Prefetch(query=query.dense.tolist(), using="dense", limit=20),
        models.Prefetch(query=sparse, using="sparse", limit=20),
    ]
    rankings = [
        [
            p.id
            for p in client.query_points(
                "rrf-raw", query=leg.query, using=leg.using, limit=20
            ).points
        ]
        for leg in legs
    ]
    raw = client.query_points(
        "rrf-raw", prefetch=legs, query=models.RrfQuery(rrf=models.Rrf(k=61)), limit=30
    )
    expected = dict(fusion.rrf(rankings, k=60))
    assert len(raw.points) == len(expected)
    assert all(math.isclose(p.score, expected[p.id], rel_tol=1e-6) for p in raw.points)


@needs_edge
def test_half_precision_maxsim_is_rescored_exactly(tmp_path, corpus):
    """The engine rounds the query to float16 for float16 storage; the store re-scores the hits
    exactly, so its answers are the reference's."""
    ids, embeddings, texts, metadatas = corpus
    store = QdrantEdgeStore(tmp_path / "half", fingerprint=FINGERPRINT, colbert_dtype="float16")
    reference = InMemoryStore(fingerprint=FINGERPRINT, colbert_dtype="float16")
    for target in (store, reference):
        target.add(ids, embeddings, texts, metadatas)
    query = synthetic_queries(embeddings)[0]
    request = qdrant_edge.QueryRequest(
        limit=len(ids),
        query=qdrant_edge.Query.Nearest(query.colbert.tolist(), using="colbert"),
        with_payload=True,
    )
    stored = {r.id: r.embedding.colbert for r in store.get(ids, with_vectors=True)}
    rounded = query.colbert.astype(np.float16).astype(np.float32)
    for point in store.shard.query(request):
        doc_id = (
            point.payload["doc_id"]
            if point.payload["doc_id_type"] == "str"
            else int(point.payload["doc_id"])
        )
        n = len(query.colbert)
        assert math.isclose(
            point.score / n, colbert_scores(rounded, [stored[doc_id]])[0], abs_tol=1e-6
        )
    for case in ("colbert", "hybrid-rerank-colbert", "hybrid-rerank-all"):
        params = SearchParams(k=5, **SEARCH_CASES[case])
        same_hits(store.search(query, params), reference.search(query, params))
    params = SearchParams(k=5, fusion="weighted", hybrid_legs=("dense", "colbert"))
    same_hits(store.search(query, params), reference.search(query, params))
    store.close()


# --- ids and payload --------------------------------------------------------------------------


def test_ids_round_trip_exactly(client):
    store = QdrantStore(client, "ids", fingerprint=FINGERPRINT)
    ids = ["1", 1, 0, -5, 2**63 - 1, -(2**63), "ünï cødé 🙂", "0", " spaced ", "a" * 300]
    store.add(ids, synthetic_embeddings(len(ids), seed=3), [f"t{i}" for i in range(len(ids))])
    got = store.get(list(reversed(ids)) + ["missing", 2, 1.5, None, True])
    assert [(type(r.id), r.id) for r in got] == [(type(i), i) for i in reversed(ids)]
    assert [r.text for r in got] == [f"t{i}" for i in reversed(range(len(ids)))]
    hits = store.search(synthetic_embeddings(1, seed=3)[0], mode="dense", k=len(ids))
    assert {(type(h.id), h.id) for h in hits} == {(type(i), i) for i in ids}
    # Point ids are deterministic uuid5s of the typed id.
    assert point_id("1") != point_id(1)
    assert point_id(1) == point_id(1) and uuid.UUID(point_id("x")).version == 5
    assert {p.id for p in client.scroll("ids", limit=100)[0]} == {point_id(i) for i in ids}


def test_metadata_may_hold_any_key_and_payload_layout(client):
    store = QdrantStore(client, "payload", fingerprint=FINGERPRINT)
    meta = {
        "id": "mine",
        "text": "meta text",
        "metadata": {"nested": [1, 2]},
        "doc_id": 7,
        "a.b": 1,
    }
    store.add(["x"], synthetic_embeddings(1, seed=2), ["the text"], [meta])
    record = store.get(["x"])[0]
    assert record.id == "x" and record.text == "the text" and record.metadata == meta
    payload = client.retrieve("payload", [point_id("x")], with_payload=True)[0].payload
    assert payload == {"doc_id": "x", "doc_id_type": "str", "text": "the text", "metadata": meta}
    assert store.count(filter={"id": "mine"}) == 1 and store.count(filter={"a.b": 1}) == 1


def test_upsert_replaces_every_field_including_vectors(client):
    store = QdrantStore(client, "upsert", fingerprint=FINGERPRINT)
    first = synthetic_embeddings(2, seed=1)
    store.add(["a", "b"], first, ["one", "two"], [{"lang": "en", "old": True}, None])
    second = synthetic_embeddings(2, seed=2, empty_sparse=(0,))
    store.add(["a"], second[[0]], None, [{"lang": "ko"}])
    record = store.get(["a"], with_vectors=True)[0]
    assert record.text is None and record.metadata == {"lang": "ko"}
    assert record.embedding.sparse == {}  # the old sparse vector is gone
    np.testing.assert_allclose(record.embedding.dense, second.dense[0])
    np.testing.assert_allclose(record.embedding.colbert, second.colbert[0])
    assert store.count() == 2 and store.count(filter={"old": True}) == 0


def test_bad_input_writes_nothing_even_across_write_batches(client):
    store = QdrantStore(client, "bad", fingerprint=FINGERPRINT, batch_size=2)
    good = synthetic_embeddings(5, seed=4)
    store.add(["keep"], good[[0]], ["kept"])
    not_json = [None, None, None, None, {"when": object()}]
    with pytest.raises(StoreError, match="JSON"):
        store.add([f"n{i}" for i in range(5)], good, metadatas=not_json)
    with pytest.raises(StoreError, match="finite"):
        store.add([f"n{i}" for i in range(5)], good, metadatas=[None] * 4 + [{"x": float("nan")}])
    big_token = M3Output(good.dense, good.sparse[:4] + [{2**40: 0.5}], good.colbert)
    with pytest.raises(StoreError, match="token ids"):
        store.add([f"n{i}" for i in range(5)], big_token)
    assert store.count() == 1 and store.get(["n0"]) == []


def test_write_requests_are_split_by_count_and_size(client):
    counting = CountingClient(client)
    embeddings = synthetic_embeddings(20, seed=5)
    for options, requests in (({"batch_size": 3}, 7), ({"batch_max_floats": 1}, 20)):
        store = QdrantStore(counting, f"split{requests}", fingerprint=FINGERPRINT, **options)  # type: ignore[arg-type]
        counting.calls.clear()
        store.add([f"d{i}" for i in range(20)], embeddings)
        assert counting.calls["upsert"] == requests
        assert store.count() == 20


# --- filters ----------------------------------------------------------------------------------

ODD_METADATA = [
    {"a.b": "x", "with space": 'it\'s "quoted"', "한국어": "값", "n": 1, "tags": ["x", 1, True]},
    {"a.b": "y", "with space": "back\\slash", "한국어": "🙂", "n": 1.0, "tags": []},
    {"n": True, "with space": "ünïcødé", "tags": [2.5, "y"]},
    {"n": 2.5, "a.b": "", "flag": False},
    {"n": "1", "flag": 0},
    {},
]

ODD_FILTERS = [
    {"a.b": "x"},
    {"with space": 'it\'s "quoted"'},
    {"with space": "back\\slash"},
    {"with space": "ünïcødé"},
    {"한국어": "🙂"},
    {"n": 1},
    {"n": 1.0},
    {"n": True},
    {"n": "1"},
    {"n": 2.5},
    {"n": {"$in": [1, True]}},
    {"n": {"$in": ["1", 2.5]}},
    {"n": {"$ne": 1}},
    {"n": {"$gte": 1}},
    {"tags": 1},
    {"tags": True},
    {"tags": 2.5},
    {"tags": {"$nin": ["x"]}},
    {"flag": False},
    {"flag": 0},
    {"a.b": ""},
    {"$not": {"a.b": {"$in": ["x", "y"]}}},
    {"$or": [{"n": True}, {"한국어": "값"}]},
]


@pytest.fixture(params=["local", "edge"])
def odd_store(request, tmp_path):
    if request.param == "edge":
        if qdrant_edge is None:
            pytest.skip("qdrant-edge-py is not installed")
        store: M3Store = QdrantEdgeStore(tmp_path / "odd", fingerprint=FINGERPRINT)
    else:
        store = QdrantStore(
            QdrantClient(":memory:"), "odd", fingerprint=FINGERPRINT, close_client=True
        )
    embeddings = synthetic_embeddings(len(ODD_METADATA), seed=9)
    store.add(list(range(len(ODD_METADATA))), embeddings, None, ODD_METADATA)
    yield store
    store.close()


@pytest.mark.parametrize("spec", ODD_FILTERS, ids=[str(f) for f in ODD_FILTERS])
def test_filter_translation_follows_the_reference(odd_store, spec):
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    reference.add(
        list(range(len(ODD_METADATA))),
        synthetic_embeddings(len(ODD_METADATA), seed=9),
        None,
        ODD_METADATA,
    )
    assert odd_store.count(filter=spec) == reference.count(filter=spec)
    query = synthetic_embeddings(1, seed=10)[0]
    got = {h.id for h in odd_store.search(query, mode="dense", k=10, filter=spec)}
    assert got == {h.id for h in reference.search(query, mode="dense", k=10, filter=spec)}


def test_filter_translation_shapes():
    d = _ClientDialect()
    assert metadata_path("lang") == "metadata.lang"
    assert metadata_path("a.b") == 'metadata."a.b"'
    assert metadata_path("한국어_키-1") == "metadata.한국어_키-1"
    with pytest.raises(StoreError, match="double quote"):
        metadata_path('say "hi"')
    eq_float = translate_filter(Field("r") == 2.5, d)
    assert eq_float.range.gte == eq_float.range.lte == 2.5 and eq_float.match is None
    eq_bool = translate_filter(Field("b") == True, d)  # noqa: E712
    assert eq_bool.match.value is True and eq_bool.range is None
    eq_big = translate_filter(Field("i") == 2**60, d)
    assert eq_big.match.value == 2**60
    negated = translate_filter(~(Field("y") >= 2000), d)
    assert negated.must_not[0].range.gte == 2000
    assert translate_filter(Field("s") == 'x "y" \\ 🙂', d).match.value == 'x "y" \\ 🙂'


def test_raw_filters_pass_through(client, corpus):
    store = QdrantStore(client, "raw", fingerprint=FINGERPRINT)
    reference = filled_pair(store, corpus)
    raw = RawFilter(
        models.Filter(
            must=[models.FieldCondition(key="metadata.lang", match=models.MatchValue(value="ko"))]
        )
    )
    assert store.count(filter=raw) == reference.count(filter={"lang": "ko"})
    query = synthetic_queries(corpus[1])[0]
    same_hits(
        store.search(query, mode="hybrid", k=5, filter=raw),
        reference.search(query, mode="hybrid", k=5, filter={"lang": "ko"}),
    )
    with pytest.raises(StoreError, match="raw filter"):
        store.search(query, filter=RawFilter("lang == 'ko'"))


# --- collections: create, attach, refuse ------------------------------------------------------


def make_collection(
    client,
    name,
    *,
    dense=("d", DENSE_DIM, models.Distance.DOT),
    colbert=("c", COLBERT_DIM),
    sparse="s",
    comparator=True,
    idf=False,
):
    vectors = {}
    if dense:
        vectors[dense[0]] = models.VectorParams(size=dense[1], distance=dense[2])
    if colbert:
        vectors[colbert[0]] = models.VectorParams(
            size=colbert[1],
            distance=models.Distance.DOT,
            multivector_config=models.MultiVectorConfig(
                comparator=models.MultiVectorComparator.MAX_SIM
            )
            if comparator
            else None,
        )
    client.create_collection(
        name,
        vectors_config=vectors,
        sparse_vectors_config={
            sparse: models.SparseVectorParams(modifier=models.Modifier.IDF if idf else None)
        }
        if sparse
        else None,
    )


def test_attach_to_an_existing_collection_with_custom_names(client, corpus):
    make_collection(client, "mine")
    names = {"dense_name": "d", "sparse_name": "s", "colbert_name": "c"}
    store = QdrantStore(client, "mine", fingerprint=FINGERPRINT, **names)
    reference = filled_pair(store, corpus)
    query = synthetic_queries(corpus[1])[3]
    for case in ("hybrid-three-legs-rrf", "hybrid-rerank-all", "sparse"):
        params = SearchParams(k=6, **SEARCH_CASES[case])
        same_hits(store.search(query, params), reference.search(query, params))
    # The fingerprint was recorded on attach; another handle learns it.
    stored = client.get_collection("mine").config.metadata["m3connect"]["fingerprint"]
    assert ModelFingerprint.from_dict(stored) == FINGERPRINT
    assert QdrantStore(client, "mine", **names).fingerprint == FINGERPRINT
    with pytest.raises(StoreError, match="'dense'"):
        QdrantStore(client, "mine", fingerprint=FINGERPRINT)  # default names do not fit


@pytest.mark.parametrize(
    "layout, message",
    [
        ({"dense": ("d", DENSE_DIM + 1, models.Distance.DOT)}, "dimension 17"),
        ({"colbert": ("c", COLBERT_DIM + 1)}, "dimension 13"),
        ({"dense": None}, "no dense vector 'd'"),
        ({"sparse": None}, "no sparse vector 's'"),
        ({"colbert": None}, "no ColBERT multivector 'c'"),
        ({"comparator": False}, "not a multivector with MAX_SIM"),
        ({"dense": ("d", DENSE_DIM, models.Distance.COSINE)}, "distance cosine"),
        ({"idf": True}, "IDF modifier"),
    ],
)
def test_a_collection_that_does_not_fit_is_refused_by_name(client, layout, message):
    make_collection(client, "misfit", **layout)
    with pytest.raises(StoreError, match=message) as info:
        QdrantStore(
            client,
            "misfit",
            fingerprint=FINGERPRINT,
            dense_name="d",
            sparse_name="s",
            colbert_name="c",
        )
    assert "misfit" in str(info.value)


def test_unnamed_vector_collection_is_refused(client):
    client.create_collection(
        "plain", vectors_config=models.VectorParams(size=DENSE_DIM, distance=models.Distance.DOT)
    )
    with pytest.raises(StoreError, match="unnamed vector"):
        QdrantStore(client, "plain", fingerprint=FINGERPRINT)


def test_other_fingerprint_and_settings_are_refused(client):
    QdrantStore(client, "fp", fingerprint=FINGERPRINT).add(["a"], synthetic_embeddings(1, seed=1))
    with pytest.raises(FingerprintMismatchError, match="heads_sha256"):
        QdrantStore(client, "fp", fingerprint=OTHER_FINGERPRINT)
    with pytest.raises(FingerprintMismatchError, match="extra"):
        QdrantStore(client, "fp", fingerprint=FINGERPRINT.with_extra(chunk_tokens=512))
    other_dims = ModelFingerprint("x", DENSE_DIM * 2, COLBERT_DIM)
    with pytest.raises((FingerprintMismatchError, StoreError)):
        QdrantStore(client, "fp", fingerprint=other_dims)
    assert QdrantStore(client, "fp").fingerprint == FINGERPRINT


def test_collection_is_created_on_first_write_when_the_model_is_unknown(client):
    store = QdrantStore(client, "lazy")
    assert not client.collection_exists("lazy")
    assert (
        store.count() == 0
        and store.get(["a"]) == []
        and store.search(synthetic_embeddings(1, seed=1)[0]) == []
    )
    store.add(["a"], synthetic_embeddings(1, seed=1))
    params = client.get_collection("lazy").config.params
    assert (
        params.vectors["dense"].size == DENSE_DIM and params.vectors["colbert"].size == COLBERT_DIM
    )
    assert params.vectors["colbert"].hnsw_config.m == 0
    assert (
        params.vectors["colbert"].multivector_config.comparator
        == models.MultiVectorComparator.MAX_SIM
    )
    assert params.sparse_vectors["sparse"].modifier is None
    assert QdrantStore(client, "lazy").fingerprint.dense_dim == DENSE_DIM


def test_float16_and_idf_options_shape_the_collection(client):
    QdrantStore(client, "f16", fingerprint=FINGERPRINT, colbert_dtype="float16", sparse_idf=True)
    params = client.get_collection("f16").config.params
    assert params.vectors["colbert"].datatype == models.Datatype.FLOAT16
    assert params.sparse_vectors["sparse"].modifier == models.Modifier.IDF
    with pytest.raises(StoreError, match="sparse_idf=True"):
        QdrantStore(client, "f16", fingerprint=FINGERPRINT)


def test_local_mode_persists_and_reopens(tmp_path, corpus):
    path = str(tmp_path / "persist")
    client = QdrantClient(path=path)
    store = QdrantStore(client, "docs", fingerprint=FINGERPRINT)
    reference = filled_pair(store, corpus)
    client.close()
    client = QdrantClient(path=path)
    reopened = QdrantStore(client, "docs")
    assert reopened.fingerprint == FINGERPRINT and reopened.count() == len(corpus[0])
    query = synthetic_queries(corpus[1])[0]
    same_hits(
        reopened.search(query, k=5, rerank="colbert"),
        reference.search(query, k=5, rerank="colbert"),
    )
    with pytest.raises(FingerprintMismatchError):
        QdrantStore(client, "docs", fingerprint=OTHER_FINGERPRINT)
    client.close()


def test_exact_option_sends_no_params_to_local_mode(client, corpus):
    store = QdrantStore(client, "exact", fingerprint=FINGERPRINT, exact=True, hnsw_ef=64)
    reference = filled_pair(store, corpus)
    query = synthetic_queries(corpus[1])[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same_hits(store.search(query, k=5), reference.search(query, k=5))


def test_delete_everything_keeps_the_collection(client, corpus):
    store = QdrantStore(client, "wipe", fingerprint=FINGERPRINT)
    filled_pair(store, corpus)
    with pytest.raises(StoreError):
        store.delete()
    store.delete(filter={})
    assert store.count() == 0
    assert QdrantStore(client, "wipe").fingerprint == FINGERPRINT


# --- qdrant-edge specifics --------------------------------------------------------------------


@needs_edge
def test_edge_keeps_the_fingerprint_in_a_reserved_point(tmp_path, corpus):
    path = tmp_path / "edge"
    store = QdrantEdgeStore(path, fingerprint=FINGERPRINT)
    reference = filled_pair(store, corpus)
    n = len(corpus[0])
    assert store.count() == n
    assert store.shard.count(qdrant_edge.CountRequest(exact=True)) == n + 1  # the reserved point
    # A negated filter matches the reserved point's missing metadata: it must stay out.
    assert store.count(filter={"$not": {"lang": "ko"}}) == reference.count(
        filter={"$not": {"lang": "ko"}}
    )
    store.delete(filter={"$not": {"lang": "ko"}})
    store.delete(filter={})
    assert store.count() == 0
    assert store.shard.retrieve([RESERVED_POINT_ID], with_payload=True, with_vector=False)
    store.close()
    with pytest.raises(FingerprintMismatchError):
        QdrantEdgeStore(path, fingerprint=OTHER_FINGERPRINT)
    reopened = QdrantEdgeStore(path)
    assert reopened.fingerprint == FINGERPRINT
    reopened.close()


@needs_edge
def test_edge_refuses_a_shard_that_does_not_fit(tmp_path):
    QdrantEdgeStore(tmp_path / "e", fingerprint=FINGERPRINT).close()
    with pytest.raises(StoreError, match="'dense2'"):
        QdrantEdgeStore(tmp_path / "e", fingerprint=FINGERPRINT, dense_name="dense2")
    with pytest.raises(StoreError, match="dimension"):
        QdrantEdgeStore(
            tmp_path / "e", fingerprint=ModelFingerprint("m", DENSE_DIM + 1, COLBERT_DIM)
        )
    with pytest.raises(StoreError, match="IDF"):
        QdrantEdgeStore(tmp_path / "e", fingerprint=FINGERPRINT, sparse_idf=True)


class CountingShard:
    """A real EdgeShard that counts the queries made through it."""

    def __init__(self, shard: Any) -> None:
        self.shard = shard
        self.calls: Counter[str] = Counter()

    def query(self, request):  # type: ignore[no-untyped-def]
        self.calls["query"] += 1
        return self.shard.query(request)

    def query_batch(self, request):  # type: ignore[no-untyped-def]
        self.calls["query_batch"] += 1
        return self.shard.query_batch(request)

    def scroll(self, request):  # type: ignore[no-untyped-def]
        self.calls["scroll"] += 1
        return self.shard.scroll(request)

    def retrieve(self, point_ids, with_payload=None, with_vector=None):  # type: ignore[no-untyped-def]
        self.calls["retrieve"] += 1
        if with_vector:
            self.calls["retrieve_vectors"] += 1
        return self.shard.retrieve(point_ids, with_payload=with_payload, with_vector=with_vector)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.shard, name)


@needs_edge
def test_edge_scores_the_hits_by_id_in_one_batch(tmp_path, corpus):
    """One request ranks; the exact scores of the parts the final score is not come from one
    batch that has the engine score just the hits' ids (no vectors travel)."""
    store = QdrantEdgeStore(tmp_path / "calls", fingerprint=FINGERPRINT)
    reference = filled_pair(store, corpus)
    counting = CountingShard(store.shard)
    handle = QdrantEdgeStore(tmp_path / "calls", shard=counting)
    query = synthetic_queries(corpus[1])[0]
    for case, spec in SEARCH_CASES.items():
        params = SearchParams(k=5, **spec)
        counting.calls.clear()
        same_hits(handle.search(query, params), reference.search(query, params))
        if params.legs == ("colbert",):
            # Every document's row span in one scroll, the top hits' payloads in one retrieve:
            # the ColBERT scores come from the row file, no vectors from the engine.
            assert counting.calls == {"scroll": 1, "retrieve": 1}, case
        elif len(params.legs) == 1 and params.rerank is None:
            assert counting.calls == {"query": 1}, case
        else:
            assert counting.calls == {"query": 1, "query_batch": 1}, case
    plan = handle._plan(SearchParams(rerank="all"), handle._query_vectors(query, SearchParams()))
    assert plan.fetch_parts == () and plan.by_id == ("dense", "sparse", "colbert")
    store.close()


@needs_edge
def test_edge_float16_engine_scores_when_exactness_is_not_asked(tmp_path, corpus):
    ids, embeddings, texts, metadatas = corpus
    store = QdrantEdgeStore(
        tmp_path / "fast", fingerprint=FINGERPRINT, colbert_dtype="float16", exact_float16=False
    )
    reference = InMemoryStore(fingerprint=FINGERPRINT, colbert_dtype="float16")
    for target in (store, reference):
        target.add(ids, embeddings, texts, metadatas)
    query = synthetic_queries(embeddings)[1]
    got = store.search(query, mode="colbert", k=5)
    expected = reference.search(query, mode="colbert", k=5)
    # The engine rounds the query to float16: close to the reference, not within 1e-5 of it.
    assert [h.id for h in got] == [h.id for h in expected]
    assert all(
        math.isclose(a.score, e.score, abs_tol=5e-4) for a, e in zip(got, expected, strict=True)
    )
    store.close()
