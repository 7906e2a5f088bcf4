"""The Milvus adapter on Milvus Lite (a real, in-process Milvus; no mocks), plus unit tests of
the requests it builds for Milvus servers (Array-of-Struct layout) and a live test against a
server when ``MILVUS_URI`` is set."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import uuid

import numpy as np
import pytest
from store_contract import (
    COLBERT_DIM,
    DENSE_DIM,
    FILTERS,
    FINGERPRINT,
    StoreContract,
    assert_answers_like_the_reference,
    assert_same_hits,
    failing_calls,
    synthetic_corpus,
    synthetic_embeddings,
    synthetic_queries,
)

pymilvus = pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from pymilvus import DataType, MilvusClient  # noqa: E402
from pymilvus.exceptions import MilvusException  # noqa: E402

from m3connect.filters import Field, RawFilter, matches, parse_filter  # noqa: E402
from m3connect.fingerprint import FingerprintMismatchError  # noqa: E402
from m3connect.store import SearchParams, StoreError  # noqa: E402
from m3connect.stores.memory import InMemoryStore  # noqa: E402
from m3connect.stores.milvus import (  # noqa: E402
    COLBERT,
    SPARSE_PLACEHOLDER,
    AsyncMilvusStore,
    MilvusStore,
    _MilvusCore,
    _Search,
    decode_pk,
    encode_pk,
    filter_expression,
    filter_values,
    quote,
    supports_struct_arrays,
)
from m3connect.types import M3Embedding, M3Output  # noqa: E402

# pymilvus logs every refused request with a traceback; the tests below provoke some on purpose.
logging.getLogger("pymilvus").setLevel(logging.CRITICAL)

_names = itertools.count()


@pytest.fixture(scope="module")
def lite_path(tmp_path_factory):
    return str(tmp_path_factory.mktemp("milvus") / "m3.db")


@pytest.fixture(scope="module")
def client(lite_path):
    """One Milvus Lite file and one client for the module (Lite files are single-process);
    every test works in collections of its own."""
    c = MilvusClient(lite_path)
    yield c
    c.close()


@pytest.fixture
def prefix():
    return f"t{next(_names)}_{uuid.uuid4().hex[:6]}"


@pytest.fixture
def make_store(client, prefix):
    def make(fingerprint=FINGERPRINT, name="main", **options):
        return MilvusStore(client, f"{prefix}_{name}", fingerprint=fingerprint, **options)

    return make


MILVUS_WRITES = {
    "insert",
    "upsert",
    "delete",
    "alter_collection_properties",
    "drop_collection_properties",
}


class TestMilvusContract(StoreContract):
    score_tol = 1e-5
    small_batch_options = {"batch_size": 3}

    def failing_write(self, store, step):
        return failing_calls(
            store, "client", MILVUS_WRITES, step, lambda: MilvusException(message="injected")
        )

    def store_state(self, store):
        """Token rows of the companion collection: a failed add must leave none behind."""
        if store.layout != "companion":
            return None
        rows = store.client.query(store.companion, filter="pos >= 0", output_fields=["count(*)"])
        return rows[0]["count(*)"]

    @pytest.fixture
    def store_factory(self, make_store):
        def make(fingerprint, name=None, **options):
            return make_store(fingerprint, name=name or f"c{next(_names)}", **options)

        return make


# --- helpers ----------------------------------------------------------------------------------------


def filled_pair(make_store, **options):
    store = make_store(**options)
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    ids, embeddings, texts, metadatas = synthetic_corpus()
    for target in (store, reference):
        target.add(ids, embeddings, texts, metadatas)
    return store, reference


def companion_rows(client, store):
    rows = client.query(store.companion, filter="", output_fields=["count(*)"])
    return int(rows[0]["count(*)"])


# --- ids and expressions (pure) -------------------------------------------------------------------


def test_pk_keeps_the_id_type():
    assert encode_pk("1") != encode_pk(1)
    for doc_id in ["1", 1, "s:x", "", "🙂", -(2**63), 2**63 - 1]:
        back = decode_pk(encode_pk(doc_id))
        assert back == doc_id and type(back) is type(doc_id)


@pytest.mark.parametrize(
    "value",
    ['x" or 1==1 or "', "it's", "back\\slash", 'end\\"', "new\nline\ttab\r", "유니코드 🙂", ""],
)
def test_quote_round_trips_through_the_milvus_lite_lexer(value):
    from milvus_lite.search.filter.tokens import TokenKind, tokenize

    tokens = tokenize(quote(value))
    assert [t.kind for t in tokens] == [TokenKind.STRING, TokenKind.EOF]
    assert tokens[0].value == value


def test_filter_values_are_typed():
    values = filter_values(
        {"a": "x", "b": [1, 2.5, True, "y", None, {"z": 1}], "c": False, "d": None}
    )
    assert values == {"s:a": ["x"], "n:b": [1.0, 2.5], "b:b": [True], "s:b": ["y"], "b:c": [False]}


def test_expression_escapes_every_value():
    expr = filter_expression(parse_filter({'k"ey': {"$in": ['x" or 1==1 or "', 2, True]}}))
    assert '"s:k\\"ey"' in expr and '"x\\" or 1==1 or \\""' in expr
    assert "[2.0]" in expr and "[true]" in expr


# --- filters on Milvus Lite -----------------------------------------------------------------------

HOSTILE = [
    'x" or 1==1 or "',
    "x' or 1==1 or '",
    '") or (1==1',
    "\\",
    '\\"',
    "a\nb",
    "ü 🙂 한국어",
    "%_*",
]


def test_hostile_filter_values_match_only_themselves(make_store):
    store = make_store()
    values = [*HOSTILE, "plain"]
    emb = synthetic_embeddings(len(values), seed=3)
    store.add(
        [f"d{i}" for i in range(len(values))],
        emb,
        values,
        [{"v": v, "k": [v, "other"]} for v in values],
    )
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    reference.add(
        [f"d{i}" for i in range(len(values))],
        emb,
        values,
        [{"v": v, "k": [v, "other"]} for v in values],
    )
    for i, value in enumerate(values):
        for spec in ({"v": value}, {"k": value}, Field("v").isin([value, "nothing"])):
            assert [h.id for h in store.search(emb[i], mode="dense", k=50, filter=spec)] == [
                f"d{i}"
            ]
            assert store.count(filter=spec) == 1
        assert store.count(filter={"v": {"$ne": value}}) == len(values) - 1
    # An injection attempt is a value like any other: it matches nothing here.
    assert store.count(filter={"v": 'nothing" or 1==1 or "'}) == 0
    assert store.count(filter={'v" or 1==1 or "': "x"}) == 0
    # Keys with quotes and unicode work as keys.
    store.add(["odd-key"], synthetic_embeddings(1, seed=4), ["t"], [{'we"ird\\key 🙂': 1}])
    assert store.count(filter={'we"ird\\key 🙂': 1}) == 1
    assert store.count(filter={'we"ird\\key 🙂': {"$gt": 0.5}}) == 1


def test_filter_semantics_equal_the_reference(make_store):
    """Types, missing keys, negation and lists, beyond the contract's filters."""
    store = make_store()
    metas = [
        {"n": 1},
        {"n": 1.0},
        {"n": True},
        {"n": "1"},
        {"n": [0, 5]},
        {"n": [7, 1.5, "x"]},
        {"n": None},
        {},
        {"n": [True, False]},
        {"n": -3.25},
        {"n": [[1]]},
        {"n": {"a": 1}},
        {"n": 2**40},
        {"n": [-1, -2, -3, 40]},
    ]
    emb = synthetic_embeddings(len(metas), seed=8)
    ids = list(range(len(metas)))
    store.add(ids, emb, None, metas)
    specs = [
        {"n": 1},
        {"n": 1.0},
        {"n": True},
        {"n": False},
        {"n": "1"},
        {"n": {"$ne": 1}},
        {"n": {"$in": [1, "x"]}},
        {"n": {"$nin": [True, 5]}},
        {"n": {"$gt": 1}},
        {"n": {"$gte": 1, "$lt": 2}},
        {"n": {"$gt": 2, "$lt": 6}},
        {"n": {"$lte": -3}},
        {"n": {"$gt": -2.5, "$lt": -1.5}},
        ~(Field("n") >= 0),
        {"n": 2**40},
        {"$or": [{"n": "x"}, {"n": {"$lt": 0}}]},
        {"$not": {"n": {"$gte": 0}}},
        {"missing": {"$ne": 1}},
        ~Field("missing").isin([1]),
    ]
    for spec in specs:
        expected = {i for i, m in zip(ids, metas, strict=True) if matches(parse_filter(spec), m)}
        got = {h.id for h in store.search(emb[0], mode="dense", k=100, filter=spec)}
        assert got == expected, spec
        assert store.count(filter=spec) == len(expected), spec


