"""LangChain's standard integration tests, on the exact in-memory m3connect store and a random
BGE-M3 checkpoint (no server needed)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from langchain_m3connect import M3Embeddings, M3HybridRetriever, M3VectorStore
from langchain_tests.integration_tests import (
    EmbeddingsIntegrationTests,
    RetrieversIntegrationTests,
    VectorStoreIntegrationTests,
)

from m3connect.store import SearchParams
from m3connect.stores.memory import InMemoryStore
from tests.support import METADATAS, TEXTS, shared_encoder


class TestM3EmbeddingsStandard(EmbeddingsIntegrationTests):
    @property
    def embeddings_class(self) -> type[M3Embeddings]:
        return M3Embeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"encoder": shared_encoder()}


class TestM3VectorStoreStandard(VectorStoreIntegrationTests):
    """The default search: hybrid (dense + sparse, RRF)."""

    search_params = SearchParams()

    @pytest.fixture
    def vectorstore(self) -> Iterator[M3VectorStore]:
        encoder = shared_encoder()
        yield M3VectorStore(
            InMemoryStore(encoder=encoder),
            M3Embeddings(encoder=encoder),
            search_params=self.search_params,
        )


class TestM3VectorStoreStandardRerankAll(TestM3VectorStoreStandard):
    """The paper's hybrid: dense + sparse candidates re-ranked with all three scores."""

    search_params = SearchParams(rerank="all", candidates=20)


class TestM3VectorStoreStandardColbert(TestM3VectorStoreStandard):
    """ColBERT (multi-vector) search alone."""

    search_params = SearchParams(mode="colbert")


class TestM3HybridRetrieverStandard(RetrieversIntegrationTests):
    _vectorstore: M3VectorStore | None = None

    @classmethod
    def filled_vectorstore(cls) -> M3VectorStore:
        if cls._vectorstore is None:
            encoder = shared_encoder()
            vectorstore = M3VectorStore(
                InMemoryStore(encoder=encoder), M3Embeddings(encoder=encoder)
            )
            vectorstore.add_texts(TEXTS, METADATAS)
            cls._vectorstore = vectorstore
        return cls._vectorstore

    @property
    def retriever_constructor(self) -> type[M3HybridRetriever]:
        return M3HybridRetriever

    @property
    def retriever_constructor_params(self) -> dict[str, Any]:
        return {"vectorstore": self.filled_vectorstore(), "k": 2}

    @property
    def retriever_query_example(self) -> str:
        return "how do hybrid retrieval systems combine scores?"
