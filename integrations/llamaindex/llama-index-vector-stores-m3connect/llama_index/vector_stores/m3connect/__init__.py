"""LlamaIndex vector store of m3connect: BGE-M3 dense, sparse, ColBERT and hybrid search over
any m3connect store (in-memory, Qdrant, Milvus, Elasticsearch)."""

from llama_index.vector_stores.m3connect.base import (
    SCORES_KEY,
    M3VectorStore,
    hit_to_node,
    record_to_node,
    to_m3_filter,
)

__all__ = ["SCORES_KEY", "M3VectorStore", "hit_to_node", "record_to_node", "to_m3_filter"]
