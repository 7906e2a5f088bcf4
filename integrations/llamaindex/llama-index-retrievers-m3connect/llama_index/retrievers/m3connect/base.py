"""BGE-M3 hybrid retrieval as a LlamaIndex retriever."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks import CallbackManager
from llama_index.core.constants import DEFAULT_SIMILARITY_TOP_K
from llama_index.core.schema import NodeWithScore, QueryBundle
from llama_index.core.vector_stores.types import MetadataFilters
from llama_index.vector_stores.m3connect import M3VectorStore, to_m3_filter

from m3connect.filters import FilterLike
from m3connect.store import FusionName, M3Store, Mode, RerankName, SearchParams

_DEFAULTS = SearchParams()


class M3HybridRetriever(BaseRetriever):
    """The BGE-M3 paper's hybrid search over any m3connect store, as ``NodeWithScore`` s.

    By default: candidates from the dense and sparse legs fused with RRF, re-ranked by the
    weighted sum of the dense, lexical and ColBERT scores (``rerank="all"``, weights
    0.4 / 0.2 / 0.4); ``rerank="colbert"`` re-ranks by the ColBERT score alone. Each node's
    ``score`` is the final score; ``node.metadata["m3_scores"]`` holds the exact score of each
    representation (excluded from the text LLMs see).

    .. code-block:: python

        from llama_index.retrievers.m3connect import M3HybridRetriever

        retriever = M3HybridRetriever(vector_store, similarity_top_k=5)
        # or: M3HybridRetriever(m3_store, encoder=encoder, rerank="colbert")
        for hit in retriever.retrieve("how does late interaction work?"):
            print(hit.score, hit.node.metadata["m3_scores"], hit.node.get_content())

    Args:
        store: an ``M3VectorStore`` (LlamaIndex) or any :class:`m3connect.M3Store`.
        encoder: the encoder when ``store`` is an m3connect store without one.
        similarity_top_k: how many nodes to return (LlamaIndex's default, 2).
        filters: ``MetadataFilters`` or an m3connect filter (a dict or ``Field`` expression).
        mode, hybrid_legs, fusion, rrf_k, weights, rerank, candidates: the fields of
            :class:`m3connect.SearchParams`.
    """

    def __init__(
        self,
        store: M3VectorStore | M3Store,
        *,
        encoder: Any = None,
        similarity_top_k: int = DEFAULT_SIMILARITY_TOP_K,
        mode: Mode = _DEFAULTS.mode,
        hybrid_legs: tuple[str, ...] = _DEFAULTS.hybrid_legs,
        fusion: FusionName = _DEFAULTS.fusion,
        rrf_k: float = _DEFAULTS.rrf_k,
        weights: tuple[float, float, float] = _DEFAULTS.weights,
        rerank: RerankName | None = "all",
        candidates: int = _DEFAULTS.candidates,
        filters: MetadataFilters | FilterLike = None,
        callback_manager: CallbackManager | None = None,
        verbose: bool = False,
    ) -> None:
        if isinstance(store, M3VectorStore):
            if encoder is not None:
                raise ValueError(
                    "an M3VectorStore has its encoder: pass encoder= only with an M3Store"
                )
            self._vector_store = store
        else:
            self._vector_store = M3VectorStore(store, encoder=encoder)
        self._filters = filters
        self._params = SearchParams(
            mode=mode,
            k=similarity_top_k,
            hybrid_legs=tuple(hybrid_legs),
            fusion=fusion,
            rrf_k=rrf_k,
            weights=weights,
            rerank=rerank,
            candidates=candidates,
        )
        # Fails early on filters that do not translate.
        self._params.with_overrides(**self._filter_override())
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @property
    def vector_store(self) -> M3VectorStore:
        return self._vector_store

    @property
    def search_params(self) -> SearchParams:
        """The search each retrieval runs."""
        return self._params.with_overrides(**self._filter_override())

    @property
    def similarity_top_k(self) -> int:
        return self._params.k

    @similarity_top_k.setter
    def similarity_top_k(self, value: int) -> None:
        self._params = self._params.with_overrides(k=value)

    def _filter_override(self) -> dict[str, Any]:
        if self._filters is None:
            return {}
        if isinstance(self._filters, MetadataFilters):
            return {"filter": to_m3_filter(self._filters)}
        return {"filter": self._filters}

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return self._vector_store.search(
            query_bundle.query_str, self._params, **self._filter_override()
        )

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return await self._vector_store.asearch(
            query_bundle.query_str, self._params, **self._filter_override()
        )
