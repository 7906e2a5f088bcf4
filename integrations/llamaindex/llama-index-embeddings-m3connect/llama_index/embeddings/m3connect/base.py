"""BGE-M3 embeddings for LlamaIndex, through m3connect's encoder."""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager

from m3connect.cached_encoder import DEFAULT_MAX_ENTRIES, CachedEncoder, check_encode_kwargs
from m3connect.encoder import M3Encoder
from m3connect.types import M3Embedding as M3Vectors
from m3connect.types import M3Output

DEFAULT_MODEL_NAME = "BAAI/bge-m3"


class M3ConnectEmbedding(BaseEmbedding):
    """BGE-M3 dense embeddings (LlamaIndex's ``BaseEmbedding``), with the sparse and ColBERT
    representations of the same forward pass on request.

    .. code-block:: python

        from llama_index.embeddings.m3connect import M3ConnectEmbedding

        embed_model = M3ConnectEmbedding(model_name="BAAI/bge-m3", model_kwargs={"device": "cpu"})
        # or: M3ConnectEmbedding(encoder=M3Encoder.from_pretrained("BAAI/bge-m3"))
        vector = embed_model.get_query_embedding("What is BGE-M3?")
        everything = embed_model.get_m3_text_embeddings(["BGE-M3 is ..."])  # an M3Output

    Texts are encoded with ``encode_kwargs`` (keyword arguments of
    :meth:`m3connect.M3Encoder.encode`, e.g. ``{"max_length": 8192}``), queries with
    ``query_encode_kwargs`` (of :meth:`m3connect.M3Encoder.encode_queries`; 512 tokens by
    default). The encoder batches by tokens itself, so ``embed_batch_size`` can stay large.

    Each text goes through the model once: its outputs are kept in a bounded cache
    (``cache_size`` texts, :class:`m3connect.cached_encoder.CachedEncoder`) shared with the sparse
    functions built from this object (:class:`~llama_index.embeddings.m3connect.M3QdrantSparse`,
    ``M3MilvusSparseEmbeddingFunction``) and with an ``M3VectorStore`` given it as ``encoder``, so
    that a vector store asking for the dense vectors and then the other representations of the
    same texts encodes them once. (Named ``M3ConnectEmbedding`` so as not to clash with
    :class:`m3connect.M3Embedding`, one text's vectors; ``M3Embedding`` is a deprecated alias.)
    """

    model_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of M3Encoder.from_pretrained (device, dtype, revision...).",
    )
    encode_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of M3Encoder.encode for texts."
    )
    query_encode_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of M3Encoder.encode_queries for queries.",
    )

    cache_size: int = Field(
        default=DEFAULT_MAX_ENTRIES,
        description="Texts whose outputs are kept, so that a second request needs no second pass.",
    )

    _encoder: M3Encoder = PrivateAttr()
    _cached: CachedEncoder = PrivateAttr()

    def __init__(
        self,
        model_name: str | None = None,
        *,
        encoder: M3Encoder | None = None,
        model_kwargs: dict[str, Any] | None = None,
        encode_kwargs: dict[str, Any] | None = None,
        query_encode_kwargs: dict[str, Any] | None = None,
        embed_batch_size: int = 64,
        cache_size: int = DEFAULT_MAX_ENTRIES,
        callback_manager: CallbackManager | None = None,
        **kwargs: Any,
    ) -> None:
        model_kwargs = dict(model_kwargs or {})
        # Checked before the model loads: a typo must not cost a download.
        cached_settings = {
            "encode_kwargs": dict(encode_kwargs or {}),
            "query_encode_kwargs": dict(query_encode_kwargs or {}),
        }
        for name, value in cached_settings.items():
            check_encode_kwargs(value, name)
        if encoder is None:
            model_name = model_name or DEFAULT_MODEL_NAME
            encoder = M3Encoder.from_pretrained(model_name, **model_kwargs)
        super().__init__(
            model_name=model_name or encoder.name,
            model_kwargs=model_kwargs,
            encode_kwargs=dict(encode_kwargs or {}),
            query_encode_kwargs=dict(query_encode_kwargs or {}),
            embed_batch_size=embed_batch_size,
            cache_size=cache_size,
            callback_manager=callback_manager or CallbackManager(),
            **kwargs,
        )
        self._encoder = encoder
        self._cached = CachedEncoder(encoder, max_entries=cache_size, **cached_settings)

    @classmethod
    def class_name(cls) -> str:
        return "M3ConnectEmbedding"

    @property
    def encoder(self) -> M3Encoder:
        """The m3connect encoder."""
        return self._encoder

    @property
    def cached_encoder(self) -> CachedEncoder:
        """The encoder with this model's settings and output cache (shared with the sparse
        functions and vector stores built from it)."""
        return self._cached

    # --- the three representations -------------------------------------------------------

    def get_m3_text_embeddings(self, texts: list[str]) -> M3Output:
        """Dense, sparse and ColBERT representations of ``texts`` (one forward pass)."""
        return self._cached.encode_documents(list(texts))

    def get_m3_query_embedding(self, query: str) -> M3Vectors:
        """Dense, sparse and ColBERT representations of one query."""
        return self._cached.encode_query(query)

    async def aget_m3_text_embeddings(self, texts: list[str]) -> M3Output:
        return await asyncio.to_thread(self.get_m3_text_embeddings, texts)

    async def aget_m3_query_embedding(self, query: str) -> M3Vectors:
        return await asyncio.to_thread(self.get_m3_query_embedding, query)

    # --- BaseEmbedding: dense vectors ----------------------------------------------------------

    def _dense(self, texts: list[str], *, query: bool) -> list[Embedding]:
        if query:
            dense = self._cached.encode_queries(texts, ("dense",)).dense
        else:
            dense = self._cached.encode_documents(texts, ("dense",)).dense
        assert dense is not None
        return dense.tolist()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._dense([query], query=True)[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._dense([text], query=False)[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._dense(list(texts), query=False)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)
