"""The store contract's shared test suite.

Every store adapter's tests subclass :class:`StoreContract` and provide a ``store_factory``
fixture; each test then fills the adapter's store and the exact in-memory reference store with
the same data and asserts the same answers: the same ids in the same order (ties may come in
any order), the same final and per-representation scores within ``score_tol``, the same texts
and metadata.

    class TestMyStore(StoreContract):
        score_tol = 1e-5

        @pytest.fixture
        def store_factory(self, tmp_path):
            def make(fingerprint, **options):
                return MyStore(..., fingerprint=fingerprint, **options)
            return make
"""

from __future__ import annotations

import contextlib
import datetime
import math
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from m3connect.filters import Field
from m3connect.fingerprint import FingerprintMismatchError, ModelFingerprint
from m3connect.store import Hit, M3Store, SearchParams, StoreError
from m3connect.stores.memory import InMemoryStore
from m3connect.types import DocId, M3Embedding, M3Output

DENSE_DIM = 16
COLBERT_DIM = 12
VOCAB = 200
FINGERPRINT = ModelFingerprint("test/synthetic-m3", DENSE_DIM, COLBERT_DIM, heads_sha256="a" * 64)
OTHER_FINGERPRINT = ModelFingerprint("test/other-m3", DENSE_DIM, COLBERT_DIM, heads_sha256="b" * 64)

StoreFactory = Callable[..., M3Store]


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def synthetic_embeddings(n: int, seed: int, *, empty_sparse: Sequence[int] = ()) -> M3Output:
    """Random embeddings shaped like the encoder's: unit dense rows, positive sparse weights
    over a small vocabulary (so documents share tokens), 1 to 12 unit ColBERT rows."""
    rng = np.random.default_rng(seed)
    sparse = []
    for i in range(n):
        if i in empty_sparse:
            sparse.append({})
            continue
        tokens = rng.choice(VOCAB, size=int(rng.integers(1, 12)), replace=False)
        sparse.append({int(t): float(rng.uniform(0.01, 0.5)) for t in tokens})
    return M3Output(
        dense=_unit(rng.normal(size=(n, DENSE_DIM))),
        sparse=sparse,
        colbert=[_unit(rng.normal(size=(int(rng.integers(1, 13)), COLBERT_DIM))) for _ in range(n)],
    )


def synthetic_corpus(
    n: int = 48, seed: int = 7
) -> tuple[list[DocId], M3Output, list[str], list[dict]]:
    """Ids (strings and ints, including ``"1"`` and ``1``), embeddings (one with an empty
    sparse part), texts in several scripts, and metadata with every filterable type."""
    rng = np.random.default_rng(seed)
    ids: list[DocId] = [f"doc-{i}" if i % 3 else i for i in range(n)]
    ids[1], ids[3] = "1", 1
    langs = ["en", "ko", "de", "it's", 'say "hi"', "back\\slash"]
    texts = [
        f"문서 {i} — document {i} 🙂" if i % 4 == 0 else f"passage number {i}" for i in range(n)
    ]
    metadatas: list[dict] = []
    for i in range(n):
        meta: dict[str, Any] = {
            "lang": langs[i % len(langs)],
            "year": int(2000 + rng.integers(0, 25)),
            "rating": round(float(rng.uniform(0, 5)), 3),
            "draft": bool(i % 5 == 0),
            "tags": [f"t{j}" for j in range(i % 3)],
        }
        if i % 7 == 0:
            del meta["year"]  # a document that lacks a key
        if i % 11 == 0:
            meta["id"] = f"user-id-{i}"  # a metadata key named like the id field
        metadatas.append(meta)
    return ids, synthetic_embeddings(n, seed, empty_sparse=(5,)), texts, metadatas


def synthetic_queries(corpus: M3Output, seed: int = 11) -> list[M3Embedding]:
    """Queries near some documents (so legs agree on some and differ on others), plus a query
    with no sparse token in common with anything."""
    rng = np.random.default_rng(seed)
    queries = []
    for doc_index in (0, 9, 17, 30):
        doc = corpus[doc_index]
        noise = rng.normal(scale=0.6, size=DENSE_DIM)
        tokens = list(doc.sparse)[:3] + [int(t) for t in rng.choice(VOCAB, size=3)]  # type: ignore[arg-type]
        queries.append(
            M3Embedding(
                dense=_unit(doc.dense + noise),  # type: ignore[operator]
                sparse={t: float(rng.uniform(0.05, 0.4)) for t in tokens},
                colbert=_unit(rng.normal(size=(int(rng.integers(2, 6)), COLBERT_DIM))),
            )
        )
    queries.append(
        M3Embedding(
            dense=_unit(rng.normal(size=DENSE_DIM)),
            sparse={VOCAB + 5: 0.3},
            colbert=_unit(rng.normal(size=(3, COLBERT_DIM))),
        )
    )
    return queries


