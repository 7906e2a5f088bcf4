"""BGE-M3 embeddings for LangChain.

:class:`M3Embeddings` is a LangChain :class:`~langchain_core.embeddings.Embeddings` (dense
vectors, what every LangChain component understands) that also gives the other two BGE-M3
representations, sparse lexical weights and ColBERT vectors, from the same forward pass:
:meth:`M3Embeddings.embed_documents_m3` and :meth:`M3Embeddings.embed_query_m3`. The
:class:`~langchain_m3connect.M3VectorStore` uses those to fill all three at once.
"""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import Embeddings
from langchain_core.runnables.config import run_in_executor
from pydantic import BaseModel, ConfigDict, Field, model_validator

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

    @model_validator(mode="after")
    def _load_encoder(self) -> M3Embeddings:
        if self.encoder is None:
            if self.model_name is None:
                self.model_name = DEFAULT_MODEL_NAME
            self.encoder = M3Encoder.from_pretrained(self.model_name, **self.model_kwargs)
        elif self.model_name is None:
            self.model_name = self.encoder.name
        return self

    @property
    def m3_encoder(self) -> M3Encoder:
        """The encoder (always set after construction)."""
        assert self.encoder is not None
        return self.encoder

    # --- the three representations -------------------------------------------------------

    def embed_documents_m3(self, texts: list[str]) -> M3Output:
        """Dense, sparse and ColBERT representations of ``texts`` (one forward pass)."""
        return self.m3_encoder.encode(list(texts), **self.encode_kwargs)

    def embed_query_m3(self, text: str) -> M3Embedding:
        """Dense, sparse and ColBERT representations of one query."""
        return self.m3_encoder.encode_queries([text], **self.query_encode_kwargs)[0]

    async def aembed_documents_m3(self, texts: list[str]) -> M3Output:
        """Async :meth:`embed_documents_m3` (runs in a worker thread)."""
        return await run_in_executor(None, self.embed_documents_m3, texts)

    async def aembed_query_m3(self, text: str) -> M3Embedding:
        """Async :meth:`embed_query_m3` (runs in a worker thread)."""
        return await run_in_executor(None, self.embed_query_m3, text)

    # --- LangChain's Embeddings: dense vectors ---------------------------------------------

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Dense vectors of ``texts`` (L2-normalized; compare with a dot product)."""
        texts = list(texts)
        if not texts:
            return []
        kwargs = {**self.encode_kwargs, "dense": True, "sparse": False, "colbert": False}
        dense = self.m3_encoder.encode(texts, **kwargs).dense
        assert dense is not None
        return [[float(x) for x in row] for row in dense]

    def embed_query(self, text: str) -> list[float]:
        """Dense vector of one query."""
        kwargs = {**self.query_encode_kwargs, "dense": True, "sparse": False, "colbert": False}
        dense = self.m3_encoder.encode_queries([text], **kwargs).dense
        assert dense is not None
        return [float(x) for x in dense[0]]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await run_in_executor(None, self.embed_query, text)
