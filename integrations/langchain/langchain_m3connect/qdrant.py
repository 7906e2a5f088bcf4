"""BGE-M3 sparse weights for ``langchain-qdrant``'s hybrid search.

.. code-block:: python

    from langchain_qdrant import QdrantVectorStore, RetrievalMode
    from langchain_m3connect import M3Embeddings
    from langchain_m3connect.qdrant import M3QdrantSparseEmbeddings

    dense = M3Embeddings(model_name="BAAI/bge-m3")
    store = QdrantVectorStore.from_texts(
        texts, dense, sparse_embedding=M3QdrantSparseEmbeddings(dense),
        retrieval_mode=RetrievalMode.HYBRID, location=":memory:", collection_name="docs",
    )

The sparse embeddings share ``dense``'s output cache: Qdrant asks for the dense vectors and
then the sparse weights of the same texts, and the model runs once per text. Needs
``pip install langchain-m3connect[qdrant]``.
"""

from __future__ import annotations

from langchain_core.runnables.config import run_in_executor
from langchain_qdrant import SparseEmbeddings, SparseVector

from langchain_m3connect.embeddings import M3Embeddings
from m3connect.types import SparseWeights

__all__ = ["M3QdrantSparseEmbeddings"]


class M3QdrantSparseEmbeddings(SparseEmbeddings):
    """``langchain_qdrant.SparseEmbeddings`` of BGE-M3's lexical weights (token id -> weight,
    the weights the model's sparse head gives; Qdrant scores a document by the dot product
    with the query's weights, which is BGE-M3's lexical score).

    Args:
        embeddings: the :class:`~langchain_m3connect.M3Embeddings` that gives the dense
            vectors; its settings and output cache are used, so each text is encoded once.
    """

    def __init__(self, embeddings: M3Embeddings) -> None:
        if not isinstance(embeddings, M3Embeddings):
            raise TypeError(
                f"M3QdrantSparseEmbeddings takes an M3Embeddings, got {type(embeddings).__name__}"
            )
        self.embeddings = embeddings
        # The dense requests that come first compute the sparse weights in the same pass.
        embeddings.cached_encoder.need("sparse")

    def embed_documents(self, texts: list[str]) -> list[SparseVector]:
        sparse = self.embeddings.cached_encoder.encode_documents(list(texts), ("sparse",)).sparse
        assert sparse is not None
        return [_vector(w) for w in sparse]

    def embed_query(self, text: str) -> SparseVector:
        sparse = self.embeddings.cached_encoder.encode_query(text, ("sparse",)).sparse
        assert sparse is not None
        return _vector(sparse)

    async def aembed_documents(self, texts: list[str]) -> list[SparseVector]:
        return await run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> SparseVector:
        return await run_in_executor(None, self.embed_query, text)


def _vector(weights: SparseWeights) -> SparseVector:
    tokens = sorted(weights)
    return SparseVector(indices=tokens, values=[float(weights[t]) for t in tokens])