SEARCH_CASES: dict[str, dict[str, Any]] = {
    "dense": {"mode": "dense"},
    "sparse": {"mode": "sparse"},
    "colbert": {"mode": "colbert"},
    "hybrid-rrf": {"mode": "hybrid", "fusion": "rrf"},
    "hybrid-rrf-k10": {"mode": "hybrid", "fusion": "rrf", "rrf_k": 10},
    "hybrid-dbsf": {"mode": "hybrid", "fusion": "dbsf"},
    "hybrid-weighted": {"mode": "hybrid", "fusion": "weighted", "weights": (1.0, 0.3, 1.0)},
    "hybrid-three-legs-rrf": {"mode": "hybrid", "hybrid_legs": ("dense", "sparse", "colbert")},
    "hybrid-rerank-colbert": {"mode": "hybrid", "rerank": "colbert"},
    "hybrid-rerank-all": {"mode": "hybrid", "rerank": "all"},
    "dense-few-candidates-rerank-colbert": {"mode": "dense", "candidates": 8, "rerank": "colbert"},
    "weighted-few-candidates": {"mode": "hybrid", "fusion": "weighted", "candidates": 8},
    "sparse-rerank-all": {"mode": "sparse", "rerank": "all", "weights": (1.0, 0.3, 1.0)},
}

FILTERS: dict[str, Any] = {
    "eq": {"lang": "ko"},
    "eq-quote": {"lang": "it's"},
    "eq-double-quote": {"lang": 'say "hi"'},
    "eq-backslash": {"lang": "back\\slash"},
    "in": Field("lang").isin(["en", "de"]),
    "range": (Field("year") >= 2010) & (Field("year") < 2020),
    "float-range": Field("rating") > 2.5,
    "bool": {"draft": True},
    "not-eq": {"lang": {"$ne": "en"}},  # true for documents that lack nothing here
    "missing-key-not": ~(Field("year") >= 2000),  # only the documents without a year
    "or": {"$or": [{"lang": "ko"}, {"draft": True}]},
    "tags": {"tags": "t1"},
    "nin": {"lang": {"$nin": ["en", "ko"]}},
    "metadata-id-key": {"id": "user-id-22"},
}


def assert_same_hits(
    actual: Sequence[Hit], expected: Sequence[Hit], extended: Sequence[Hit], tol: float
) -> None:
    """``actual`` equals the reference ``expected``: ids in order up to ties (a group of equal
    scores may come in any order, and a tie at the cut-off may be broken either way: ``extended``
    is the reference with more hits, to know the whole tie group), and scores within ``tol``."""
    assert len(actual) == len(expected), (
        f"{len(actual)} hits, reference has {len(expected)}: "
        f"{[h.id for h in actual]} vs {[h.id for h in expected]}"
    )
    by_id = {(type(h.id), h.id): h for h in extended}
    i = 0
    while i < len(actual):
        j = i
        while j < len(extended) and abs(extended[j].score - extended[i].score) <= tol:
            j += 1
        group = {(type(h.id), h.id) for h in extended[i:j]}
        got = actual[i : min(j, len(actual))]
        for hit in got:
            assert (type(hit.id), hit.id) in group, (
                f"hit {hit.id!r} at rank {i + 1}; reference has {[h.id for h in extended[i:j]]} "
                f"(scores {[h.score for h in extended[i:j]]}); got {[h.id for h in actual]} "
                f"vs {[h.id for h in expected]}"
            )
        i = max(j, i + 1)
    for hit in actual:
        ref = by_id[(type(hit.id), hit.id)]
        assert math.isclose(hit.score, ref.score, abs_tol=tol), (hit.id, hit.score, ref.score)
        assert set(hit.scores) == set(ref.scores), (hit.id, hit.scores, ref.scores)
        for part, value in ref.scores.items():
            assert math.isclose(hit.scores[part], value, abs_tol=tol), (
                hit.id,
                part,
                hit.scores,
                ref.scores,
            )
        assert hit.text == ref.text
        assert hit.metadata == ref.metadata


