"""The LangChain vector store on real database adapters: Qdrant (local mode) and Milvus Lite.

Both run in-process, no server needed; the tests skip when the client library is missing.
Each adapter must pass LangChain's standard tests and give the in-memory reference store's
answers through :class:`M3VectorStore`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from langchain_m3connect import SCORES_KEY, M3Embeddings, M3HybridRetriever, M3VectorStore
from langchain_tests.integration_tests import VectorStoreIntegrationTests

from m3connect.store import M3Store
from m3connect.stores.memory import InMemoryStore
from tests.support import METADATAS, TEXTS, assert_same_ranking, shared_encoder


@pytest.fixture(scope="module", params=["qdrant-local", "milvus-lite"])
def make_store(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], M3Store]]:
    """A factory of empty stores (a new collection each) on one in-process database."""
    if request.param == "qdrant-local":
        qdrant_client = pytest.importorskip("qdrant_client")
        qdrant = pytest.importorskip("m3connect.stores.qdrant")
        client = qdrant_client.QdrantClient(":memory:")
        yield lambda: qdrant.QdrantStore(client, f"lc-{uuid.uuid4().hex}", encoder=shared_encoder())
    else:
        pymilvus = pytest.importorskip("pymilvus")
        pytest.importorskip("milvus_lite")
        milvus = pytest.importorskip("m3connect.stores.milvus")
        client = pymilvus.MilvusClient(str(tmp_path_factory.mktemp("milvus") / "milvus.db"))
        yield lambda: milvus.MilvusStore(client, f"lc_{uuid.uuid4().hex}", encoder=shared_encoder())
    client.close()


class TestBackendsStandard(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self, make_store: Callable[[], M3Store]) -> M3VectorStore:
        return M3VectorStore(make_store(), M3Embeddings(encoder=shared_encoder()))


SEARCHES: list[dict[str, Any]] = [
    {},
    {"mode": "sparse"},
    {"mode": "colbert"},
    {"rerank": "all", "filter": {"year": {"$gte": 2016}}},
    {"fusion": "weighted", "hybrid_legs": ("dense", "sparse", "colbert"), "rerank": "colbert"},
]


def test_same_answers_as_the_reference(make_store: Callable[[], M3Store]) -> None:
    embeddings = M3Embeddings(encoder=shared_encoder())
    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    backend = M3VectorStore(make_store(), embeddings)
    reference = M3VectorStore(InMemoryStore(encoder=shared_encoder()), embeddings)
    for vectorstore in (backend, reference):
        vectorstore.add_texts(TEXTS, METADATAS, ids=ids)
    query = "which city is the capital?"
    for options in SEARCHES:
        got = backend.similarity_search_with_score(query, k=4, **options)
        want = reference.similarity_search_with_score(query, k=8, **options)  # ties at the cut
        assert len(got) == min(4, len(want))
        assert_same_ranking([(d.id, s) for d, s in got], [(d.id, s) for d, s in want])
        scores = {ref.id: ref.metadata[SCORES_KEY] for ref, _ in want}
        for doc, _ in got:
            if doc.id in scores:
                assert doc.metadata[SCORES_KEY] == pytest.approx(scores[doc.id], abs=1e-4)
    docs = M3HybridRetriever(vectorstore=backend, k=3).invoke(query)
    refs = reference.as_hybrid_retriever(k=6).invoke(query)
    assert_same_ranking(
        [(d.id, d.metadata["m3_score"]) for d in docs],
        [(d.id, d.metadata["m3_score"]) for d in refs],
    )
