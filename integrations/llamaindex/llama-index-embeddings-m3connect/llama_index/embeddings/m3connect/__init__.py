"""LlamaIndex embeddings of m3connect: BGE-M3 dense vectors (and sparse + ColBERT on request),
plus BGE-M3 sparse weights for LlamaIndex's Qdrant and Milvus vector stores."""

from __future__ import annotations

import warnings
from typing import Any

from llama_index.embeddings.m3connect.base import M3ConnectEmbedding
from llama_index.embeddings.m3connect.qdrant import M3QdrantSparse

__all__ = ["M3ConnectEmbedding", "M3MilvusSparseEmbeddingFunction", "M3QdrantSparse"]


def __getattr__(name: str) -> Any:
    if name == "M3MilvusSparseEmbeddingFunction":
        # Imports llama-index-vector-stores-milvus (the [milvus] extra): only when asked for.
        from llama_index.embeddings.m3connect.milvus import M3MilvusSparseEmbeddingFunction

        return M3MilvusSparseEmbeddingFunction
    if name == "M3Embedding":
        warnings.warn(
            "llama_index.embeddings.m3connect.M3Embedding is renamed M3ConnectEmbedding (it "
            "clashed with m3connect.M3Embedding, one text's vectors)",
            DeprecationWarning,
            stacklevel=2,
        )
        return M3ConnectEmbedding
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
