"""BGE-M3 sparse weights for ``langchain-milvus``'s hybrid search.

.. code-block:: python

    from langchain_milvus import Milvus
    from langchain_m3connect import M3Embeddings
    from langchain_m3connect.milvus import M3MilvusSparseEmbedding

    dense = M3Embeddings(model_name="BAAI/bge-m3")
    store = Milvus.from_texts(
        texts, [dense, M3MilvusSparseEmbedding(dense)],
        vector_field=["dense", "sparse"], connection_args={"uri": "./milvus.db"},
    )
    docs = store.similarity_search("query", k=4, ranker_type="rrf")

The sparse embedding shares ``dense``'s output cache: Milvus asks for the dense vectors and
then the sparse weights of the same texts, and the model runs once per text. Needs
``pip install langchain-m3connect[milvus]``.
"""

from __future__ import annotations

from langchain_core.runnables.config import run_in_executor
from langchain_milvus.utils.sparse import BaseSparseEmbedding

from langchain_m3connect.embeddings import M3Embeddings

__all__ = ["M3MilvusSparseEmbedding"]


class M3MilvusSparseEmbedding(BaseSparseEmbedding):
    """``langchain_milvus`` ``BaseSparseEmbedding`` of BGE-M3's lexical weights (token id ->
    weight; Milvus's ``IP`` metric on a sparse field is BGE-M3's lexical score).

    Args:
        embeddings: the :class:`~langchain_m3connect.M3Embeddings` that gives the dense
            vectors; its settings and output cache are used, so each text is encoded once.
    """

    def __init__(self, embeddings: M3Embeddings) -> None:
        if not isinstance(embeddings, M3Embeddings):
            raise TypeError(
                f"M3MilvusSparseEmbedding takes an M3Embeddings, got {type(embeddings).__name__}"
            )
        self.embeddings = embeddings
        # The dense requests that come first compute the sparse weights in the same pass.
        embeddings.cached_encoder.need("sparse")

    def embed_query(self, query: str) -> dict[int, float]:
        sparse = self.embeddings.cached_encoder.encode_query(query, ("sparse",)).sparse
        assert sparse is not None
        return dict(sparse)

    def embed_documents(self, texts: list[str]) -> list[dict[int, float]]:
        sparse = self.embeddings.cached_encoder.encode_documents(list(texts), ("sparse",)).sparse
        assert sparse is not None
        return sparse

    async def aembed_query(self, query: str) -> dict[int, float]:
        return await run_in_executor(None, self.embed_query, query)

    async def aembed_documents(self, texts: list[str]) -> list[dict[int, float]]:
        return await run_in_executor(None, self.embed_documents, texts)
