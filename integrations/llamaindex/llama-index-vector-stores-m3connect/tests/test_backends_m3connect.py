"""M3VectorStore on real database adapters: Qdrant (local mode) and Milvus Lite, in-process.

The tests skip when a client library is missing. Every answer must equal the in-memory
reference store's.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)
from llama_index.embeddings.m3connect import M3ConnectEmbedding
from llama_index.vector_stores.m3connect import SCORES_KEY, M3VectorStore

from m3connect.encoder import M3Encoder
from m3connect.store import M3Store
from m3connect.stores.memory import InMemoryStore
from tests.conftest import METADATAS, TEXTS

QUERY = "which city is the capital?"


@pytest.fixture(scope="module", params=["qdrant-local", "milvus-lite"])
def make_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, encoder: M3Encoder
) -> Iterator[Callable[[], M3Store]]:
    """A factory of empty stores (a new collection each) on one in-process database."""
    if request.param == "qdrant-local":
        qdrant_client = pytest.importorskip("qdrant_client")
        qdrant = pytest.importorskip("m3connect.stores.qdrant")
        client = qdrant_client.QdrantClient(":memory:")
        yield lambda: qdrant.QdrantStore(client, f"li-{uuid.uuid4().hex}", encoder=encoder)
    else:
        pymilvus = pytest.importorskip("pymilvus")
        pytest.importorskip("milvus_lite")
        milvus = pytest.importorskip("m3connect.stores.milvus")
        client = pymilvus.MilvusClient(str(tmp_path_factory.mktemp("milvus") / "milvus.db"))
        yield lambda: milvus.MilvusStore(client, f"li_{uuid.uuid4().hex}", encoder=encoder)
    client.close()


def assert_same_ranking(
    got: list[tuple[object, float]], want: list[tuple[object, float]], tol: float = 1e-4
) -> None:
    """``got`` ranks like the reference ranking ``want`` (ids and scores), up to ties: documents
    with equal scores may come in any order, and a tie at ``got``'s cut may keep any of them.
    ``want`` may be longer than ``got`` (to show the ties at the cut)."""
    assert len(got) <= len(want)
    assert [s for _, s in got] == pytest.approx([s for _, s in want[: len(got)]], abs=tol)
    start = 0
    while start < len(got):
        end = start
        while end + 1 < len(want) and abs(want[end + 1][1] - want[start][1]) <= tol:
            end += 1
        assert {i for i, _ in got[start : end + 1]} <= {i for i, _ in want[start : end + 1]}
        start = end + 1


def _index(store: M3Store, encoder: M3Encoder) -> tuple[M3VectorStore, VectorStoreIndex]:
    vector_store = M3VectorStore(store)
    documents = [
        Document(text=t, metadata=m, id_=f"source-{i}")
        for i, (t, m) in enumerate(zip(TEXTS, METADATAS, strict=True))
    ]
    index = VectorStoreIndex.from_documents(
        documents,
        storage_context=StorageContext.from_defaults(vector_store=vector_store),
        embed_model=M3ConnectEmbedding(encoder=encoder),
    )
    return vector_store, index


FILTERS = [
    None,
    MetadataFilters(filters=[MetadataFilter(key="lang", value="en", operator=FilterOperator.NE)]),
    MetadataFilters(
        filters=[
            MetadataFilter(key="topic", value="geo"),
            MetadataFilter(key="year", value=2016, operator=FilterOperator.LTE),
        ],
        condition=FilterCondition.OR,
    ),
    MetadataFilters(filters=[MetadataFilter(key="tags", value="fusion", operator="contains")]),
]


def test_same_answers_as_the_reference(
    make_store: Callable[[], M3Store], encoder: M3Encoder
) -> None:
    backend, index = _index(make_store(), encoder)
    reference, _ = _index(InMemoryStore(encoder=encoder), encoder)
    for mode in (
        VectorStoreQueryMode.DEFAULT,
        VectorStoreQueryMode.SPARSE,
        VectorStoreQueryMode.HYBRID,
    ):
        for filters in FILTERS:
            query = VectorStoreQuery(
                query_str=QUERY, similarity_top_k=3, mode=mode, filters=filters
            )
            got = backend.query(query)
            query.similarity_top_k = 8  # the reference's ties at the cut
            want = reference.query(query)
            assert len(got.nodes) == min(3, len(want.nodes))
            assert_same_ranking(
                list(zip([n.ref_doc_id for n in got.nodes], got.similarities, strict=True)),
                list(zip([n.ref_doc_id for n in want.nodes], want.similarities, strict=True)),
            )
            scores = {n.ref_doc_id: n.metadata[SCORES_KEY] for n in want.nodes}
            for node in got.nodes:
                if node.ref_doc_id in scores:
                    assert node.metadata[SCORES_KEY] == pytest.approx(
                        scores[node.ref_doc_id], abs=1e-4
                    )

    retrieved = index.as_retriever(similarity_top_k=2, vector_store_query_mode="hybrid").retrieve(
        QUERY
    )
    assert len(retrieved) == 2


def test_delete_get_and_clear(make_store: Callable[[], M3Store], encoder: M3Encoder) -> None:
    vector_store, index = _index(make_store(), encoder)
    assert len(vector_store.get_nodes()) == len(TEXTS)
    index.delete_ref_doc("source-5")
    assert {n.ref_doc_id for n in vector_store.get_nodes()} == {
        f"source-{i}" for i in range(8) if i != 5
    }

    geo = MetadataFilters(filters=[MetadataFilter(key="topic", value="geo")])
    assert {n.ref_doc_id for n in vector_store.get_nodes(filters=geo)} == {
        "source-4",
        "source-6",
        "source-7",
    }
    some = [n.node_id for n in vector_store.get_nodes() if n.ref_doc_id in ("source-0", "source-4")]
    vector_store.delete_nodes(some, filters=geo)  # only source-4 is geo
    assert {n.ref_doc_id for n in vector_store.get_nodes(filters=geo)} == {"source-6", "source-7"}
    assert len(vector_store.get_nodes()) == 6
    vector_store.clear()
    assert vector_store.get_nodes() == [] and vector_store.client.count() == 0
