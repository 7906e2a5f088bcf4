"""BGE-M3 sparse weights for ``llama-index-vector-stores-milvus``'s hybrid search.

.. code-block:: python

    from llama_index.core import Settings
    from llama_index.embeddings.m3connect import M3ConnectEmbedding
    from llama_index.embeddings.m3connect.milvus import M3MilvusSparseEmbeddingFunction
    from llama_index.vector_stores.milvus import MilvusVectorStore

    Settings.embed_model = embed_model = M3ConnectEmbedding("BAAI/bge-m3")
    vector_store = MilvusVectorStore(
        uri="./milvus.db", dim=1024, enable_sparse=True,
        sparse_embedding_function=M3MilvusSparseEmbeddingFunction(embed_model),
    )

The function shares ``embed_model``'s output cache: queries are encoded once for the dense and
the sparse search. Documents too, when their embedded text is their plain text: LlamaIndex's
Milvus store asks for the sparse weights of ``node.text``, while the embed model embeds the
text with the node's metadata (exclude it with ``excluded_embed_metadata_keys`` for one pass).
Needs ``pip install llama-index-embeddings-m3connect[milvus]``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.embeddings.m3connect.qdrant import _cached_encoder
from llama_index.vector_stores.milvus.utils import BaseSparseEmbeddingFunction

__all__ = ["M3MilvusSparseEmbeddingFunction"]


class M3MilvusSparseEmbeddingFunction(BaseSparseEmbeddingFunction):
    """LlamaIndex Milvus ``BaseSparseEmbeddingFunction`` of BGE-M3's lexical weights (token id
    -> weight; Milvus's ``IP`` metric on a sparse field is BGE-M3's lexical score).

    Args:
        embed_model: the :class:`~llama_index.embeddings.m3connect.M3ConnectEmbedding` that
            gives the dense vectors; its settings and output cache are used.
    """

    def __init__(self, embed_model: Any) -> None:
        self.cached = _cached_encoder(embed_model, type(self).__name__)
        self.cached.need("sparse")

    def encode_queries(self, queries: list[str]) -> list[dict[int, float]]:
        sparse = self.cached.encode_queries(list(queries), ("sparse",)).sparse
        assert sparse is not None
        return sparse

    def encode_documents(self, documents: list[str]) -> list[dict[int, float]]:
        sparse = self.cached.encode_documents(list(documents), ("sparse",)).sparse
        assert sparse is not None
        return sparse

    async def async_encode_queries(self, queries: list[str]) -> list[dict[int, float]]:
        return await asyncio.to_thread(self.encode_queries, queries)

    async def async_encode_documents(self, documents: list[str]) -> list[dict[int, float]]:
        return await asyncio.to_thread(self.encode_documents, documents)