def test_range_over_numeric_lists_knows_the_longest_list(make_store, prefix):
    store = make_store(name="lists")
    emb = synthetic_embeddings(2, seed=9)
    store.add(["short"], emb[:1], None, [{"x": [1, 2]}])
    # A second handle on the collection writes a longer list; the first handle still finds it.
    other = make_store(name="lists")
    other.add(["long"], emb[1:], None, [{"x": [0, 0, 0, 0, 0, 50]}])
    assert store.count(filter=Field("x").between(40, 60)) == 1
    assert store.count(filter=Field("x").between(1.5, 2.5)) == 1


def test_raw_filters_pass_through(make_store):
    store, reference = filled_pair(make_store)
    raw = RawFilter('metadata["lang"] == "ko"')
    assert store.count(filter=raw) == reference.count(filter={"lang": "ko"})
    hits = store.search(
        synthetic_queries(synthetic_corpus()[1])[0], mode="hybrid", k=50, filter=raw
    )
    assert hits and all(h.metadata["lang"] == "ko" for h in hits)
    with pytest.raises(StoreError):
        store.count(filter=RawFilter({"not": "a string"}))
    bad = RawFilter("this is not ( an expression")
    with pytest.raises(StoreError):
        store.count(filter=bad)
    for mode in ("dense", "colbert", "hybrid"):
        with pytest.raises(StoreError):
            store.search(synthetic_queries(synthetic_corpus()[1])[0], mode=mode, filter=bad)
    with pytest.raises(StoreError):
        store.delete(filter=bad)
    assert store.count() == reference.count()