# --- data safety (issue 15) ---------------------------------------------------------------------

BAD_METADATA: dict[str, dict[Any, Any]] = {
    "nan": {"x": float("nan")},
    "inf": {"x": float("inf")},
    "nested -inf": {"x": [1.0, {"y": float("-inf")}]},
    "numpy nan": {"x": np.float32("nan")},
    "int beyond 64 bits": {"n": 2**70},
    "negative int beyond 64 bits": {"n": -(2**63) - 1},
    "datetime": {"when": datetime.datetime(2020, 1, 1)},
    "date in a list": {"when": [datetime.date(2020, 1, 1)]},
    "set": {"tags": {"a", "b"}},
    "bytes": {"raw": b"x"},
    "object": {"o": object()},
    "non-string key": {1: "x"},
    "nested non-string key": {"d": {2: "x"}},
}

BAD_SPARSE: dict[str, dict[Any, float]] = {
    "negative token id": {-1: 0.2},
    "token id 2**32": {2**32: 0.2},
    "token id 2**40": {2**40: 0.2},
    "float token id": {1.5: 0.2},  # type: ignore[dict-item]
    "nan weight": {3: float("nan")},
    "negative weight": {3: -0.1},
}


def assert_answers_like_the_reference(
    store: M3Store, searches: Sequence[SearchParams], tol: float = 1e-4, context: Any = None
) -> None:
    """Fill ``store`` and the reference store with the contract corpus, then every search of
    ``searches`` on every contract query gives the reference's ids, in order, and scores
    within ``tol`` (the live-server samples: a server adds no ties to the small corpus)."""
    reference = InMemoryStore(fingerprint=FINGERPRINT)
    ids, embeddings, texts, metadatas = synthetic_corpus()
    for target in (store, reference):
        target.add(ids, embeddings, texts, metadatas)
    assert store.count() == reference.count()
    for query in synthetic_queries(embeddings):
        for params in searches:
            expected = reference.search(query, params)
            got = store.search(query, params)
            assert [h.id for h in got] == [h.id for h in expected], (params, context)
            assert [h.score for h in got] == pytest.approx([h.score for h in expected], abs=tol)


@contextlib.contextmanager
def failing_calls(
    owner: Any, attr: str, methods: set[str], step: int, error: Callable[[], Exception]
) -> Iterator[list[int]]:
    """Replace ``owner.<attr>`` (a database client) by a proxy whose ``methods`` calls are
    counted and whose ``step``-th call raises ``error()`` instead of running."""
    target = getattr(owner, attr)
    made = [0]

    class Proxy:
        def __getattr__(self, name: str) -> Any:
            value = getattr(target, name)
            if name not in methods:
                return value

            def call(*args: Any, **kwargs: Any) -> Any:
                made[0] += 1
                if made[0] == step:
                    raise error()
                return value(*args, **kwargs)

            return call

    setattr(owner, attr, Proxy())
    try:
        yield made
    finally:
        setattr(owner, attr, target)


def _snapshot(store: M3Store, ids: Sequence[DocId]) -> list[tuple[Any, ...]]:
    """What ``get`` shows of ``ids``: id, text, metadata and every vector, comparable."""
    out = []
    for r in store.get(list(ids), with_vectors=True):
        emb = r.embedding
        assert emb is not None
        out.append(
            (
                type(r.id).__name__,
                r.id,
                r.text,
                r.metadata,
                np.round(np.asarray(emb.dense, dtype=np.float64), 5).tolist(),
                sorted((int(t), round(float(w), 4)) for t, w in (emb.sparse or {}).items()),
                np.round(np.asarray(emb.colbert, dtype=np.float64), 3).tolist(),
            )
        )
    return out


