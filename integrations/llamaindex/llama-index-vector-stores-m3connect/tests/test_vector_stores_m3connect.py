"""M3VectorStore: LlamaIndex nodes in any m3connect store, answered by the store's search."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.core.llms import MockLLM
from llama_index.core.schema import MetadataMode, NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)
from llama_index.core.vector_stores.utils import build_metadata_filter_fn
from llama_index.embeddings.m3connect import M3ConnectEmbedding
from llama_index.vector_stores.m3connect import SCORES_KEY, M3VectorStore, to_m3_filter

from m3connect.encoder import M3Encoder
from m3connect.filters import matches
from m3connect.fingerprint import FingerprintMismatchError, ModelFingerprint
from m3connect.store import SearchParams
from m3connect.stores.memory import InMemoryStore
from tests.conftest import METADATAS, TEXTS

QUERY = "how are dense, sparse and multi vector scores combined?"


def _nodes() -> list[TextNode]:
    nodes = []
    for i, (text, meta) in enumerate(zip(TEXTS, METADATAS, strict=True)):
        node = TextNode(id_=f"node-{i}", text=text, metadata=dict(meta))
        node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=f"doc-{i // 2}")
        nodes.append(node)
    return nodes


@pytest.fixture
def store(encoder: M3Encoder) -> InMemoryStore:
    return InMemoryStore(encoder=encoder)


@pytest.fixture
def vector_store(store: InMemoryStore) -> M3VectorStore:
    vs = M3VectorStore(store)
    vs.add(_nodes())
    return vs


def _ids(result: Any) -> list[str]:
    return [n.node_id for n in result.nodes]


def test_is_a_llamaindex_vector_store(vector_store: M3VectorStore, store: InMemoryStore) -> None:
    assert isinstance(vector_store, BasePydanticVectorStore)
    assert vector_store.stores_text and not vector_store.is_embedding_query
    assert vector_store.client is store
    assert M3VectorStore.class_name() == "M3VectorStore"


def test_add_encodes_once_and_nodes_round_trip(
    store: InMemoryStore, encoder: M3Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    original = encoder.encode

    def counting_encode(texts: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return original(texts, **kwargs)

    vector_store = M3VectorStore(store)
    nodes = _nodes()
    nodes[0].embedding = [0.0] * 3  # another model's vector: not stored
    monkeypatch.setattr(encoder, "encode", counting_encode)
    assert vector_store.add(nodes) == [n.node_id for n in nodes]
    monkeypatch.undo()
    assert len(calls) == 1

    embed_texts = [n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
    expected = encoder.encode(embed_texts)
    records = store.get([n.node_id for n in nodes], with_vectors=True)
    for i, record in enumerate(records):
        assert record.text == TEXTS[i]
        assert record.metadata["ref_doc_id"] == f"doc-{i // 2}"
        assert np.allclose(record.embedding.dense, expected.dense[i])
        assert record.embedding.sparse == pytest.approx(expected.sparse[i])
        assert np.allclose(record.embedding.colbert, expected.colbert[i])

    got = vector_store.get_nodes(["node-3", "missing", "node-0"])
    assert [n.node_id for n in got] == ["node-3", "node-0"]
    assert got[0].get_content() == TEXTS[3] and got[0].metadata == METADATAS[3]
    assert got[0].ref_doc_id == "doc-1"
    assert vector_store.add([]) == []


QUERIES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({}, {"mode": "dense"}),
    ({"mode": VectorStoreQueryMode.SPARSE}, {"mode": "sparse"}),
    ({"mode": VectorStoreQueryMode.TEXT_SEARCH}, {"mode": "sparse"}),
    ({"mode": VectorStoreQueryMode.HYBRID}, {"mode": "hybrid"}),
    (
        {"mode": VectorStoreQueryMode.HYBRID, "alpha": 0.7},
        {"mode": "hybrid", "fusion": "weighted", "weights": (0.7, 0.3, 0.4)},
    ),
    ({"mode": VectorStoreQueryMode.HYBRID, "hybrid_top_k": 2}, {"mode": "hybrid", "k": 2}),
    ({"mode": VectorStoreQueryMode.SPARSE, "sparse_top_k": 3}, {"mode": "sparse", "k": 3}),
    (
        {"doc_ids": ["doc-0", "doc-2"]},
        {"mode": "dense", "filter": {"ref_doc_id": {"$in": ["doc-0", "doc-2"]}}},
    ),
]


@pytest.mark.parametrize(("query_fields", "expected"), QUERIES, ids=[str(q[0]) for q in QUERIES])
def test_query_equals_the_stores_search(
    vector_store: M3VectorStore,
    store: InMemoryStore,
    query_fields: dict[str, Any],
    expected: dict[str, Any],
) -> None:
    query = VectorStoreQuery(query_str=QUERY, similarity_top_k=4, **query_fields)
    hits = store.search(QUERY, SearchParams(**{"k": 4, **expected}))
    assert hits
    result = vector_store.query(query)
    assert _ids(result) == [str(h.id) for h in hits] == result.ids
    assert result.similarities == pytest.approx([h.score for h in hits])
    for node, hit in zip(result.nodes, hits, strict=True):
        assert node.metadata[SCORES_KEY] == pytest.approx(hit.scores)
        assert SCORES_KEY not in node.get_content(metadata_mode=MetadataMode.LLM)
        assert SCORES_KEY not in node.get_content(metadata_mode=MetadataMode.EMBED)


def test_default_mode_follows_search_params(store: InMemoryStore) -> None:
    params = SearchParams(mode="hybrid", rerank="all", candidates=6)
    vector_store = M3VectorStore(store, search_params=params)
    vector_store.add(_nodes())
    result = vector_store.query(VectorStoreQuery(query_str=QUERY, similarity_top_k=3))
    hits = store.search(QUERY, params, k=3)
    assert _ids(result) == [str(h.id) for h in hits]
    assert set(result.nodes[0].metadata[SCORES_KEY]) == {"dense", "sparse", "colbert"}


def test_query_by_dense_vector_and_unsupported_queries(
    vector_store: M3VectorStore, store: InMemoryStore, encoder: M3Encoder
) -> None:
    vector = encoder.encode_query(QUERY).dense.tolist()
    result = vector_store.query(VectorStoreQuery(query_embedding=vector, similarity_top_k=3))
    assert _ids(result) == [str(h.id) for h in store.search(QUERY, mode="dense", k=3)]
    with pytest.raises(ValueError, match="dense"):
        vector_store.query(
            VectorStoreQuery(query_embedding=vector, mode=VectorStoreQueryMode.HYBRID)
        )
    with pytest.raises(NotImplementedError):
        vector_store.query(VectorStoreQuery(query_str=QUERY, mode=VectorStoreQueryMode.SVM))
    with pytest.raises(ValueError):
        vector_store.query(VectorStoreQuery(similarity_top_k=2))


def test_node_ids_restrict_the_search_exactly(
    vector_store: M3VectorStore, store: InMemoryStore
) -> None:
    subset = ["node-1", "node-4", "node-6", "node-7"]
    query = VectorStoreQuery(
        query_str=QUERY, node_ids=subset, similarity_top_k=3, mode=VectorStoreQueryMode.HYBRID
    )
    result = vector_store.query(query)
    reference = InMemoryStore()
    records = store.get(subset, with_vectors=True)
    from m3connect.types import M3Output

    reference.add(
        [r.id for r in records],
        M3Output.from_embeddings([r.embedding for r in records]),
        [r.text for r in records],
        [r.metadata for r in records],
    )
    assert _ids(result) == [
        str(h.id) for h in reference.search(store.encoder.encode_query(QUERY), k=3)
    ]
    assert set(_ids(result)) <= set(subset)


# LlamaIndex's reference semantics (SimpleVectorStore) against m3connect's, on the operators
# both define the same way.
FILTERS = [
    MetadataFilters(filters=[MetadataFilter(key="lang", value="en")]),
    MetadataFilters(filters=[MetadataFilter(key="lang", value="en", operator=FilterOperator.NE)]),
    MetadataFilters(filters=[MetadataFilter(key="year", value=2017, operator=FilterOperator.GT)]),
    MetadataFilters(filters=[MetadataFilter(key="year", value=2017, operator=FilterOperator.GTE)]),
    MetadataFilters(filters=[MetadataFilter(key="year", value=2016, operator=FilterOperator.LT)]),
    MetadataFilters(filters=[MetadataFilter(key="year", value=2016, operator=FilterOperator.LTE)]),
    MetadataFilters(
        filters=[MetadataFilter(key="lang", value=["de", "zh"], operator=FilterOperator.IN)]
    ),
    MetadataFilters(
        filters=[MetadataFilter(key="lang", value=["de", "zh"], operator=FilterOperator.NIN)]
    ),
    MetadataFilters(
        filters=[MetadataFilter(key="tags", value=["fusion", "x"], operator=FilterOperator.ANY)]
    ),
    MetadataFilters(
        filters=[
            MetadataFilter(key="tags", value=["fusion", "hybrid"], operator=FilterOperator.ALL)
        ]
    ),
    MetadataFilters(
        filters=[MetadataFilter(key="tags", value=["fusion", "x"], operator=FilterOperator.ALL)]
    ),
    MetadataFilters(
        filters=[MetadataFilter(key="tags", value="hybrid", operator=FilterOperator.CONTAINS)]
    ),
    MetadataFilters(
        filters=[
            MetadataFilter(key="topic", value="geo"),
            MetadataFilter(key="year", value=2016, operator=">"),
        ],
        condition=FilterCondition.AND,
    ),
    MetadataFilters(
        filters=[MetadataFilter(key="lang", value="zh"), MetadataFilter(key="year", value=2021)],
        condition=FilterCondition.OR,
    ),
    MetadataFilters(
        filters=[
            MetadataFilter(key="lang", value="zh"),
            MetadataFilter(key="topic", value="retrieval"),
        ],
        condition=FilterCondition.NOT,
    ),
]


@pytest.mark.parametrize("filters", FILTERS, ids=range(len(FILTERS)))
def test_filters_mean_what_llamaindex_means(
    vector_store: M3VectorStore, store: InMemoryStore, filters: MetadataFilters
) -> None:
    by_id = {f"node-{i}": meta for i, meta in enumerate(METADATAS)}
    llama_says = {i for i in by_id if build_metadata_filter_fn(by_id.__getitem__, filters)(i)}
    condition = to_m3_filter(filters)
    assert {i for i, meta in by_id.items() if matches(condition, meta)} == llama_says

    result = vector_store.query(
        VectorStoreQuery(query_str=QUERY, similarity_top_k=8, filters=filters)
    )
    assert set(_ids(result)) == llama_says
    assert {n.node_id for n in vector_store.get_nodes(filters=filters)} == llama_says


def test_nested_filters_and_untranslatable_operators() -> None:
    nested = MetadataFilters(
        filters=[
            MetadataFilter(key="topic", value="geo"),
            MetadataFilters(
                filters=[
                    MetadataFilter(key="lang", value="de"),
                    MetadataFilter(key="lang", value="zh"),
                ],
                condition=FilterCondition.OR,
            ),
        ]
    )
    condition = to_m3_filter(nested)
    assert [i for i, m in enumerate(METADATAS) if matches(condition, m)] == [6, 7]
    assert to_m3_filter(None) is None and to_m3_filter(MetadataFilters(filters=[])) is None
    with pytest.raises(NotImplementedError):
        to_m3_filter(
            MetadataFilters(filters=[MetadataFilter(key="lang", value="e", operator="text_match")])
        )


def test_delete_nodes_get_nodes_and_clear(
    vector_store: M3VectorStore, store: InMemoryStore
) -> None:
    assert len(vector_store.get_nodes()) == 8
    vector_store.delete("doc-0")  # node-0 and node-1
    assert store.count() == 6 and not store.get(["node-0", "node-1"])
    geo = MetadataFilters(filters=[MetadataFilter(key="topic", value="geo")])
    vector_store.delete_nodes(["node-2", "node-4"], filters=geo)  # only node-4 is geo
    assert sorted(n.node_id for n in vector_store.get_nodes()) == [
        "node-2",
        "node-3",
        "node-5",
        "node-6",
        "node-7",
    ]
    vector_store.delete_nodes(filters=geo)
    assert sorted(n.node_id for n in vector_store.get_nodes()) == ["node-2", "node-3"]
    vector_store.delete_nodes(["node-2"])
    assert [n.node_id for n in vector_store.get_nodes()] == ["node-3"]
    with pytest.raises(ValueError):
        vector_store.delete_nodes()
    vector_store.clear()
    assert store.count() == 0 and vector_store.get_nodes() == []


def test_documents_added_outside_llamaindex_come_back_as_text_nodes(
    store: InMemoryStore,
) -> None:
    store.add_texts(["a plain m3connect document"], ids=[42], metadatas=[{"lang": "en"}])
    vector_store = M3VectorStore(store)
    (node,) = vector_store.query(
        VectorStoreQuery(query_str="plain document", similarity_top_k=1)
    ).nodes
    assert isinstance(node, TextNode) and node.node_id == "42"
    assert node.get_content() == "a plain m3connect document" and node.metadata["lang"] == "en"


def test_vector_store_index_answers_and_deletes_by_ref_doc(
    store: InMemoryStore, encoder: M3Encoder
) -> None:
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
    assert store.count() == len(TEXTS)

    top = index.as_retriever(similarity_top_k=1).retrieve(TEXTS[5])
    assert top[0].node.ref_doc_id == "source-5"

    retriever = index.as_retriever(
        similarity_top_k=3,
        vector_store_query_mode="hybrid",
        filters=MetadataFilters(filters=[MetadataFilter(key="topic", value="geo")]),
    )
    got = retriever.retrieve("capital city")
    assert len(got) == 3 and all(n.node.metadata["topic"] == "geo" for n in got)
    assert all(set(n.node.metadata[SCORES_KEY]) == {"dense", "sparse"} for n in got)

    response = index.as_query_engine(llm=MockLLM(), similarity_top_k=2).query("capital of France")
    assert len(response.source_nodes) == 2

    index.delete_ref_doc("source-5")
    assert store.count() == len(TEXTS) - 1
    assert all(
        n.node.ref_doc_id != "source-5"
        for n in index.as_retriever(similarity_top_k=8).retrieve(TEXTS[5])
    )


def test_search_returns_scored_nodes(vector_store: M3VectorStore, store: InMemoryStore) -> None:
    filters = MetadataFilters(filters=[MetadataFilter(key="lang", value="en")])
    got = vector_store.search(QUERY, mode="hybrid", rerank="colbert", k=3, filter=filters)
    hits = store.search(QUERY, mode="hybrid", rerank="colbert", k=3, filter={"lang": "en"})
    assert [n.node.node_id for n in got] == [str(h.id) for h in hits]
    assert [n.score for n in got] == pytest.approx([h.score for h in hits])


def test_needs_a_compatible_encoder(encoder: M3Encoder) -> None:
    with pytest.raises(ValueError, match="encoder"):
        M3VectorStore(InMemoryStore())
    other = InMemoryStore(fingerprint=ModelFingerprint("other", 16, 12, heads_sha256="b" * 64))
    with pytest.raises(FingerprintMismatchError):
        M3VectorStore(other, encoder=encoder)
    assert (
        M3VectorStore(InMemoryStore(), encoder=M3ConnectEmbedding(encoder=encoder)).encoder
        is encoder
    )
    with pytest.raises(TypeError):
        M3VectorStore(InMemoryStore(), encoder="BAAI/bge-m3")


async def test_async_matches_sync(store: InMemoryStore) -> None:
    vector_store = M3VectorStore(store)
    await vector_store.async_add(_nodes())
    assert store.count() == 8
    for fields in ({}, {"mode": VectorStoreQueryMode.HYBRID}, {"node_ids": ["node-1", "node-2"]}):
        query = VectorStoreQuery(query_str=QUERY, similarity_top_k=3, **fields)
        sync, got = vector_store.query(query), await vector_store.aquery(query)
        assert got.ids == sync.ids and got.similarities == pytest.approx(sync.similarities)
    assert [n.node_id for n in await vector_store.aget_nodes(["node-1"])] == ["node-1"]
    await vector_store.adelete("doc-1")
    assert store.count() == 6
    await vector_store.adelete_nodes(["node-0"])
    assert store.count() == 5
    got = await vector_store.asearch(QUERY, k=2)
    assert [n.node.node_id for n in got] == [
        n.node.node_id for n in vector_store.search(QUERY, k=2)
    ]
    await vector_store.aclear()
    assert store.count() == 0


@pytest.mark.parametrize("use_async", [False, True])
async def test_from_documents_encodes_each_node_once_with_the_embed_models_settings(
    encoder: M3Encoder, use_async: bool
) -> None:
    from m3connect.testing import ForwardPassCounter

    store = InMemoryStore(encoder=encoder)
    embed_model = M3ConnectEmbedding(encoder=encoder, encode_kwargs={"max_length": 8})
    vector_store = M3VectorStore(store, encoder=embed_model)
    documents = [Document(text=t, metadata=m) for t, m in zip(TEXTS, METADATAS, strict=True)]
    storage = StorageContext.from_defaults(vector_store=vector_store)
    with ForwardPassCounter(encoder) as passes:
        index = VectorStoreIndex.from_documents(
            documents, storage_context=storage, embed_model=embed_model, use_async=use_async
        )
        assert store.count() == len(TEXTS)
        assert passes.texts == len(TEXTS)
        passes.reset()
        retriever = index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=3)
        got = await retriever.aretrieve(QUERY) if use_async else retriever.retrieve(QUERY)
        assert passes.texts == 1 and len(got) == 3

    # The embed model's encode_kwargs are the store's: max_length=8 keeps 7 ColBERT rows.
    records = store.get([n.node_id for n in vector_store.get_nodes()], with_vectors=True)
    assert records and all(r.embedding.colbert.shape[0] <= 7 for r in records)
    node = vector_store.get_nodes()[0]
    want = encoder.encode([node.get_content(metadata_mode=MetadataMode.EMBED)], max_length=8)
    stored = store.get([node.node_id], with_vectors=True)[0].embedding
    assert stored.sparse == want.sparse[0]
    np.testing.assert_allclose(stored.dense, want.dense[0], atol=1e-6)


def test_store_refuses_its_own_encode_kwargs_with_an_embed_model(encoder: M3Encoder) -> None:
    with pytest.raises(ValueError, match="embed model"):
        M3VectorStore(
            InMemoryStore(),
            encoder=M3ConnectEmbedding(encoder=encoder),
            encode_kwargs={"max_length": 8},
        )
    with pytest.raises(TypeError, match="max_lenght"):
        M3VectorStore(InMemoryStore(), encoder=encoder, encode_kwargs={"max_lenght": 8})


def test_mmr_query_mode(vector_store: M3VectorStore, store: InMemoryStore) -> None:
    from llama_index.core.indices.query.embedding_utils import get_top_k_mmr_embeddings

    def mmr(threshold: float) -> list[str]:
        query = VectorStoreQuery(query_str=QUERY, similarity_top_k=2, mode=VectorStoreQueryMode.MMR)
        return _ids(vector_store.query(query, mmr_threshold=threshold))

    # Relevance only: the dense ranking.
    dense = store.search(QUERY, mode="dense", k=2)
    assert mmr(1.0) == [str(h.id) for h in dense]
    # Otherwise LlamaIndex's MMR over the 8 best candidates' stored dense vectors.
    candidates = store.search(QUERY, mode="dense", k=8)
    records = store.get([h.id for h in candidates], with_vectors=True)
    query_dense = vector_store.encoder.encode_query(QUERY).dense
    _, chosen = get_top_k_mmr_embeddings(
        query_dense.tolist(),
        [r.embedding.dense.tolist() for r in records],
        similarity_top_k=2,
        embedding_ids=[str(r.id) for r in records],
        mmr_threshold=0.1,
    )
    assert mmr(0.1) == chosen
    retriever = VectorStoreIndex.from_vector_store(
        vector_store, embed_model=M3ConnectEmbedding(encoder=vector_store.encoder)
    ).as_retriever(
        vector_store_query_mode="mmr",
        similarity_top_k=2,
        vector_store_kwargs={"mmr_threshold": 0.1},
    )
    assert [n.node.node_id for n in retriever.retrieve(QUERY)] == chosen


def test_get_nodes_and_clear_use_the_store_operations(
    vector_store: M3VectorStore, store: InMemoryStore
) -> None:
    assert sorted(n.node_id for n in vector_store.get_nodes()) == sorted(
        f"node-{i}" for i in range(len(TEXTS))
    )
    geo = MetadataFilters(filters=[MetadataFilter(key="topic", value="geo")])
    assert {n.node_id for n in vector_store.get_nodes(filters=geo)} == {
        str(r.id) for r in store.iter_records(filter={"topic": "geo"})
    }
    vector_store.clear()
    assert store.count() == 0 and vector_store.get_nodes() == []


def test_a_bare_node_id_is_one_id(vector_store: M3VectorStore, store: InMemoryStore) -> None:
    """Issue 15: ``delete_nodes("abc")`` deletes ``abc``, never ``a``, ``b`` and ``c``."""
    before = store.count()
    vector_store.add([TextNode(id_=i, text=f"text {i}") for i in ("a", "b", "c", "abc")])
    assert [n.node_id for n in vector_store.get_nodes("abc")] == ["abc"]  # type: ignore[arg-type]
    vector_store.delete_nodes("abc")  # type: ignore[arg-type]
    assert sorted(n.node_id for n in vector_store.get_nodes(["a", "b", "c", "abc"])) == [
        "a",
        "b",
        "c",
    ]
    assert store.count() == before + 3
