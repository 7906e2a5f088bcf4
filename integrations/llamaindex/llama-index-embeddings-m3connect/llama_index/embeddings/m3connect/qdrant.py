"""BGE-M3 sparse weights for ``llama-index-vector-stores-qdrant``'s hybrid search.

.. code-block:: python

    from llama_index.core import Settings, StorageContext, VectorStoreIndex
    from llama_index.embeddings.m3connect import M3ConnectEmbedding, M3QdrantSparse
    from llama_index.vector_stores.qdrant import QdrantVectorStore

    Settings.embed_model = embed_model = M3ConnectEmbedding("BAAI/bge-m3")
    sparse = M3QdrantSparse(embed_model)
    vector_store = QdrantVectorStore(
        "docs", client=client, enable_hybrid=True,
        sparse_doc_fn=sparse.sparse_doc_fn, sparse_query_fn=sparse.sparse_query_fn,
    )

The functions share ``embed_model``'s output cache: LlamaIndex embeds each node's text with
the embed model, then the Qdrant store asks for its sparse weights, and the model runs once
per text. No import of Qdrant is needed: the functions return plain lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from m3connect.types import SparseWeights

__all__ = ["M3QdrantSparse"]


class M3QdrantSparse:
    """``sparse_doc_fn`` and ``sparse_query_fn`` for LlamaIndex's ``QdrantVectorStore``:
    BGE-M3's lexical weights as ``(indices, values)`` lists (Qdrant scores a document by the
    dot product with the query's weights, which is BGE-M3's lexical score).

    Args:
        embed_model: the :class:`~llama_index.embeddings.m3connect.M3ConnectEmbedding` that
            gives the dense vectors; its settings and output cache are used.
    """

    def __init__(self, embed_model: Any) -> None:
        self.cached = _cached_encoder(embed_model, type(self).__name__)
        # The dense requests that come first compute the sparse weights in the same pass.
        self.cached.need("sparse")

    def sparse_doc_fn(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[float]]]:
        """Sparse vectors of documents (a ``SparseEncoderCallable``)."""
        sparse = self.cached.encode_documents(list(texts), ("sparse",)).sparse
        assert sparse is not None
        return _lists(sparse)

    def sparse_query_fn(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[float]]]:
        """Sparse vectors of queries (a ``SparseEncoderCallable``)."""
        sparse = self.cached.encode_queries(list(texts), ("sparse",)).sparse
        assert sparse is not None
        return _lists(sparse)


def _lists(batch: Sequence[SparseWeights]) -> tuple[list[list[int]], list[list[float]]]:
    indices, values = [], []
    for weights in batch:
        tokens = sorted(weights)
        indices.append(tokens)
        values.append([float(weights[t]) for t in tokens])
    return indices, values


def _cached_encoder(embed_model: Any, who: str) -> Any:
    from llama_index.embeddings.m3connect.base import M3ConnectEmbedding

    if not isinstance(embed_model, M3ConnectEmbedding):
        raise TypeError(f"{who} takes an M3ConnectEmbedding, got {type(embed_model).__name__}")
    return embed_model.cached_encoder