# --- writing ------------------------------------------------------------------------------------------


def test_empty_sparse_part_keeps_the_document_and_its_batch(make_store, client):
    store = make_store()
    emb = synthetic_embeddings(4, seed=12, empty_sparse=(0, 2))
    store.add(["e0", "e1", "e2", "e3"], emb, ["a", "b", "c", "d"])
    assert store.count() == 4
    records = store.get(["e0", "e1", "e2"], with_vectors=True)
    assert [r.embedding.sparse == {} for r in records] == [True, False, True]
    assert all(SPARSE_PLACEHOLDER not in r.embedding.sparse for r in records)
    stored = client.query(store.collection, filter='pk == "s:e0"', output_fields=["sparse"])
    assert stored[0]["sparse"] == {SPARSE_PLACEHOLDER: 1.0}
    # The sparse leg finds only documents that share a real token; a query naming the
    # placeholder id (or ids Milvus cannot hold) finds nothing through it.
    query = M3Embedding(
        dense=emb.dense[1],
        sparse={**emb.sparse[1], SPARSE_PLACEHOLDER: 5.0, 2**40: 1.0},
        colbert=emb.colbert[1],
    )
    hits = store.search(query, mode="sparse", k=10)
    assert {h.id for h in hits} <= {"e1", "e3"} and hits[0].id == "e1"
    assert all(h.scores["sparse"] > 0 for h in hits)
    assert (
        store.search(
            M3Embedding(
                dense=emb.dense[0], sparse={SPARSE_PLACEHOLDER: 1.0}, colbert=emb.colbert[0]
            ),
            mode="sparse",
        )
        == []
    )
    # Hybrid search scores an empty-sparse document's lexical part exactly: 0.
    hits = store.search(emb[0], mode="hybrid", fusion="weighted", k=4)
    by_id = {h.id: h for h in hits}
    assert by_id["e0"].scores["sparse"] == 0.0


def test_sparse_weights_milvus_cannot_hold(make_store):
    store = make_store()
    emb = synthetic_embeddings(2, seed=1)
    tiny = M3Output(dense=emb.dense, sparse=[{1: 1e-50, 2: 0.5}, {3: 0.25}], colbert=emb.colbert)
    store.add(["tiny", "ok"], tiny)  # a weight that rounds to 0 in float32 is dropped, not fatal
    assert store.get(["tiny"], with_vectors=True)[0].embedding.sparse == {2: 0.5}
    for bad in ({SPARSE_PLACEHOLDER: 0.5}, {2**33: 0.5}, {1: 1e39}):
        wrong = M3Output(dense=emb.dense[:1], sparse=[bad], colbert=emb.colbert[:1])
        with pytest.raises(StoreError):
            store.add(["bad"], wrong)
    assert store.count() == 2 and store.get(["bad"]) == []


def test_long_texts_and_odd_metadata_round_trip(make_store):
    store = make_store()
    long_text = ("한국어 텍스트 🙂 " * 9000) + "end"  # > 65535 bytes: stored in pieces
    assert len(long_text.encode()) > 3 * 65535
    emb = synthetic_embeddings(3, seed=2)
    metas = [
        {"id": "meta-id", "nested": {"a": [1, {"b": None}]}, "f": 1.0, "i": 1},
        {"np": np.float32(0.5), "arr": (1, 2)},
        None,
    ]
    store.add(["long", "np", "none"], emb, [long_text, "", "x"], metas)
    got = {r.id: r for r in store.get(["long", "np", "none"])}
    assert got["long"].text == long_text
    assert got["np"].text == ""
    assert got["long"].metadata == metas[0]
    assert type(got["long"].metadata["f"]) is float and type(got["long"].metadata["i"]) is int
    assert got["np"].metadata == {"np": 0.5, "arr": [1, 2]}
    assert got["none"].metadata == {}
    assert store.search(emb[0], mode="dense", k=1)[0].text == long_text
    # None stays None.
    store.add(["no-text"], synthetic_embeddings(1, seed=5))
    assert store.get(["no-text"])[0].text is None