class DataSafetyContract:
    """Mixed into :class:`StoreContract`: ids, validation and the write protocol (issue 15)."""

    def _small_store(self, store_factory: StoreFactory) -> M3Store:
        return store_factory(FINGERPRINT, **self.small_batch_options)  # type: ignore[attr-defined]

    def test_a_bare_id_is_that_one_id(self, store_factory: StoreFactory) -> None:
        store = store_factory(FINGERPRINT)
        ids: list[DocId] = ["a", "b", "c", "abc", 7, 1, 2, 12]
        store.add(ids, synthetic_embeddings(len(ids), seed=3), [f"t-{i}" for i in ids])
        # A string is one id, never its characters; an int is one id.
        assert [r.id for r in store.get("abc")] == ["abc"]
        assert [r.id for r in store.get(7)] == [7]
        assert [r.id for r in store.get(("a", 12))] == ["a", 12]
        store.delete("abc")
        assert sorted(map(str, (r.id for r in store.get(["a", "b", "c", "abc"])))) == [
            "a",
            "b",
            "c",
        ]
        store.delete(12)
        assert [r.id for r in store.get([1, 2, 12])] == [1, 2]
        assert store.count() == len(ids) - 2
        # A one-document add with a bare id stores that id.
        store.add("xyz", synthetic_embeddings(1, seed=4), ["one"])
        assert [(r.id, r.text) for r in store.get(["x", "y", "z", "xyz"])] == [("xyz", "one")]
        # bytes (and other non-ids) are refused, and nothing is lost.
        for bad in (b"a", bytearray(b"a"), None, 1.5, {"a": 1}):
            with pytest.raises(StoreError):
                store.get(bad)  # type: ignore[arg-type]
            with pytest.raises(StoreError):
                store.delete(bad)  # type: ignore[arg-type]
        with pytest.raises(StoreError):
            store.add(b"q", synthetic_embeddings(1, seed=4), ["one"])  # type: ignore[arg-type]
        assert store.count() == len(ids) - 1

    @pytest.mark.parametrize("case", list(BAD_METADATA))
    def test_metadata_no_store_can_keep_is_refused(
        self, store_factory: StoreFactory, case: str
    ) -> None:
        self._check_refused_last(store_factory, metadata=BAD_METADATA[case])

    @pytest.mark.parametrize("case", list(BAD_SPARSE))
    def test_sparse_no_store_can_keep_is_refused(
        self, store_factory: StoreFactory, case: str
    ) -> None:
        self._check_refused_last(store_factory, sparse=BAD_SPARSE[case])

    @pytest.mark.parametrize("part", ["dense", "colbert"])
    @pytest.mark.parametrize("value", [float("nan"), float("inf")])
    def test_non_finite_vectors_are_refused(
        self, store_factory: StoreFactory, part: str, value: float
    ) -> None:
        self._check_refused_last(store_factory, vector=(part, value))

    def _check_refused_last(
        self,
        store_factory: StoreFactory,
        *,
        metadata: dict | None = None,
        sparse: dict | None = None,
        vector: tuple[str, float] | None = None,
    ) -> None:
        """The bad value sits in the last document of a batch written in several requests:
        the whole batch is refused with a StoreError and the store is as it was."""
        store = self._small_store(store_factory)
        ids, embeddings, texts, metadatas = synthetic_corpus(24)
        store.add(ids[:8], embeddings[:8], texts[:8], metadatas[:8])
        before = _snapshot(store, ids)
        state = self.store_state(store)  # type: ignore[attr-defined]
        metas = [dict(m) for m in metadatas]
        if metadata is not None:
            metas[-1] = metadata
        emb = embeddings[4:]
        if sparse is not None:
            emb.sparse[-1] = sparse  # type: ignore[index]
        if vector is not None:
            part, value = vector
            if part == "dense":
                emb.dense[-1, 0] = value  # type: ignore[index]
            else:
                emb.colbert[-1][0, 0] = value  # type: ignore[index]
        with pytest.raises(StoreError):
            store.add(ids[4:], emb, texts[4:], metas[4:])
        assert store.count() == 8
        assert _snapshot(store, ids) == before
        assert self.store_state(store) == state  # type: ignore[attr-defined]

    def test_metadata_comes_back_as_json(self, store_factory: StoreFactory) -> None:
        """Tuples and numpy values are stored as the plain JSON every database gives back."""
        store = store_factory(FINGERPRINT)
        reference = InMemoryStore(fingerprint=FINGERPRINT)
        meta = {"t": (1, 2), "n": np.int64(5), "f": np.float32(0.5), "big": 2**63 - 1}
        for target in (store, reference):
            target.add(["m"], synthetic_embeddings(1, seed=8), ["m"], [meta])
        expected = {"t": [1, 2], "n": 5, "f": 0.5, "big": 2**63 - 1}
        assert reference.get("m")[0].metadata == expected
        assert store.get("m")[0].metadata == expected

    def test_failed_add_leaves_the_store_as_it_was(self, store_factory: StoreFactory) -> None:
        """A database error at any write request of an add (one that replaces some documents
        and adds others, in several requests) leaves every document as before; once no step
        fails, the add lands whole."""
        store = self._small_store(store_factory)
        ids, embeddings, texts, metadatas = synthetic_corpus(24)
        store.add(ids[:12], embeddings[:12], texts[:12], metadatas[:12])
        before = _snapshot(store, ids)
        state = self.store_state(store)  # type: ignore[attr-defined]
        replacement = synthetic_embeddings(16, seed=21)
        new_texts = [f"new {i}" for i in range(16)]
        new_metas = [{"lang": "xx", "n": i} for i in range(16)]
        step = 0
        while True:
            step += 1
            assert step < 200, "the add never completed"
            with self.failing_write(store, step) as made:  # type: ignore[attr-defined]
                try:
                    store.add(ids[8:], replacement, new_texts, new_metas)
                except Exception:
                    # Only the injected failure may stop this add.
                    assert made[0] >= step, "the add failed without an injected failure"
                    failed = True
                else:
                    failed = False
            if not failed:
                assert made[0] < step, "the injected failure was swallowed"
                break
            assert store.count() == 12, f"failure at write {step}"
            assert _snapshot(store, ids) == before, f"failure at write {step}"
            assert self.store_state(store) == state, f"failure at write {step}"  # type: ignore[attr-defined]
        if not self.one_write_call:  # type: ignore[attr-defined]
            assert step > 2, "the add should need several write requests"
        assert store.count() == 24
        got = {r.id: r for r in store.get(ids[8:])}
        assert [got[i].text for i in ids[8:]] == new_texts
        assert got[ids[8]].metadata == {"lang": "xx", "n": 0}
        hits = store.search(replacement[3], mode="colbert", k=1)
        assert hits[0].id == ids[11]


