"""BGE-M3 embeddings for LangChain.

:class:`M3Embeddings` is a LangChain :class:`~langchain_core.embeddings.Embeddings` (dense
vectors, what every LangChain component understands) that also gives the other two BGE-M3
representations, sparse lexical weights and ColBERT vectors, from the same forward pass:
:meth:`M3Embeddings.embed_documents_m3` and :meth:`M3Embeddings.embed_query_m3`. The
:class:`~langchain_m3connect.M3VectorStore` uses those to fill all three at once.

Each text goes through the model once: the outputs are kept in a bounded cache
(:class:`m3connect.cached_encoder.CachedEncoder`) that the sparse embeddings for
``langchain-qdrant`` and ``langchain-milvus`` built from an :class:`M3Embeddings` share, so
that a store asking for the dense vectors and then the sparse weights of the same texts
encodes them once.
"""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from m3connect.cached_encoder import DEFAULT_MAX_ENTRIES, CachedEncoder
from m3connect.encoder import M3Encoder
from m3connect.types import M3Embedding, M3Output

DEFAULT_MODEL_NAME = "BAAI/bge-m3"


class M3Embeddings(BaseModel, Embeddings):
    """BGE-M3 embeddings: dense vectors for LangChain, plus sparse and ColBERT on request.

    Build it from a model (hub id or local folder, loaded with
    :meth:`m3connect.M3Encoder.from_pretrained`) or from an encoder already loaded:

    .. code-block:: python

        from langchain_m3connect import M3Embeddings

        embeddings = M3Embeddings(model_name="BAAI/bge-m3", model_kwargs={"device": "cpu"})
        # or: M3Embeddings(encoder=M3Encoder.from_pretrained("BAAI/bge-m3"))

        vector = embeddings.embed_query("What is BGE-M3?")          # list[float], 1024 floats
        batch = embeddings.embed_documents_m3(["BGE-M3 is ..."])     # M3Output: all three

    Documents are encoded with ``encode_kwargs`` passed to :meth:`M3Encoder.encode` (e.g.
    ``{"max_length": 8192, "batch_tokens": 16384}``), queries with ``query_encode_kwargs``
    passed to :meth:`M3Encoder.encode_queries` (512 tokens by default, like the reference).
    Both are checked when the object is built: only :meth:`M3Encoder.encode` settings
    (``max_length``, ``colbert_dtype``, ``batch_tokens``, ``max_batch_size``,
    ``show_progress``).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", protected_namespaces=())

    model_name: str | None = None
    """Hub id or local folder of a BGE-M3 checkpoint; ``BAAI/bge-m3`` when neither it nor
    ``encoder`` is given. With ``encoder``, it is the encoder's name."""

    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of :meth:`M3Encoder.from_pretrained` (``device``, ``dtype``,
    ``revision``, ``local_files_only``...)."""

    encode_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of :meth:`M3Encoder.encode` for documents."""

    query_encode_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of :meth:`M3Encoder.encode_queries` for queries."""

    encoder: M3Encoder | None = Field(default=None, exclude=True)
    """An encoder already loaded (then ``model_name`` and ``model_kwargs`` are not used)."""

    cache_size: int = DEFAULT_MAX_ENTRIES
    """How many texts' outputs are kept so that a second request for them (e.g. the sparse
    weights after the dense vectors) needs no second forward pass; 0 turns this off."""

    _cached: CachedEncoder = PrivateAttr()

    @model_validator(mode="after")
    def _load_encoder(self) -> M3Embeddings:
        if self.encoder is None:
            if self.model_name is None:
                self.model_name = DEFAULT_MODEL_NAME
            self.encoder = M3Encoder.from_pretrained(self.model_name, **self.model_kwargs)
        elif self.model_name is None:
            self.model_name = self.encoder.name
        self._cached = CachedEncoder(
            self.encoder,
            encode_kwargs=self.encode_kwargs,
            query_encode_kwargs=self.query_encode_kwargs,
            max_entries=self.cache_size,
        )
        return self

    @property
    def m3_encoder(self) -> M3Encoder:
        """The encoder (always set after construction)."""
        assert self.encoder is not None
        return self.encoder

    @property
    def cached_encoder(self) -> CachedEncoder:
        """The encoder with this object's settings and output cache (shared with the sparse
        embeddings built from it)."""
        return self._cached

    # --- the three representations -------------------------------------------------------

    def embed_documents_m3(self, texts: list[str]) -> M3Output:
        """Dense, sparse and ColBERT representations of ``texts`` (one forward pass)."""
        return self._cached.encode_documents(list(texts))

    def embed_query_m3(self, text: str) -> M3Embedding:
        """Dense, sparse and ColBERT representations of one query."""
        return self._cached.encode_query(text)

    async def aembed_documents_m3(self, texts: list[str]) -> M3Output:
        """Async :meth:`embed_documents_m3` (runs in a worker thread)."""
        return await run_in_executor(None, self.embed_documents_m3, texts)

    async def aembed_query_m3(self, text: str) -> M3Embedding:
        """Async :meth:`embed_query_m3` (runs in a worker thread)."""
        return await run_in_executor(None, self.embed_query_m3, text)

    # --- LangChain's Embeddings: dense vectors ---------------------------------------------

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Dense vectors of ``texts`` (L2-normalized; compare with a dot product)."""
        dense = self._cached.encode_documents(list(texts), ("dense",)).dense
        assert dense is not None
        return dense.tolist()

    def embed_query(self, text: str) -> list[float]:
        """Dense vector of one query."""
        dense = self._cached.encode_query(text, ("dense",)).dense
        assert dense is not None
        return dense.tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await run_in_executor(None, self.embed_query, text)