def test_bad_input_is_refused_and_loses_nothing(make_store, client):
    store, _ = filled_pair(make_store)
    n, tokens = store.count(), companion_rows(client, store)
    good = synthetic_embeddings(2, seed=5)
    too_big_meta = {"blob": "x" * 70000}
    bad_calls = {
        "metadata too large": lambda: store.add(
            ["new", "doc-4"], good, ["a", "b"], [too_big_meta, None]
        ),
        "NaN in metadata": lambda: store.add(
            ["new", "doc-4"], good, ["a", "b"], [{"x": float("nan")}, None]
        ),
        "unserializable metadata": lambda: store.add(
            ["new", "doc-4"], good, ["a", "b"], [{"x": object()}, None]
        ),
        "id too long": lambda: store.add(["x" * 70000, "doc-4"], good, ["a", "b"]),
        "bool id": lambda: store.add([True, "doc-4"], good, ["a", "b"]),
    }
    for why, call in bad_calls.items():
        with pytest.raises(StoreError):
            call()
        assert store.count() == n, why
        assert companion_rows(client, store) == tokens, why
        assert store.get(["new"]) == [], why
        assert store.get(["doc-4"])[0].text == synthetic_corpus()[2][4], why


def test_companion_rows_follow_upserts_and_deletes(make_store, client):
    store, _ = filled_pair(make_store)
    ids, embeddings, _, _ = synthetic_corpus()
    assert store.layout == "companion"
    assert companion_rows(client, store) == sum(len(c) for c in embeddings.colbert)
    # An upsert replaces a document's tokens (no stale generation is left behind).
    replacement = synthetic_embeddings(2, seed=77)
    store.add([ids[0], ids[1]], replacement, ["r0", "r1"])
    expected = sum(len(c) for c in embeddings.colbert[2:]) + sum(
        len(c) for c in replacement.colbert
    )
    assert companion_rows(client, store) == expected
    got = store.get([ids[0]], with_vectors=True)[0].embedding.colbert
    np.testing.assert_allclose(got, replacement.colbert[0], atol=1e-6)
    # Deletes by id and by filter remove the tokens too.
    store.delete([ids[0]])
    expected -= len(replacement.colbert[0])
    assert companion_rows(client, store) == expected
    ko = [
        i
        for i, m in zip(ids, synthetic_corpus()[3], strict=True)
        if m["lang"] == "ko" and i not in (ids[0], ids[1])
    ]
    store.delete(filter={"lang": "ko"})
    expected -= sum(len(embeddings.colbert[ids.index(i)]) for i in ko)
    assert companion_rows(client, store) == expected
    store.delete(filter={})
    assert store.count() == 0 and companion_rows(client, store) == 0


def test_stale_tokens_are_never_read(make_store, client):
    """Tokens of another generation (an upsert cut short) do not count in any score."""
    store, reference = filled_pair(make_store)
    ids, embeddings, _, _ = synthetic_corpus()
    pk = encode_pk(ids[7])
    # Forge stale tokens that would win every ColBERT comparison if they were read.
    query = synthetic_queries(embeddings)[0]
    client.insert(
        store.companion,
        [
            {"doc": pk, "gen": "stale", "pos": j, "vec": row.tolist()}
            for j, row in enumerate(query.colbert)
        ],
    )
    for mode in ("colbert", "hybrid"):
        params = SearchParams(mode=mode, k=5, rerank="colbert" if mode == "hybrid" else None)
        expected = reference.search(query, params)
        got = store.search(query, params)
        assert [h.id for h in got] == [h.id for h in expected]
        assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=1e-5)
    np.testing.assert_allclose(
        store.get([ids[7]], with_vectors=True)[0].embedding.colbert,
        embeddings.colbert[7],
        atol=1e-6,
    )


