"""A LangChain vector store over any m3connect store (in-memory, Qdrant, Milvus, Elasticsearch).

:class:`M3VectorStore` encodes each text once with BGE-M3 and writes its dense, sparse and
ColBERT representations to the wrapped :class:`m3connect.M3Store`; searches run the store's
exact search (dense, sparse, ColBERT or hybrid, with fusion and re-rank) as described by
:class:`m3connect.SearchParams`.

Scores convention
-----------------
Methods that return plain documents (``similarity_search``, ``similarity_search_by_vector``,
``max_marginal_relevance_search``, ``get_by_ids``) return them exactly as stored: LangChain's
vector-store contract. Methods that return scores (``similarity_search_with_score``,
``similarity_search_with_relevance_scores``) and :class:`~langchain_m3connect.M3HybridRetriever`
also put them in each returned document's metadata (a copy; nothing stored changes):

- ``metadata["m3_score"]``: the final score that orders the results (fused or re-ranked);
- ``metadata["m3_scores"]``: the exact score of each representation the search used, e.g.
  ``{"dense": 0.71, "sparse": 0.12, "colbert": 0.69}`` (scales of :mod:`m3connect.scoring`).

Relevance scores
----------------
``similarity_search_with_relevance_scores``, ``as_retriever(search_type=
"similarity_score_threshold")`` and the ``score_threshold=`` option of any search use a
relevance in ``[0, 1]`` derived from the final score (unless ``relevance_score_fn`` is given):

- a cosine final score (``mode="dense"`` or ``"colbert"``, ``rerank="colbert"``, weighted fusion
  of dense and ColBERT): ``(1 + score) / 2``;
- RRF fusion (the default hybrid search): ``score / (n_legs / (rrf_k + 1))``, the fused score
  over the best one possible, so 1 means "ranked first by every leg";
- DBSF fusion: ``score / n_legs`` (each leg's normalized score is about ``[0, 1]``), clipped.

Lexical scores (``mode="sparse"``, weighted fusion or ``rerank="all"`` with a sparse weight)
have no fixed range: those searches need ``relevance_score_fn``.

Sparse-only searches (``mode="sparse"``) return only the documents that share at least one token
with the query, so they may return fewer than ``k`` documents.

Ids
---
Documents get the store's ids as strings (``Document.id`` is a string in LangChain). Ids you
pass are kept exactly as given; without ids, new UUID strings are generated.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore
from langchain_core.vectorstores.utils import maximal_marginal_relevance

from langchain_m3connect.embeddings import M3Embeddings
from m3connect.store import (
    AsyncM3Store,
    AsyncStoreAdapter,
    Hit,
    M3Store,
    SearchParams,
    id_list,
)
from m3connect.stores.memory import InMemoryStore
from m3connect.types import DocId, M3Embedding, M3Output

if TYPE_CHECKING:
    from langchain_m3connect.retrievers import M3HybridRetriever

#: Metadata key of the final score in documents returned with scores.
SCORE_KEY = "m3_score"
#: Metadata key of the per-representation scores in documents returned with scores.
SCORES_KEY = "m3_scores"

#: The fields of :class:`m3connect.SearchParams`, read from the dataclass (the search options).
PARAM_FIELDS = tuple(f.name for f in dataclasses.fields(SearchParams))
_PARAM_FIELDS = frozenset(PARAM_FIELDS)


class M3VectorStore(VectorStore):
    """LangChain vector store over an m3connect store, with BGE-M3 hybrid search.

    .. code-block:: python

        from m3connect import InMemoryStore, SearchParams
        from langchain_m3connect import M3Embeddings, M3VectorStore

        embeddings = M3Embeddings(model_name="BAAI/bge-m3")
        store = M3VectorStore(InMemoryStore(), embeddings)  # or QdrantStore(...), ...
        store.add_texts(["BGE-M3 has three retrieval modes."], metadatas=[{"lang": "en"}])
        docs = store.similarity_search("retrieval modes", k=4, rerank="colbert",
                                       filter={"lang": "en"})

    Args:
        store: any :class:`m3connect.M3Store`.
        embedding: the :class:`M3Embeddings` that encodes texts and queries; by default one
            over the store's own encoder.
        search_params: the default search (a :class:`m3connect.SearchParams`); keyword
            arguments of each search override its fields. Default: hybrid (dense + sparse,
            RRF), no re-rank.
        async_store: an :class:`m3connect.AsyncM3Store` over the same collection for the
            async methods; by default the sync store run in worker threads.
        relevance_score_fn: maps a final score to ``[0, 1]`` for
            ``similarity_search_with_relevance_scores``; by default ``(1 + s) / 2`` for searches
            whose final score is a cosine (dense, ColBERT, a ColBERT re-rank), and an error for
            others (RRF and lexical scores have no fixed range).

    Search keyword arguments (any method that searches): ``k``, ``score_threshold`` (keep the
    documents whose relevance, see the module documentation, is at least this), ``filter`` (a dict like
    ``{"lang": "en", "year": {"$gte": 2020}}``, a :class:`m3connect.Field` expression, or a
    database's ``RawFilter``) and the fields of :class:`m3connect.SearchParams`: ``mode``
    (``"dense"``, ``"sparse"``, ``"colbert"``, ``"hybrid"``), ``hybrid_legs``, ``fusion``
    (``"rrf"``, ``"weighted"``, ``"dbsf"``), ``rrf_k``, ``weights``, ``rerank`` (``None``,
    ``"colbert"``, ``"all"``), ``candidates``. Unknown keyword arguments raise ``TypeError``.
    """

    def __init__(
        self,
        store: M3Store,
        embedding: M3Embeddings | None = None,
        *,
        search_params: SearchParams | None = None,
        async_store: AsyncM3Store | None = None,
        relevance_score_fn: Callable[[float], float] | None = None,
    ) -> None:
        if not isinstance(store, M3Store):
            raise TypeError(
                f"store must be an m3connect M3Store, got {type(store).__name__} "
                "(for an AsyncM3Store, pass its sync form as store and it as async_store)"
            )
        if embedding is None:
            if store.encoder is None:
                raise ValueError(
                    "M3VectorStore needs an encoder: pass embedding=M3Embeddings(...) or give the "
                    "store one (encoder=M3Encoder.from_pretrained(...))"
                )
            embedding = M3Embeddings(encoder=store.encoder)
        elif not isinstance(embedding, M3Embeddings):
            raise TypeError(
                "embedding must be an M3Embeddings (the store needs BGE-M3's sparse and ColBERT "
                f"vectors too), got {type(embedding).__name__}"
            )
        if store.fingerprint is not None and store.encoder is not embedding.m3_encoder:
            # The store holds vectors already: refuse an encoder of another model.
            embedding.m3_encoder.fingerprint.check_compatible(
                store.fingerprint, f"the {type(store).__name__}"
            )
        self.store = store
        self.async_store: AsyncM3Store = async_store or AsyncStoreAdapter(store)
        self._embeddings = embedding
        self.search_params = search_params or SearchParams()
        self.relevance_score_fn = relevance_score_fn

    @property
    def embeddings(self) -> M3Embeddings:
        return self._embeddings

    # --- writing --------------------------------------------------------------------------

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Encode ``texts`` (one forward pass gives all three representations) and upsert
        them. An id that exists already is replaced. Returns the ids."""
        texts, metadatas, doc_ids = self._prepare_add(texts, metadatas, ids)
        for start, end in _batches(len(texts), batch_size):
            output = self._embeddings.embed_documents_m3(texts[start:end])
            self.store.add(
                doc_ids[start:end],
                output,
                texts=texts[start:end],
                metadatas=None if metadatas is None else metadatas[start:end],
            )
        return doc_ids  # type: ignore[return-value]

    async def aadd_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> list[str]:
        texts, metadatas, doc_ids = self._prepare_add(texts, metadatas, ids)
        for start, end in _batches(len(texts), batch_size):
            output: M3Output = await self._embeddings.aembed_documents_m3(texts[start:end])
            await self.async_store.add(
                doc_ids[start:end],
                output,
                texts=texts[start:end],
                metadatas=None if metadatas is None else metadatas[start:end],
            )
        return doc_ids  # type: ignore[return-value]

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete by ids, by ``filter=`` (documents matching it), or both; with neither, delete
        every document (LangChain's contract). Unknown ids are ignored."""
        filter_ = _delete_filter(ids, kwargs)
        if ids is None and filter_ is None:
            self.store.clear()
        else:
            self.store.delete(None if ids is None else id_list(ids), filter=filter_)
        return True

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        filter_ = _delete_filter(ids, kwargs)
        if ids is None and filter_ is None:
            await self.async_store.clear()
        else:
            await self.async_store.delete(None if ids is None else id_list(ids), filter=filter_)
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The stored documents among ``ids`` (unknown ids are skipped)."""
        return [_record_document(r.id, r.text, r.metadata) for r in self.store.get(id_list(ids))]

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        records = await self.async_store.get(id_list(ids))
        return [_record_document(r.id, r.text, r.metadata) for r in records]

    # --- searching ------------------------------------------------------------------------

    def search_params_for(self, k: int | None = None, **kwargs: Any) -> SearchParams:
        """The :class:`SearchParams` a search with these keyword arguments runs."""
        # None means "the default" for every option except rerank, where it means "no re-rank".
        overrides = {key: v for key, v in kwargs.items() if v is not None or key == "rerank"}
        unknown = sorted(set(overrides) - _PARAM_FIELDS)
        if unknown:
            raise TypeError(
                f"unknown search option(s) {', '.join(unknown)}; "
                f"M3VectorStore takes {', '.join(sorted(_PARAM_FIELDS))}"
            )
        if k is not None:
            overrides["k"] = k
        return self.search_params.with_overrides(**overrides)

    def search_hits(self, query: str | M3Embedding, k: int | None = 4, **kwargs: Any) -> list[Hit]:
        """The m3connect :class:`~m3connect.Hit` s of a search (ids, final and
        per-representation scores, texts, metadata)."""
        threshold = kwargs.pop("score_threshold", None)
        params = self.search_params_for(k, **kwargs)
        hits = self.store.search(self._query_embedding(query), params)
        return self._above(hits, params, threshold)

    async def asearch_hits(
        self, query: str | M3Embedding, k: int | None = 4, **kwargs: Any
    ) -> list[Hit]:
        threshold = kwargs.pop("score_threshold", None)
        params = self.search_params_for(k, **kwargs)
        if isinstance(query, str):
            query = await self._embeddings.aembed_query_m3(query)
        return self._above(await self.async_store.search(query, params), params, threshold)

    def _above(self, hits: list[Hit], params: SearchParams, threshold: float | None) -> list[Hit]:
        if threshold is None:
            return hits
        relevance = self._relevance_fn(params)
        return [h for h in hits if relevance(h.score) >= threshold]

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """The ``k`` best documents for ``query`` (as stored, without scores)."""
        return [
            _hit_document(hit, with_scores=False) for hit in self.search_hits(query, k, **kwargs)
        ]

    async def asimilarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        hits = await self.asearch_hits(query, k, **kwargs)
        return [_hit_document(hit, with_scores=False) for hit in hits]

    def similarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """The ``k`` best documents with their final scores (higher is better); each
        document's metadata also carries ``m3_score`` and ``m3_scores``."""
        return [
            (_hit_document(h, with_scores=True), h.score)
            for h in self.search_hits(query, k, **kwargs)
        ]

    async def asimilarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        hits = await self.asearch_hits(query, k, **kwargs)
        return [(_hit_document(h, with_scores=True), h.score) for h in hits]

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, **kwargs: Any
    ) -> list[Document]:
        """Dense search with a dense query vector (``mode`` is ``"dense"``, no re-rank)."""
        query = _dense_query(embedding)
        hits = self.search_hits(query, k, **_dense_only(kwargs))
        return [_hit_document(hit, with_scores=False) for hit in hits]

    async def asimilarity_search_by_vector(
        self, embedding: list[float], k: int = 4, **kwargs: Any
    ) -> list[Document]:
        hits = await self.asearch_hits(_dense_query(embedding), k, **_dense_only(kwargs))
        return [_hit_document(hit, with_scores=False) for hit in hits]

    def _similarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        relevance = self._relevance_fn(self.search_params_for(k, **kwargs))
        return [
            (doc, relevance(score))
            for doc, score in self.similarity_search_with_score(query, k, **kwargs)
        ]

    async def _asimilarity_search_with_relevance_scores(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        relevance = self._relevance_fn(self.search_params_for(k, **kwargs))
        pairs = await self.asimilarity_search_with_score(query, k, **kwargs)
        return [(doc, relevance(score)) for doc, score in pairs]

    def _relevance_fn(self, params: SearchParams) -> Callable[[float], float]:
        """The final score's relevance in [0, 1] (see the module documentation)."""
        if self.relevance_score_fn is not None:
            return self.relevance_score_fn
        if _final_score_is_cosine(params):
            return lambda score: _clip((1.0 + score) / 2.0)
        if params.rerank is None and params.mode == "hybrid" and params.fusion == "rrf":
            best = len(params.legs) / (params.rrf_k + 1.0)  # first in every leg
            return lambda score: _clip(score / best)
        if params.rerank is None and params.mode == "hybrid" and params.fusion == "dbsf":
            n_legs = len(params.legs)
            return lambda score: _clip(score / n_legs)
        raise ValueError(
            f"relevance scores in [0, 1] need a final score with a fixed range (a cosine, RRF or "
            f"DBSF fusion); lexical scores have none, and this search is mode={params.mode!r}, "
            f"fusion={params.fusion!r}, rerank={params.rerank!r}, weights={params.weights}. "
            "Pass relevance_score_fn= to M3VectorStore to map its scores yourself."
        )

    # --- maximal marginal relevance ---------------------------------------------------------

    def max_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        **kwargs: Any,
    ) -> list[Document]:
        """Diverse results: the ``fetch_k`` best documents of the search (any mode), then
        maximal marginal relevance on the dense vectors picks ``k`` of them."""
        query_embedding = self._embeddings.embed_query_m3(query)
        return self._mmr(query_embedding, k, fetch_k, lambda_mult, kwargs)

    def max_marginal_relevance_search_by_vector(
        self,
        embedding: list[float],
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        **kwargs: Any,
    ) -> list[Document]:
        return self._mmr(_dense_query(embedding), k, fetch_k, lambda_mult, _dense_only(kwargs))

    async def amax_marginal_relevance_search(
        self,
        query: str,
        k: int = 4,
        fetch_k: int = 20,
        lambda_mult: float = 0.5,
        **kwargs: Any,
    ) -> list[Document]:
        query_embedding = await self._embeddings.aembed_query_m3(query)
        hits = await self.asearch_hits(query_embedding, max(fetch_k, k), **kwargs)
        records = await self.async_store.get([h.id for h in hits], with_vectors=True)
        return _select_mmr(query_embedding, hits, records, k, lambda_mult)

    def _mmr(
        self,
        query: M3Embedding,
        k: int,
        fetch_k: int,
        lambda_mult: float,
        kwargs: dict[str, Any],
    ) -> list[Document]:
        hits = self.search_hits(query, max(fetch_k, k), **kwargs)
        records = self.store.get([h.id for h in hits], with_vectors=True)
        return _select_mmr(query, hits, records, k, lambda_mult)

    # --- construction -----------------------------------------------------------------------

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        store: M3Store | None = None,
        **kwargs: Any,
    ) -> M3VectorStore:
        """A vector store holding ``texts``: in ``store``, or a new
        :class:`m3connect.InMemoryStore` (exact search, in memory). Other keyword arguments
        go to the constructor (``search_params``, ``async_store``, ``relevance_score_fn``)."""
        if not isinstance(embedding, M3Embeddings):
            raise TypeError(
                f"M3VectorStore.from_texts needs an M3Embeddings, got {type(embedding).__name__}"
            )
        if store is None:
            store = InMemoryStore(encoder=embedding.m3_encoder)
        vectorstore = cls(store, embedding, **kwargs)
        vectorstore.add_texts(texts, metadatas, ids=ids)
        return vectorstore

    @classmethod
    async def afrom_texts(
        cls,
        texts: list[str],
        embedding: Embeddings,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        store: M3Store | None = None,
        **kwargs: Any,
    ) -> M3VectorStore:
        if not isinstance(embedding, M3Embeddings):
            raise TypeError(
                f"M3VectorStore.afrom_texts needs an M3Embeddings, got {type(embedding).__name__}"
            )
        if store is None:
            store = InMemoryStore(encoder=embedding.m3_encoder)
        vectorstore = cls(store, embedding, **kwargs)
        await vectorstore.aadd_texts(texts, metadatas, ids=ids)
        return vectorstore

    def as_hybrid_retriever(self, **kwargs: Any) -> M3HybridRetriever:
        """An :class:`~langchain_m3connect.M3HybridRetriever` over this store (keyword
        arguments are its fields: ``k``, ``mode``, ``rerank``, ``filter``...)."""
        from langchain_m3connect.retrievers import M3HybridRetriever

        return M3HybridRetriever(vectorstore=self, **kwargs)

    # --- helpers ------------------------------------------------------------------------------

    def _query_embedding(self, query: str | M3Embedding) -> M3Embedding:
        if isinstance(query, M3Embedding):
            return query
        return self._embeddings.embed_query_m3(query)

    @staticmethod
    def _prepare_add(
        texts: Iterable[str], metadatas: list[dict] | None, ids: Sequence[DocId | None] | None
    ) -> tuple[list[str], list[dict] | None, list[DocId]]:
        texts = list(texts)
        if metadatas is not None:
            metadatas = list(metadatas)
            if len(metadatas) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(metadatas)} metadatas")
        if ids is None:
            doc_ids: list[DocId] = [str(uuid.uuid4()) for _ in texts]
        else:
            ids = id_list(ids)  # a bare string is one id, not its characters
            if len(ids) != len(texts):
                raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
            doc_ids = [str(uuid.uuid4()) if i is None else i for i in ids]
        return texts, metadatas, doc_ids


