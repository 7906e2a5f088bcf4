from __future__ import annotations

import pytest
from langchain_m3connect import M3Embeddings, M3VectorStore

from m3connect.encoder import M3Encoder
from m3connect.stores.memory import InMemoryStore
from tests.support import METADATAS, TEXTS, shared_encoder


@pytest.fixture(scope="session")
def encoder() -> M3Encoder:
    return shared_encoder()


@pytest.fixture(scope="session")
def embeddings(encoder: M3Encoder) -> M3Embeddings:
    return M3Embeddings(encoder=encoder)


@pytest.fixture
def store(encoder: M3Encoder) -> InMemoryStore:
    return InMemoryStore(encoder=encoder)


@pytest.fixture
def filled_vs(store: InMemoryStore, embeddings: M3Embeddings) -> M3VectorStore:
    vs = M3VectorStore(store, embeddings)
    vs.add_texts(TEXTS, METADATAS, ids=[f"doc-{i}" for i in range(len(TEXTS))])
    return vs