def test_stale_rows_of_a_shared_generation_do_not_crowd_out_current_ones(make_store, client):
    """Rows left by an upsert cut short can share a generation with another document's current
    rows; when they fill the query window, a short document is asked for alone."""
    store, _ = filled_pair(make_store)
    ids, embeddings, _, _ = synthetic_corpus()
    a, b = ids[7], ids[8]  # written in one batch: one generation
    row = client.query(
        store.collection, filter=f"pk == {quote(encode_pk(b))}", output_fields=["colbert_gen"]
    )
    replacement = synthetic_embeddings(1, seed=31)
    store.add([a], replacement)  # a moves to a new generation
    junk = np.ones((300, COLBERT_DIM), dtype=np.float32) / math.sqrt(COLBERT_DIM)
    client.insert(
        store.companion,
        [
            {"doc": encode_pk(a), "gen": row[0]["colbert_gen"], "pos": 1000 + j, "vec": v.tolist()}
            for j, v in enumerate(junk)
        ],
    )
    # Lite returns rows in insertion order (current ones first); a server need not: serve the
    # window newest first, so the junk fills it.
    queries = []
    plain_query = store._query

    def newest_first(collection, expr, fields, limit=None, **kwargs):
        queries.append(expr)
        rows = yield from plain_query(collection, expr, fields, 16384, **kwargs)
        return rows[::-1][:limit]

    store._query = newest_first
    got = {r.id: r.embedding.colbert for r in store.get([a, b], with_vectors=True)}
    np.testing.assert_allclose(got[a], replacement.colbert[0], atol=1e-6)
    np.testing.assert_allclose(got[b], embeddings.colbert[8], atol=1e-6)
    assert any(" == " in q for q in queries)  # the exact per-document query ran


def test_texts_encoded_by_the_store(make_store, m3_encoder):
    """The whole path with a (random, BGE-M3-layout) encoder: texts in, text queries out."""
    from m3connect.testing import SAMPLE_TEXTS

    store = MilvusStore(make_store().client, f"enc_{uuid.uuid4().hex[:8]}", m3_encoder)
    reference = InMemoryStore(m3_encoder)
    texts = list(SAMPLE_TEXTS[:12])
    metas = [{"lang": "en" if i < 11 else "de", "i": i} for i in range(len(texts))]
    ids = store.add_texts(texts, metadatas=metas)
    reference.add_texts(texts, ids=ids, metadatas=metas)
    assert store.fingerprint == m3_encoder.fingerprint
    for params in (
        SearchParams(mode="hybrid", rerank="colbert", k=4),
        SearchParams(mode="colbert", k=3, filter={"lang": "en"}),
    ):
        got = store.search("What is the capital of France?", params)
        expected = reference.search("What is the capital of France?", params)
        assert_same_hits(got, expected, expected, 1e-4)


def test_fingerprint_is_kept_with_the_collection(make_store, client):
    store = make_store(fingerprint=None, name="learned")
    assert not client.has_collection(store.collection)  # created on the first write
    store.add(["a"], synthetic_embeddings(1, seed=1), ["a"])
    props = client.describe_collection(store.collection)["properties"]
    assert json.loads(props["m3connect.fingerprint"])["dense_dim"] == DENSE_DIM
    assert props["m3connect.layout"] == "companion"
    reopened = make_store(fingerprint=None, name="learned")
    assert reopened.fingerprint.dense_dim == DENSE_DIM and reopened.get(["a"])[0].text == "a"
    other_dims = FINGERPRINT.__class__("test/other", DENSE_DIM + 1, COLBERT_DIM)
    with pytest.raises(FingerprintMismatchError):
        make_store(fingerprint=other_dims, name="learned")


def test_a_collection_that_does_not_fit_is_refused(make_store, client, prefix):
    foreign = f"{prefix}_foreign"
    client.create_collection(foreign, dimension=4)
    with pytest.raises(StoreError, match="not created by m3connect"):
        MilvusStore(client, foreign, fingerprint=FINGERPRINT)
    with pytest.raises(StoreError, match="Array-of-Struct"):
        make_store(name="forced", multivector="struct")


# --- searching ---------------------------------------------------------------------------------


def test_colbert_search_is_exact_beyond_the_first_token_round(make_store):
    """With a token limit far below the corpus, the threshold algorithm still returns the exact
    top k (it grows the limit until the bounds prove it); without exactness it approximates."""
    store, reference = filled_pair(make_store, colbert_token_limit=2, colbert_max_token_limit=4096)
    queries = synthetic_queries(synthetic_corpus()[1])
    for query in queries:
        for k in (1, 5, 30):
            expected = reference.search(query, mode="colbert", k=k)
            got = store.search(query, mode="colbert", k=k)
            assert [h.id for h in got] == [h.id for h in expected]
            assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=1e-5)
    fast = make_store(name="main", colbert_token_limit=2, colbert_exact=False)
    got = fast.search(queries[0], mode="colbert", k=5)
    assert len(got) == 5
    exact = {h.id: h.score for h in reference.search(queries[0], mode="colbert", k=48)}
    assert all(math.isclose(h.score, exact[h.id], abs_tol=1e-5) for h in got)  # scores stay exact


