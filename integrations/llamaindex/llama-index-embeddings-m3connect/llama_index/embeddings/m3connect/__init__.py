"""LlamaIndex embeddings of m3connect: BGE-M3 dense vectors (and sparse + ColBERT on request)."""

from llama_index.embeddings.m3connect.base import M3Embedding

__all__ = ["M3Embedding"]
