"""LlamaIndex retriever of m3connect: BGE-M3 hybrid search with ColBERT / all-score re-rank."""

from llama_index.retrievers.m3connect.base import M3HybridRetriever

__all__ = ["M3HybridRetriever"]