@pytest.mark.slow
def test_colbert_search_reads_every_row_when_bounds_cannot_prove_the_top(make_store):
    """When more token hits would cost as much as reading the rows in scope (or the token
    limit cannot grow), the exact answer comes from scoring every document the search may
    return, in windows; the threshold rounds still run first."""
    store, reference = filled_pair(make_store, colbert_token_limit=1, colbert_max_token_limit=1)
    calls = {"scan": 0, "rounds": 0}
    plain_scan, plain_count = _Search._score_all, _Search._token_rows

    def scan(self, allowed, exact):
        calls["scan"] += 1
        return (yield from plain_scan(self, allowed, exact))

    def rows(self, token_expr):
        calls["rounds"] += 1
        return (yield from plain_count(self, token_expr))

    queries = synthetic_queries(synthetic_corpus()[1])[:3]
    store._token_read_window = lambda: (5, 10)  # windows of a few documents
    try:
        _Search._score_all, _Search._token_rows = scan, rows
        for query in queries:
            for spec in (None, {"lang": "ko"}, FILTERS[next(iter(FILTERS))]):
                params = SearchParams(mode="colbert", k=7, filter=spec)
                expected = reference.search(query, params)
                got = store.search(query, params)
                assert [h.id for h in got] == [h.id for h in expected]
                assert [h.score for h in got] == pytest.approx(
                    [h.score for h in expected], abs=1e-5
                )
    finally:
        _Search._score_all, _Search._token_rows = plain_scan, plain_count
    assert calls["scan"] >= len(queries) and calls["rounds"] >= len(queries)
    unselective = make_store(
        name="main", colbert_token_limit=1, colbert_max_token_limit=1, colbert_filter_list_max=2
    )
    for spec in FILTERS.values():
        params = SearchParams(mode="colbert", k=10, filter=spec)
        assert [h.id for h in unselective.search(queries[1], params)] == [
            h.id for h in reference.search(queries[1], params)
        ]


@pytest.mark.slow
def test_colbert_with_an_unselective_filter(make_store):
    """A filter matching more documents than ``colbert_filter_list_max`` is checked per round."""
    store, reference = filled_pair(make_store, colbert_filter_list_max=3, colbert_token_limit=4)
    query = synthetic_queries(synthetic_corpus()[1])[2]
    for spec in FILTERS.values():
        params = SearchParams(mode="colbert", k=10, filter=spec)
        assert [h.id for h in store.search(query, params)] == [
            h.id for h in reference.search(query, params)
        ]


def test_server_side_rrf_equals_client_side(make_store):
    """Hybrid RRF without re-rank runs in one ``hybrid_search``; its answer is the core's (ties,
    such as rank 3 in both legs against rank 3 in both legs, may come in either order)."""
    store, reference = filled_pair(make_store)
    client_side = make_store(name="main", server_fusion=False)
    calls = []
    original = store.client.hybrid_search

    def spy(**kwargs):
        calls.append(kwargs)
        return original(**kwargs)

    store.client.hybrid_search = spy
    try:
        for query in synthetic_queries(synthetic_corpus()[1]):
            for rrf_k in (60, 10):
                params = SearchParams(mode="hybrid", k=7, candidates=20, rrf_k=rrf_k)
                expected = client_side.search(query, params)
                extended = client_side.search(query, params.with_overrides(k=17))
                assert_same_hits(store.search(query, params), expected, extended, 1e-6)
                assert_same_hits(expected, reference.search(query, params), extended, 1e-6)
    finally:
        del store.client.hybrid_search
    assert len(calls) == 10  # every search went to the server's fusion
    # A query whose sparse part is empty (after dropping ids no document can hold) has no
    # sparse leg to send: its RRF runs on the client, with the same answer.
    emptied = M3Embedding(dense=synthetic_corpus()[1].dense[0], sparse={2**40: 1.0}, colbert=None)
    params = SearchParams(mode="hybrid", k=5)
    assert [h.id for h in store.search(emptied, params)] == [
        h.id for h in reference.search(emptied, params)
    ]