def _batches(n: int, batch_size: int | None) -> list[tuple[int, int]]:
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    step = batch_size or max(n, 1)
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _delete_filter(ids: list[str] | None, kwargs: dict[str, Any]) -> Any:
    filter_ = kwargs.pop("filter", None)
    if kwargs:
        raise TypeError(f"unknown delete option(s) {', '.join(sorted(kwargs))}; use ids or filter=")
    return filter_


def _record_document(doc_id: DocId, text: str | None, metadata: dict[str, Any]) -> Document:
    return Document(id=str(doc_id), page_content=text or "", metadata=metadata)


def _hit_document(hit: Hit, *, with_scores: bool) -> Document:
    metadata = dict(hit.metadata)
    if with_scores:
        metadata[SCORE_KEY] = hit.score
        metadata[SCORES_KEY] = dict(hit.scores)
    return _record_document(hit.id, hit.text, metadata)


def _dense_query(embedding: Sequence[float]) -> M3Embedding:
    return M3Embedding(dense=np.asarray(embedding, dtype=np.float32))


def _dense_only(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Search options for a dense query vector: dense mode, no re-rank."""
    mode = kwargs.get("mode", "dense")
    if mode != "dense" or kwargs.get("rerank") is not None:
        raise ValueError("a search by dense vector is a dense search: mode='dense', no rerank")
    return {**kwargs, "mode": "dense", "rerank": None}


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))


def _final_score_is_cosine(params: SearchParams) -> bool:
    if params.rerank == "colbert":
        return True
    if params.rerank == "all":
        return params.weights[1] == 0
    if params.mode in ("dense", "colbert"):
        return True
    if params.mode == "hybrid" and params.fusion == "weighted":
        return all(
            leg != "sparse" or w == 0
            for leg, w in zip(params.legs, params.leg_weights, strict=True)
        )
    return False


def _select_mmr(
    query: M3Embedding, hits: list[Hit], records: list[Any], k: int, lambda_mult: float
) -> list[Document]:
    if not hits:
        return []
    if query.dense is None:
        raise ValueError("maximal marginal relevance needs the query's dense vector")
    by_id = {(type(r.id), r.id): r for r in records}
    kept = [h for h in hits if (type(h.id), h.id) in by_id]
    vectors = np.stack([np.asarray(by_id[(type(h.id), h.id)].embedding.dense) for h in kept])
    chosen = maximal_marginal_relevance(
        np.asarray(query.dense, dtype=np.float32),
        vectors.tolist(),
        lambda_mult=lambda_mult,
        k=min(k, len(kept)),
    )
    return [_hit_document(kept[i], with_scores=False) for i in chosen]