class StoreContract(DataSafetyContract):
    """Subclass it and provide a ``store_factory`` fixture: ``make(fingerprint, **options)``
    returns a new, empty store (options: ``colbert_dtype``, ``max_colbert_vectors``, and
    ``name`` to reopen the same collection with another handle)."""

    #: Largest allowed difference of any score from the reference's.
    score_tol: float = 1e-5
    #: Whether the factory's stores accept ``name=`` to reopen an existing collection.
    can_reopen: bool = True
    #: Factory options that make the store write a batch in several requests of few documents.
    small_batch_options: dict[str, Any] = {}
    #: Whether an add is one write call whatever its size (in-memory; Elasticsearch: one bulk).
    one_write_call: bool = False

    @contextlib.contextmanager
    def failing_write(self, store: M3Store, step: int) -> Iterator[list[int]]:
        """Make the ``step``-th (1-based) write request of ``store`` fail once with the error
        its database client raises; yields a one-element list that ends up holding the number
        of write requests made. Subclasses override; the default skips."""
        pytest.skip("this adapter has no write-failure injection")
        yield [0]

    def store_state(self, store: M3Store) -> Any:
        """Everything a client of ``store`` could observe besides documents (e.g. leftover
        rows of a companion collection); compared before and after a failed add."""
        return None

    @pytest.fixture
    def store_factory(self) -> StoreFactory:  # pragma: no cover - subclasses provide it
        raise NotImplementedError

    @pytest.fixture
    def filled(self, store_factory: StoreFactory) -> tuple[M3Store, InMemoryStore]:
        store = store_factory(FINGERPRINT)
        reference = InMemoryStore(fingerprint=FINGERPRINT)
        ids, embeddings, texts, metadatas = synthetic_corpus()
        for target in (store, reference):
            # Two batches: a store must append, not replace.
            target.add(ids[:20], embeddings[:20], texts[:20], metadatas[:20])
            target.add(ids[20:], embeddings[20:], texts[20:], metadatas[20:])
        return store, reference

    def check_search(
        self, store: M3Store, reference: InMemoryStore, query: M3Embedding, params: SearchParams
    ) -> list[Hit]:
        expected = reference.search(query, params)
        single_leg_plain = len(params.legs) == 1 and params.rerank is None
        if single_leg_plain or params.k + 10 <= params.candidates:
            extended = reference.search(query, params.with_overrides(k=params.k + 10))
        else:
            extended = expected
        actual = store.search(query, params)
        assert_same_hits(actual, expected, extended, self.score_tol)
        return actual

    # --- searching ------------------------------------------------------------------------

    @pytest.mark.parametrize("case", list(SEARCH_CASES))
    def test_search_matches_reference(self, filled, case: str) -> None:
        store, reference = filled
        params = SearchParams(k=5, **SEARCH_CASES[case])
        _, embeddings, _, _ = synthetic_corpus()
        for query in synthetic_queries(embeddings):
            self.check_search(store, reference, query, params)

    @pytest.mark.parametrize("name", list(FILTERS))
    def test_filters_match_reference(self, filled, name: str) -> None:
        store, reference = filled
        spec = FILTERS[name]
        assert store.count(filter=spec) == reference.count(filter=spec)
        _, embeddings, _, _ = synthetic_corpus()
        query = synthetic_queries(embeddings)[0]
        for mode in ("dense", "sparse", "colbert", "hybrid"):
            hits = self.check_search(
                store, reference, query, SearchParams(mode=mode, k=50, candidates=60, filter=spec)
            )
            assert len(hits) <= reference.count(filter=spec)

    def test_k_larger_than_corpus(self, filled) -> None:
        store, reference = filled
        _, embeddings, _, _ = synthetic_corpus()
        query = synthetic_queries(embeddings)[1]
        hits = self.check_search(store, reference, query, SearchParams(mode="dense", k=500))
        assert len(hits) == reference.count()

    # --- writing --------------------------------------------------------------------------

    def test_ids_come_back_as_given(self, filled) -> None:
        store, _ = filled
        records = store.get(["1", 1, "doc-2", "no-such-id", 999])
        assert [(type(r.id), r.id) for r in records] == [(str, "1"), (int, 1), (str, "doc-2")]
        assert records[0].text == "passage number 1" and records[1].text == "passage number 3"

    def test_get_with_vectors_roundtrips(self, filled) -> None:
        store, reference = filled
        ids, embeddings, _, metadatas = synthetic_corpus()
        got = store.get(ids[:6], with_vectors=True)
        assert [r.id for r in got] == ids[:6]
        for i, record in enumerate(got):
            assert record.metadata == metadatas[i]
            emb = record.embedding
            assert emb is not None
            np.testing.assert_allclose(emb.dense, embeddings.dense[i], atol=1e-6)  # type: ignore[index]
            assert emb.sparse.keys() == embeddings.sparse[i].keys()  # type: ignore[union-attr,index]
            for token, weight in embeddings.sparse[i].items():  # type: ignore[index]
                assert math.isclose(emb.sparse[token], weight, rel_tol=5e-3)  # type: ignore[index]
            np.testing.assert_allclose(emb.colbert, embeddings.colbert[i], atol=1e-3)  # type: ignore[index,arg-type]

    def test_upsert_replaces_every_field(self, filled) -> None:
        store, reference = filled
        before = store.count()
        replacement = synthetic_embeddings(2, seed=99)
        for target in (store, reference):
            target.add(
                ["doc-2", 1], replacement, ["new text", "new int text"], [{"lang": "xx"}, None]
            )
        assert store.count() == before
        got = {r.id: r for r in store.get(["doc-2", 1], with_vectors=True)}
        assert got["doc-2"].text == "new text" and got["doc-2"].metadata == {"lang": "xx"}
        assert got[1].metadata == {}
        np.testing.assert_allclose(got["doc-2"].embedding.dense, replacement.dense[0], atol=1e-6)  # type: ignore[union-attr,index]
        assert got["doc-2"].embedding.colbert.shape == replacement.colbert[0].shape  # type: ignore[union-attr,index]
        assert store.count(filter={"lang": "xx"}) == 1
        # The replaced document is found by its new vectors, in every leg.
        query = replacement[0]
        for mode in ("dense", "sparse", "colbert", "hybrid"):
            hits = self.check_search(store, reference, query, SearchParams(mode=mode, k=3))
            assert hits[0].id == "doc-2"

    def test_delete_by_ids_and_by_filter(self, filled) -> None:
        store, reference = filled
        n = store.count()
        for target in (store, reference):
            target.delete(["doc-2", 1, "never-stored"])
        assert store.count() == n - 2
        assert store.get(["doc-2", 1]) == []
        ko = reference.count(filter={"lang": "ko"})
        assert ko > 0
        for target in (store, reference):
            target.delete(filter={"lang": "ko"})
        assert store.count() == n - 2 - ko
        assert store.count(filter={"lang": "ko"}) == 0
        _, embeddings, _, _ = synthetic_corpus()
        for query in synthetic_queries(embeddings)[:2]:
            for mode in ("dense", "sparse", "colbert", "hybrid"):
                hits = self.check_search(
                    store, reference, query, SearchParams(mode=mode, k=60, candidates=60)
                )
                assert all(h.metadata.get("lang") != "ko" for h in hits)
                assert {"doc-2", 1}.isdisjoint(h.id for h in hits)

    def test_empty_sparse_document_is_kept(self, filled) -> None:
        store, _ = filled
        ids, embeddings, _, _ = synthetic_corpus()
        record = store.get([ids[5]], with_vectors=True)[0]
        assert record.embedding is not None and record.embedding.sparse == {}
        hits = store.search(embeddings[5], mode="dense", k=1)
        assert hits[0].id == ids[5]

    def test_bad_input_is_refused_and_loses_nothing(self, filled) -> None:
        store, _ = filled
        n = store.count()
        good = synthetic_embeddings(2, seed=5)
        wrong_dim = M3Output(
            dense=np.ones((2, DENSE_DIM + 1), dtype=np.float32) / math.sqrt(DENSE_DIM + 1),
            sparse=good.sparse,
            colbert=good.colbert,
        )
        bad_batches = {
            "wrong dimension": (["new-a", "doc-4"], wrong_dim, ["a", "b"]),
            "duplicate ids": (["new-a", "new-a"], good, ["a", "b"]),
            "None text": (["new-a", "doc-4"], good, ["a", None]),
            "ids and rows differ": (["new-a"], good, ["a"]),
            "float id": ([1.5, "new-b"], good, ["a", "b"]),
        }
        for why, (ids, embeddings, texts) in bad_batches.items():
            with pytest.raises(StoreError):
                store.add(ids, embeddings, texts)
            assert store.count() == n, why
            assert store.get(["new-a"]) == [], why
            assert store.get(["doc-4"])[0].text == synthetic_corpus()[2][4], why

    def test_fingerprint_mismatch_is_an_error(self, store_factory: StoreFactory) -> None:
        if not self.can_reopen:
            pytest.skip("this store cannot reopen a collection")
        store = store_factory(FINGERPRINT, name="fp")
        store.add(["a"], synthetic_embeddings(1, seed=1), ["a"])
        with pytest.raises(FingerprintMismatchError):
            store_factory(OTHER_FINGERPRINT, name="fp")
        reopened = store_factory(FINGERPRINT, name="fp")
        assert reopened.get(["a"])[0].text == "a"

    def test_colbert_size_controls(self, store_factory: StoreFactory) -> None:
        options = {"colbert_dtype": "float16", "max_colbert_vectors": 3}
        store = store_factory(FINGERPRINT, **options)
        reference = InMemoryStore(fingerprint=FINGERPRINT, **options)
        ids, embeddings, texts, metadatas = synthetic_corpus()
        for target in (store, reference):
            target.add(ids, embeddings, texts, metadatas)
        for record in store.get(ids[:10], with_vectors=True):
            assert record.embedding is not None
            colbert = np.asarray(record.embedding.colbert, dtype=np.float32)
            assert len(colbert) <= 3
            # Stored values are the float16 roundings of the originals.
            original = embeddings.colbert[ids.index(record.id)][: len(colbert)]  # type: ignore[index]
            np.testing.assert_allclose(
                colbert, original.astype(np.float16).astype(np.float32), atol=1e-6
            )
        for query in synthetic_queries(embeddings)[:3]:
            self.check_search(store, reference, query, SearchParams(mode="colbert", k=5))
            self.check_search(
                store, reference, query, SearchParams(mode="hybrid", rerank="all", k=5)
            )

    def test_query_of_wrong_dimension_is_refused(self, filled) -> None:
        store, _ = filled
        bad = M3Embedding(
            dense=np.ones(DENSE_DIM + 2, dtype=np.float32),
            sparse={1: 0.1},
            colbert=np.ones((2, COLBERT_DIM)),
        )
        with pytest.raises(StoreError):
            store.search(bad, mode="dense")

    # --- listing, clearing, searching within ids ------------------------------------------

    def test_iter_records_lists_every_document(self, filled) -> None:
        store, reference = filled
        ids, embeddings, texts, metadatas = synthetic_corpus()
        try:
            listed = list(store.iter_records(batch_size=7))
        except NotImplementedError as exc:
            pytest.skip(str(exc))
        assert sorted(map(repr, (r.id for r in listed))) == sorted(map(repr, ids))
        assert len(listed) == len(ids)
        by_key = {(type(r.id), r.id): r for r in listed}
        for doc_id, text, meta in zip(ids, texts, metadatas):
            record = by_key[(type(doc_id), doc_id)]
            assert record.text == text and record.metadata == meta and record.embedding is None
        with_vectors = list(store.iter_records(with_vectors=True, batch_size=100))
        want = {(type(r.id), r.id): r for r in reference.get(ids, with_vectors=True)}
        for record in with_vectors:
            expected = want[(type(record.id), record.id)].embedding
            np.testing.assert_allclose(record.embedding.dense, expected.dense, atol=1e-6)
            assert record.embedding.sparse == pytest.approx(expected.sparse)
            np.testing.assert_allclose(record.embedding.colbert, expected.colbert, atol=1e-3)
        geo = Field("lang") == "en"
        filtered = [r.id for r in store.iter_records(filter=geo, batch_size=5)]
        assert sorted(map(repr, filtered)) == sorted(
            map(repr, (r.id for r in reference.iter_records(filter=geo)))
        )
        assert len(filtered) == reference.count(filter=geo) > 0

    def test_clear_deletes_everything_and_keeps_the_collection(self, filled) -> None:
        store, _ = filled
        store.clear()
        assert store.count() == 0
        ids, embeddings, texts, metadatas = synthetic_corpus()
        store.add(ids[:3], embeddings[:3], texts[:3], metadatas[:3])
        assert store.count() == 3

    @pytest.mark.parametrize(
        "options",
        [{"mode": "dense"}, {"mode": "hybrid", "rerank": "all"}, {"mode": "sparse"}],
        ids=["dense", "hybrid-all", "sparse"],
    )
    def test_search_within_ids_matches_reference(self, filled, options) -> None:
        store, reference = filled
        ids, embeddings, _, _ = synthetic_corpus()
        subset = [ids[i] for i in (0, 1, 3, 5, 8, 13, 21, 34)] + ["no-such-id"]
        query = synthetic_queries(embeddings)[0]
        params = SearchParams(k=5, candidates=20, **options)
        got = store.search_within(subset, query, params)
        # The reference: the same search over a store holding only those documents.
        only = InMemoryStore(fingerprint=FINGERPRINT)
        kept = [i for i in subset if i != "no-such-id"]
        positions = [ids.index(i) if isinstance(i, str) else _int_position(ids, i) for i in kept]
        only.add(kept, embeddings[positions])
        want = only.search(query, params)
        assert [(type(h.id), h.id) for h in got] == [(type(h.id), h.id) for h in want]
        assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=self.score_tol)
        assert all(h.id in kept for h in got)


def _int_position(ids: Sequence[DocId], doc_id: int) -> int:
    return next(i for i, x in enumerate(ids) if type(x) is int and x == doc_id)


def sigkill_edge_writer(path: Path, after_docs: int, **store_options: Any) -> int:
    """Start a process that adds 8 synthetic documents a step (ids ``s<step>-<i>``, the
    embeddings of ``synthetic_embeddings(8, seed=step)``) to a ``QdrantEdgeStore`` at ``path``,
    SIGKILL it once its ``add`` calls have returned ``after_docs`` documents or more, and return
    how many had returned."""
    root = Path(__file__).resolve().parents[1]
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(root / "tests")!r})
        from store_contract import FINGERPRINT, synthetic_embeddings
        from m3connect.stores.qdrant import QdrantEdgeStore
        store = QdrantEdgeStore({str(path)!r}, fingerprint=FINGERPRINT, **{store_options!r})
        for step in range(100000):
            ids = [f"s{{step}}-{{i}}" for i in range(8)]
            store.add(ids, synthetic_embeddings(8, seed=step))
            print(8 * (step + 1), flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert child.stdout is not None
    written = 0
    for line in child.stdout:
        written = int(line)
        if written >= after_docs:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    return written