async def test_async_store_gives_the_same_answers(lite_path, prefix, make_store):
    from pymilvus import AsyncMilvusClient

    sync_store, reference = filled_pair(make_store)
    client = AsyncMilvusClient(lite_path)
    try:
        store = await AsyncMilvusStore.open(client, f"{prefix}_async", fingerprint=FINGERPRINT)
        ids, embeddings, texts, metadatas = synthetic_corpus()
        await store.add(ids[:20], embeddings[:20], texts[:20], metadatas[:20])
        await store.add(ids[20:], embeddings[20:], texts[20:], metadatas[20:])
        assert await store.count() == 48
        assert await store.count(filter={"lang": "ko"}) == reference.count(filter={"lang": "ko"})
        for query in synthetic_queries(embeddings)[:2]:
            for params in (
                SearchParams(mode="hybrid", k=5),
                SearchParams(mode="colbert", k=5),
                SearchParams(
                    mode="hybrid", fusion="weighted", rerank="all", k=5, filter={"draft": False}
                ),
            ):
                got = await store.search(query, params)
                expected = reference.search(query, params)
                assert [h.id for h in got] == [h.id for h in expected]
                assert [h.score for h in got] == pytest.approx(
                    [h.score for h in expected], abs=1e-5
                )
        records = await store.get(["1", 1], with_vectors=True)
        assert [(type(r.id), r.id) for r in records] == [(str, "1"), (int, 1)]
        await store.delete(["doc-2"], filter={"lang": "ko"})
        reference.delete(["doc-2"], filter={"lang": "ko"})
        assert await store.count() == reference.count() < 48
        listed = [r async for r in store.iter_records(batch_size=7, with_vectors=True)]
        assert sorted(repr(r.id) for r in listed) == sorted(
            repr(r.id) for r in reference.iter_records()
        )
        by_key = {(type(r.id), r.id): r for r in reference.get(ids, with_vectors=True)}
        for record in listed:
            want_embedding = by_key[(type(record.id), record.id)].embedding
            np.testing.assert_allclose(record.embedding.dense, want_embedding.dense, atol=1e-6)
        english = [r.id async for r in store.iter_records(filter={"lang": "en"}, batch_size=3)]
        assert sorted(map(repr, english)) == sorted(
            repr(r.id) for r in reference.iter_records(filter={"lang": "en"})
        )
        subset = ["1", 1, "doc-4", "doc-5", "no-such-id"]
        query = synthetic_queries(embeddings)[1]
        got = await store.search_within(subset, query, mode="hybrid", rerank="all", k=3)
        want = reference.search_within(subset, query, mode="hybrid", rerank="all", k=3)
        assert [h.id for h in got] == [h.id for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
        await store.clear()
        assert await store.count() == 0
        with pytest.raises(FingerprintMismatchError):
            await AsyncMilvusStore.open(
                client,
                f"{prefix}_async",
                fingerprint=FINGERPRINT.__class__("x", DENSE_DIM, COLBERT_DIM, "c" * 64),
            )
    finally:
        await client.close()


def test_from_uri_owns_its_client(tmp_path):
    path = str(tmp_path / "own.db")
    with MilvusStore.from_uri(path, "docs", fingerprint=FINGERPRINT) as store:
        store.add(["a"], synthetic_embeddings(1, seed=1), ["text a"])
        assert (
            store.search(synthetic_embeddings(1, seed=1)[0], mode="colbert", k=1)[0].text
            == "text a"
        )


# --- the Array-of-Struct layout (Milvus >= 2.6.4 servers) -----------------------------------------


def test_struct_arrays_are_detected_from_the_server_version():
    assert (
        supports_struct_arrays("v2.6.4")
        and supports_struct_arrays("2.6.10")
        and supports_struct_arrays("v3.0.0-beta")
    )
    assert not supports_struct_arrays("v2.6.3") and not supports_struct_arrays("v2.5.14")
    assert not supports_struct_arrays("milvus_lite-3.2.2") and not supports_struct_arrays("")


def struct_core(**options) -> _MilvusCore:
    core = _MilvusCore("docs", fingerprint=FINGERPRINT, **options)
    core.server_version = "v2.6.4"
    core.layout = core._choose_layout()
    return core


def test_struct_schema_and_index():
    core = struct_core(colbert_dtype="float16")
    assert core.layout == "struct"
    schema = core.main_schema(FINGERPRINT).to_dict()
    (struct_field,) = schema["struct_fields"]
    assert struct_field["name"] == COLBERT and struct_field["max_capacity"] == 4096
    (vec,) = struct_field["fields"]
    assert (
        vec["name"] == "vec"
        and vec["type"] == DataType.FLOAT_VECTOR
        and vec["params"]["dim"] == COLBERT_DIM
    )
    names = {f["name"] for f in schema["fields"]}
    assert {"pk", "dense", "sparse", "text", "text_more", "metadata", "filter_values"} <= names
    assert "colbert_gen" not in names
    indexes = {i.field_name: i for i in core.main_index_params()}
    configs = {name: index.get_index_configs() for name, index in indexes.items()}
    assert configs["colbert[vec]"]["metric_type"] == "MAX_SIM_IP"
    assert configs["dense"]["metric_type"] == "IP" and configs["dense"]["index_type"] == "FLAT"
    assert configs["sparse"]["index_type"] == "SPARSE_INVERTED_INDEX"


def test_struct_rows_and_requests():
    core = struct_core(colbert_dtype="float16", max_colbert_vectors=3)
    ids, embeddings, texts, metadatas = synthetic_corpus()
    batch = core.prepare_batch(ids, embeddings, texts, metadatas)
    rows, tokens, _ = core._rows(batch, "gen")
    assert tokens == []
    for row, original in zip(rows, embeddings.colbert, strict=True):
        vectors = np.asarray([element["vec"] for element in row[COLBERT]])
        assert len(vectors) == min(3, len(original))
        np.testing.assert_array_equal(vectors, original[:3].astype(np.float16).astype(np.float32))
    # pymilvus turns the rows into an upsert request of this schema (no server needed for that).
    from pymilvus.client.prepare import Prepare

    schema = core.main_schema(FINGERPRINT).to_dict()
    request = Prepare.row_upsert_param("docs", rows, "", schema["fields"], schema["struct_fields"])
    assert request.num_rows == len(rows)
    assert "colbert" in [f.field_name for f in request.fields_data]
    query = synthetic_queries(embeddings)[0]
    search = _Search(core, core._clean_query(query), SearchParams(mode="colbert", k=4), 'x == "y"')
    request = search._struct_request(4)
    assert request["anns_field"] == "colbert[vec]"
    assert request["search_params"]["metric_type"] == "MAX_SIM_IP"
    assert request["filter"] == 'x == "y"' and request["limit"] == 4
    np.testing.assert_allclose(np.asarray(request["data"][0]._embeddings), query.colbert, atol=1e-7)
    # Hybrid RRF with a ColBERT leg runs in the server on this layout.
    hybrid = _Search(
        core,
        core._clean_query(query),
        SearchParams(mode="hybrid", hybrid_legs=("dense", "sparse", "colbert")),
        "",
    )
    assert hybrid._server_rrf()
    too_long = struct_core(struct_max_capacity=2)
    with pytest.raises(StoreError, match="max_colbert_vectors"):
        too_long._rows(too_long.prepare_batch(ids, embeddings, texts, metadatas), "gen")


@pytest.mark.live
@pytest.mark.skipif(
    not os.environ.get("MILVUS_URI"), reason="set MILVUS_URI to test against a Milvus server"
)
def test_live_server_contract_sample():
    """Against a real server: the automatic layout (struct from 2.6.4) on the contract corpus."""
    client = MilvusClient(uri=os.environ["MILVUS_URI"], token=os.environ.get("MILVUS_TOKEN", ""))
    name = f"m3connect_live_{uuid.uuid4().hex[:8]}"
    try:
        store = MilvusStore(client, name, fingerprint=FINGERPRINT)
        assert_answers_like_the_reference(
            store,
            [
                SearchParams(mode="dense", k=5),
                SearchParams(mode="sparse", k=5),
                SearchParams(mode="hybrid", k=5),
                SearchParams(mode="hybrid", rerank="all", k=5, filter={"lang": "ko"}),
                SearchParams(mode="colbert", k=5),
            ],
            context=store.layout,
        )
    finally:
        for collection in (name, name + "__colbert"):
            if client.has_collection(collection):
                client.drop_collection(collection)
        client.close()


def test_the_issue_15_batch_is_refused_before_any_write(make_store, client):
    """300 documents whose last metadata holds 2**70 (valid JSON, beyond every database's
    ints): refused before the first write, no document and no token row left behind."""
    store = make_store(name="int70")
    ids = [f"d{i}" for i in range(300)]
    metadatas = [{"n": i} for i in range(299)] + [{"n": 2**70}]
    with pytest.raises(StoreError, match="64 bits"):
        store.add(ids, synthetic_embeddings(300, seed=70), metadatas=metadatas)
    assert store.count() == 0
    if client.has_collection(store.companion):
        rows = client.query(store.companion, filter="pos >= 0", output_fields=["count(*)"])
        assert rows[0]["count(*)"] == 0


def test_finish_seals_both_collections_once_with_the_same_answers(make_store, monkeypatch):
    store, reference = filled_pair(make_store, batch_size=4)
    flushed: list[str] = []
    real_flush = store.client.flush
    monkeypatch.setattr(
        store.client, "flush", lambda name, **kw: flushed.append(name) or real_flush(name, **kw)
    )
    store.finish()
    assert sorted(flushed) == sorted([store.collection, store.companion])
    for query in synthetic_queries(synthetic_corpus()[1])[:2]:
        for params in (SearchParams(mode="colbert", k=5), SearchParams(rerank="all", k=5)):
            extended = reference.search(query, params.with_overrides(k=10))
            assert_same_hits(
                store.search(query, params), reference.search(query, params), extended, 1e-5
            )
    assert store.count() == reference.count()
