"""BGE-M3 hybrid retrieval as a LangChain retriever.

:class:`M3HybridRetriever` runs the BGE-M3 paper's hybrid search on any m3connect store:
candidates from the dense and sparse legs (fused with RRF), re-ranked by the weighted sum of
the dense, lexical and ColBERT scores (``rerank="all"``, weights 0.4 / 0.2 / 0.4) or by the
ColBERT score alone (``rerank="colbert"``). Every returned document carries its scores in
``metadata["m3_score"]`` (final) and ``metadata["m3_scores"]`` (per representation).
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, model_validator

from langchain_m3connect.vectorstores import PARAM_FIELDS, M3VectorStore
from m3connect.store import FusionName, Mode, RerankName, SearchParams

_DEFAULTS = SearchParams()


class M3HybridRetriever(BaseRetriever):
    """BGE-M3 hybrid retriever: dense + sparse candidates, re-ranked with all three scores.

    .. code-block:: python

        from langchain_m3connect import M3Embeddings, M3HybridRetriever, M3VectorStore

        vectorstore = M3VectorStore(store, M3Embeddings(model_name="BAAI/bge-m3"))
        retriever = M3HybridRetriever(vectorstore=vectorstore, k=5)
        # or: M3HybridRetriever(store=store, embeddings=M3Embeddings(...), k=5)
        docs = retriever.invoke("how does late interaction work?")
        docs[0].metadata["m3_scores"]   # {"dense": ..., "sparse": ..., "colbert": ...}

    The fields mirror :class:`m3connect.SearchParams`; ``invoke(query, k=..., filter=...,
    rerank=...)`` overrides them for one call.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    vectorstore: M3VectorStore
    """The store searched (any m3connect store wrapped in an :class:`M3VectorStore`)."""

    k: int = 4
    """How many documents to return."""

    mode: Mode = "hybrid"
    """``"hybrid"`` (the legs in ``hybrid_legs``), ``"dense"``, ``"sparse"`` or ``"colbert"``."""

    hybrid_legs: tuple[str, ...] = _DEFAULTS.hybrid_legs
    fusion: FusionName = _DEFAULTS.fusion
    rrf_k: float = _DEFAULTS.rrf_k
    weights: tuple[float, float, float] = _DEFAULTS.weights
    """``(dense, sparse, colbert)`` weights of ``rerank="all"`` and of weighted fusion."""

    rerank: RerankName | None = "all"
    """``"all"`` (the paper's weighted sum of the three scores), ``"colbert"``, or ``None``."""

    candidates: int = _DEFAULTS.candidates
    """How many candidates each leg retrieves and the re-rank scores."""

    filter: Any = None
    """A metadata filter (dict, :class:`m3connect.Field` expression or ``RawFilter``)."""

    @model_validator(mode="before")
    @classmethod
    def _from_store(cls, values: Any) -> Any:
        """Accept ``store=`` (an m3connect store) and ``embeddings=`` instead of ``vectorstore=``."""
        if isinstance(values, dict) and "store" in values:
            values = dict(values)
            store = values.pop("store")
            embeddings = values.pop("embeddings", None)
            if "vectorstore" in values:
                raise ValueError("pass either vectorstore= or store=, not both")
            values["vectorstore"] = M3VectorStore(store, embeddings)
        return values

    @model_validator(mode="after")
    def _check_params(self) -> M3HybridRetriever:
        self.search_params()  # fails early on bad settings (a StoreError)
        return self

    def search_params(self, **overrides: Any) -> SearchParams:
        """The :class:`SearchParams` of a call with these overrides."""
        fields = {name: getattr(self, name) for name in PARAM_FIELDS}
        return SearchParams(**fields).with_overrides(**overrides)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        params = self.search_params(**kwargs)
        pairs = self.vectorstore.similarity_search_with_score(query, **_as_kwargs(params))
        return [doc for doc, _ in pairs]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        params = self.search_params(**kwargs)
        pairs = await self.vectorstore.asimilarity_search_with_score(query, **_as_kwargs(params))
        return [doc for doc, _ in pairs]


def _as_kwargs(params: SearchParams) -> dict[str, Any]:
    return {name: getattr(params, name) for name in PARAM_FIELDS}
