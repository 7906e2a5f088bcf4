"""A LlamaIndex vector store over any m3connect store (in-memory, Qdrant, Milvus, Elasticsearch).

Each node's text is encoded once with BGE-M3; its dense, sparse and ColBERT representations,
its text and its metadata (with LlamaIndex's node record, so nodes come back whole) are written
to the wrapped :class:`m3connect.M3Store`. Queries run the store's exact search.

Scores convention: a query result's ``similarities`` (and a ``NodeWithScore.score``) are the
final scores that order the results (fused or re-ranked); each returned node also carries the
exact score of every representation the search used in ``node.metadata["m3_scores"]`` (e.g.
``{"dense": 0.71, "sparse": 0.12}``), a key excluded from the text that LLMs and embedding
models see.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.indices.query.embedding_utils import get_top_k_mmr_embeddings
from llama_index.core.schema import BaseNode, MetadataMode, NodeWithScore, TextNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict

from m3connect.cached_encoder import CachedEncoder
from m3connect.encoder import M3Encoder
from m3connect.filters import And, Eq, Field, Filter, FilterLike, In, Not, Or, Range, matches
from m3connect.filters import parse_filter as parse_m3_filter
from m3connect.store import (
    AsyncM3Store,
    AsyncStoreAdapter,
    Hit,
    M3Store,
    Record,
    SearchParams,
    id_list,
)
from m3connect.types import M3Embedding, M3Output

#: Metadata key of the per-representation scores on returned nodes.
SCORES_KEY = "m3_scores"
#: The metadata key LlamaIndex writes a node's source document id under.
REF_DOC_ID_KEY = "ref_doc_id"

_MODES = {
    VectorStoreQueryMode.SPARSE: "sparse",
    VectorStoreQueryMode.TEXT_SEARCH: "sparse",
    VectorStoreQueryMode.HYBRID: "hybrid",
}
#: How many candidates an MMR query reads per result (LlamaIndex's default prefetch factor).
MMR_PREFETCH_FACTOR = 4


class M3VectorStore(BasePydanticVectorStore):
    """LlamaIndex vector store over an m3connect store, with BGE-M3 dense, sparse, ColBERT and
    hybrid search.

    .. code-block:: python

        from llama_index.core import StorageContext, VectorStoreIndex
        from llama_index.vector_stores.m3connect import M3VectorStore
        from m3connect import InMemoryStore, M3Encoder, SearchParams

        encoder = M3Encoder.from_pretrained("BAAI/bge-m3")
        vector_store = M3VectorStore(InMemoryStore(encoder=encoder))   # or QdrantStore(...)
        vector_store.add(nodes)                         # one encoder pass per node
        index = VectorStoreIndex.from_vector_store(vector_store, embed_model=...)
        retriever = index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=5)

    Query modes: ``DEFAULT`` runs ``search_params.mode`` (``"dense"`` unless you set another);
    ``SPARSE`` and ``TEXT_SEARCH`` the lexical (sparse) search; ``HYBRID`` the hybrid search
    (``search_params.hybrid_legs``, ``fusion``, ``rerank``...). ``alpha`` in a hybrid query
    selects weighted fusion with weights ``(alpha, 1 - alpha)`` for (dense, sparse); for a
    hybrid query ``hybrid_top_k`` (if set) and for a sparse one ``sparse_top_k`` (if set)
    replace ``similarity_top_k``. ``filters`` (``MetadataFilters``) become m3connect filters
    (see :func:`to_m3_filter`), ``doc_ids`` a condition on ``ref_doc_id``; ``node_ids``
    restrict the search exactly to those nodes. ``MMR`` reads ``similarity_top_k`` times
    :data:`MMR_PREFETCH_FACTOR` candidates of the ``DEFAULT`` search and picks
    ``similarity_top_k`` of them by maximal marginal relevance on the dense vectors
    (``mmr_threshold``, from the query or the retriever's ``vector_store_kwargs``). A sparse
    search returns only the nodes that share at least one token with the query, so it can
    return fewer than ``similarity_top_k`` nodes.

    The store encodes queries itself (``is_embedding_query`` is ``False``): all three
    representations come from the query text, so a retriever needs no ``embed_model`` call.
    :meth:`add` encodes each node's text (with its embed metadata, as LlamaIndex embeds it)
    once for all three representations; a precomputed ``node.embedding`` is not used, since the
    dense vector must come from the same model and pass as the other two. Give the store the
    embed model that ``VectorStoreIndex.from_documents`` or ``IngestionPipeline`` embed with
    (an ``M3ConnectEmbedding``, as ``encoder``): the store then shares its settings
    (``encode_kwargs``, ``query_encode_kwargs``) and its output cache, the embed model's pass
    computes all three representations, and :meth:`add` finds them there: one forward pass
    per node.

    Args:
        store: any :class:`m3connect.M3Store`.
        encoder: the ``llama_index.embeddings.m3connect.M3ConnectEmbedding`` that LlamaIndex
            embeds with (its settings and output cache are shared), or an
            :class:`m3connect.M3Encoder`; by default the store's own encoder.
        search_params: the default :class:`m3connect.SearchParams` (its ``k`` is replaced by
            the query's top k).
        async_store: an :class:`m3connect.AsyncM3Store` over the same collection for the async
            methods; by default the sync store run in worker threads.
        flat_metadata: refuse nested metadata values (for databases that need flat fields).
        encode_kwargs: keyword arguments of :meth:`M3Encoder.encode` for node texts, when
            ``encoder`` is an ``M3Encoder`` (an embed model brings its own).
    """

    stores_text: bool = True
    is_embedding_query: bool = False
    flat_metadata: bool = False

    _store: M3Store = PrivateAttr()
    _async_store: AsyncM3Store = PrivateAttr()
    _cached: CachedEncoder = PrivateAttr()
    _search_params: SearchParams = PrivateAttr()

    def __init__(
        self,
        store: M3Store,
        *,
        encoder: Any = None,
        search_params: SearchParams | None = None,
        async_store: AsyncM3Store | None = None,
        flat_metadata: bool = False,
        encode_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(stores_text=True, flat_metadata=flat_metadata)
        if not isinstance(store, M3Store):
            raise TypeError(f"store must be an m3connect M3Store, got {type(store).__name__}")
        cached = _resolve_encoder(encoder if encoder is not None else store.encoder, encode_kwargs)
        # An embed model's pass (VectorStoreIndex embeds nodes before add) computes all three.
        cached.need("dense", "sparse", "colbert")
        resolved = cached.encoder
        if store.fingerprint is not None and resolved is not store.encoder:
            resolved.fingerprint.check_compatible(store.fingerprint, f"the {type(store).__name__}")
        self._store = store
        self._async_store = async_store or AsyncStoreAdapter(store)
        self._cached = cached
        self._search_params = search_params or SearchParams(mode="dense")

    @classmethod
    def class_name(cls) -> str:
        return "M3VectorStore"

    @property
    def client(self) -> M3Store:
        """The wrapped m3connect store."""
        return self._store

    @property
    def encoder(self) -> M3Encoder:
        return self._cached.encoder

    @property
    def cached_encoder(self) -> CachedEncoder:
        """The encoder with its settings and output cache (an embed model's, when given one)."""
        return self._cached

    @property
    def search_params(self) -> SearchParams:
        return self._search_params

    # --- writing --------------------------------------------------------------------------

    def _prepare(
        self, nodes: Sequence[BaseNode]
    ) -> tuple[list[str], list[str], list[str], list[dict]]:
        ids, to_encode, texts, metadatas = [], [], [], []
        for node in nodes:
            ids.append(node.node_id)
            to_encode.append(node.get_content(metadata_mode=MetadataMode.EMBED))
            texts.append(node.get_content(metadata_mode=MetadataMode.NONE))
            metadatas.append(
                node_to_metadata_dict(node, remove_text=True, flat_metadata=self.flat_metadata)
            )
        return ids, to_encode, texts, metadatas

    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Encode each node's text (as LlamaIndex embeds it: with its embed metadata) once
        for all three representations, and upsert the nodes. Returns the node ids."""
        if not nodes:
            return []
        ids, to_encode, texts, metadatas = self._prepare(nodes)
        output = self._cached.encode_documents(to_encode)
        self._store.add(ids, output, texts=texts, metadatas=metadatas)
        return ids

    async def async_add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        if not nodes:
            return []
        ids, to_encode, texts, metadatas = self._prepare(nodes)
        output: M3Output = await asyncio.to_thread(self._cached.encode_documents, to_encode)
        await self._async_store.add(ids, output, texts=texts, metadatas=metadatas)
        return ids

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document ``ref_doc_id``."""
        self._store.delete(filter={REF_DOC_ID_KEY: ref_doc_id})

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        await self._async_store.delete(filter={REF_DOC_ID_KEY: ref_doc_id})

    def delete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        """Delete the nodes among ``node_ids`` that match ``filters`` (either may be left
        out, not both: use :meth:`clear` to delete everything)."""
        condition = to_m3_filter(filters)
        if node_ids is None and condition is None:
            raise ValueError("delete_nodes needs node_ids or filters (clear() deletes everything)")
        if node_ids is None:
            self._store.delete(filter=condition)
        elif condition is None:
            self._store.delete(id_list(node_ids))
        else:
            records = self._store.get(id_list(node_ids))
            self._store.delete([r.id for r in records if matches(condition, r.metadata)])

    async def adelete_nodes(
        self,
        node_ids: list[str] | None = None,
        filters: MetadataFilters | None = None,
        **delete_kwargs: Any,
    ) -> None:
        await asyncio.to_thread(self.delete_nodes, node_ids, filters)

    def clear(self) -> None:
        """Delete every node of the store."""
        self._store.clear()

    async def aclear(self) -> None:
        await self._async_store.clear()

    # --- reading ------------------------------------------------------------------------------

    def get_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None
    ) -> list[BaseNode]:
        """The stored nodes among ``node_ids`` (in that order) and/or matching ``filters``;
        without ``node_ids``, every matching node (read in batches, no cap)."""
        condition = to_m3_filter(filters)
        if node_ids is not None:
            records = self._store.get(id_list(node_ids))
            return [
                record_to_node(r.id, r.text, r.metadata)
                for r in records
                if matches(condition, r.metadata)
            ]
        return [
            record_to_node(r.id, r.text, r.metadata)
            for r in self._store.iter_records(filter=condition)
        ]

    async def aget_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None
    ) -> list[BaseNode]:
        return await asyncio.to_thread(self.get_nodes, node_ids, filters)

    # --- searching ------------------------------------------------------------------------

    def query_params(self, query: VectorStoreQuery) -> SearchParams:
        """The :class:`SearchParams` that ``query`` runs (``node_ids`` aside)."""
        base = self._search_params
        query_mode = VectorStoreQueryMode(query.mode)
        if query_mode in (VectorStoreQueryMode.DEFAULT, VectorStoreQueryMode.MMR):
            mode = base.mode
        elif query_mode in _MODES:
            mode = _MODES[query_mode]
        else:
            raise NotImplementedError(
                f"M3VectorStore does not support query mode {query_mode.value!r}; use default, "
                "sparse, text_search, hybrid or mmr"
            )
        k = query.similarity_top_k
        if mode == "hybrid" and query.hybrid_top_k:
            k = query.hybrid_top_k
        elif mode == "sparse" and query.sparse_top_k:
            k = query.sparse_top_k
        if query_mode == VectorStoreQueryMode.MMR:
            k *= MMR_PREFETCH_FACTOR  # the candidates MMR picks from
        overrides: dict[str, Any] = {"mode": mode, "k": k}
        if mode == "hybrid" and query.alpha is not None:
            if not 0.0 <= query.alpha <= 1.0:
                raise ValueError(f"alpha must be in [0, 1], got {query.alpha}")
            overrides["fusion"] = "weighted"
            overrides["weights"] = (query.alpha, 1.0 - query.alpha, base.weights[2])
        conditions = [c for c in (to_m3_filter(query.filters),) if c is not None]
        if query.doc_ids:
            conditions.append(In(REF_DOC_ID_KEY, tuple(query.doc_ids)))
        if conditions:
            if base.filter is not None:
                conditions.insert(0, _core_filter(base.filter))
            overrides["filter"] = conditions[0] if len(conditions) == 1 else And(tuple(conditions))
        return base.with_overrides(**overrides)

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """Search the store (see the class documentation for the modes)."""
        params = self.query_params(query)
        embedding = self._query_embedding(query, params)
        if query.node_ids:
            hits = self._search_within(query.node_ids, embedding, params)
        else:
            hits = self._store.search(embedding, params)
        if VectorStoreQueryMode(query.mode) == VectorStoreQueryMode.MMR:
            records = self._store.get([h.id for h in hits], with_vectors=True)
            return _select_mmr(query, kwargs, embedding, hits, records)
        return hits_to_result(hits)

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        if query.node_ids:
            return await asyncio.to_thread(self.query, query, **kwargs)
        params = self.query_params(query)
        embedding = await asyncio.to_thread(self._query_embedding, query, params)
        hits = await self._async_store.search(embedding, params)
        if VectorStoreQueryMode(query.mode) == VectorStoreQueryMode.MMR:
            records = await self._async_store.get([h.id for h in hits], with_vectors=True)
            return _select_mmr(query, kwargs, embedding, hits, records)
        return hits_to_result(hits)

    def search(
        self, query: str | M3Embedding, params: SearchParams | None = None, **overrides: Any
    ) -> list[NodeWithScore]:
        """An m3connect search (:class:`SearchParams` or its fields as keyword arguments;
        ``filter`` may be ``MetadataFilters``) returned as scored nodes."""
        params = self._params(params, overrides)
        hits = self._store.search(self._encode(query), params)
        return [NodeWithScore(node=hit_to_node(h), score=h.score) for h in hits]

    async def asearch(
        self, query: str | M3Embedding, params: SearchParams | None = None, **overrides: Any
    ) -> list[NodeWithScore]:
        params = self._params(params, overrides)
        embedding = (
            query
            if isinstance(query, M3Embedding)
            else await asyncio.to_thread(self._encode, query)
        )
        hits = await self._async_store.search(embedding, params)
        return [NodeWithScore(node=hit_to_node(h), score=h.score) for h in hits]

    def _params(self, params: SearchParams | None, overrides: dict[str, Any]) -> SearchParams:
        if isinstance(overrides.get("filter"), MetadataFilters):
            overrides = {**overrides, "filter": to_m3_filter(overrides["filter"])}
        return (params or self._search_params).with_overrides(**overrides)

    def _encode(self, query: str | M3Embedding) -> M3Embedding:
        if isinstance(query, M3Embedding):
            return query
        return self._cached.encode_query(query)

    def _query_embedding(self, query: VectorStoreQuery, params: SearchParams) -> M3Embedding:
        if query.query_str is not None:
            return self._cached.encode_query(query.query_str)
        if query.query_embedding is not None:
            if params.scored_parts != ("dense",):
                raise ValueError(
                    "a query without query_str can only run a dense search (its embedding is a "
                    f"dense vector); this query needs {', '.join(params.scored_parts)}"
                )
            return M3Embedding(dense=np.asarray(query.query_embedding, dtype=np.float32))
        raise ValueError("a VectorStoreQuery needs query_str (or a dense query_embedding)")

    def _search_within(
        self, node_ids: Sequence[str], embedding: M3Embedding, params: SearchParams
    ) -> list[Hit]:
        """The exact search restricted to ``node_ids`` (the store's :meth:`search_within`)."""
        return self._store.search_within(node_ids, embedding, params)


# --- conversions -------------------------------------------------------------------------------


def _select_mmr(
    query: VectorStoreQuery,
    kwargs: dict[str, Any],
    embedding: M3Embedding,
    hits: Sequence[Hit],
    records: Sequence[Record],
) -> VectorStoreQueryResult:
    """Maximal marginal relevance (LlamaIndex's own selection, on the dense vectors) over the
    candidates ``hits``; ``mmr_threshold`` (0: most diverse, 1: most relevant; default 0.5)
    comes from the query or the retriever's ``vector_store_kwargs``."""
    if embedding.dense is None:
        raise ValueError("maximal marginal relevance needs the query's dense vector")
    by_key = {(type(r.id), r.id): r for r in records}
    kept = [h for h in hits if (type(h.id), h.id) in by_key]
    if not kept:
        return hits_to_result([])
    threshold = kwargs.get("mmr_threshold", query.mmr_threshold)
    scores, chosen = get_top_k_mmr_embeddings(
        np.asarray(embedding.dense, dtype=np.float32).tolist(),
        [np.asarray(by_key[(type(h.id), h.id)].embedding.dense).tolist() for h in kept],  # type: ignore[union-attr]
        similarity_top_k=query.similarity_top_k,
        embedding_ids=list(range(len(kept))),
        mmr_threshold=threshold,
    )
    nodes = [hit_to_node(kept[i]) for i in chosen]
    return VectorStoreQueryResult(
        nodes=nodes, similarities=list(scores), ids=[n.node_id for n in nodes]
    )


def _resolve_encoder(encoder: Any, encode_kwargs: dict[str, Any] | None) -> CachedEncoder:
    if isinstance(encoder, M3Encoder):
        return CachedEncoder(encoder, encode_kwargs=encode_kwargs)
    cached = getattr(encoder, "cached_encoder", None)
    if isinstance(cached, CachedEncoder):
        if encode_kwargs:
            raise ValueError(
                "encode_kwargs go to the embed model (M3ConnectEmbedding(encode_kwargs=...)) when "
                "the store is given one: it encodes with the embed model's settings"
            )
        return cached
    inner = getattr(encoder, "encoder", None)
    if isinstance(inner, M3Encoder):
        return CachedEncoder(inner, encode_kwargs=encode_kwargs)
    if encoder is None:
        raise ValueError(
            "M3VectorStore needs an encoder: pass encoder=M3Encoder.from_pretrained(...) (or an "
            "M3Embedding), or give the store one"
        )
    raise TypeError(f"encoder must be an m3connect M3Encoder, got {type(encoder).__name__}")


def _core_filter(spec: FilterLike) -> Filter:
    node = parse_m3_filter(spec)
    if not isinstance(node, (Eq, In, Range, And, Or, Not)):
        raise ValueError("a RawFilter in search_params cannot be combined with a query's filters")
    return node


def record_to_node(doc_id: Any, text: str | None, metadata: dict[str, Any]) -> BaseNode:
    """A stored document as a LlamaIndex node: the node that was added, when it was added
    through LlamaIndex; otherwise a ``TextNode`` with the document's id, text and metadata."""
    if "_node_content" in metadata:
        return metadata_dict_to_node(metadata, text=text)
    return TextNode(id_=str(doc_id), text=text or "", metadata=dict(metadata))


def hit_to_node(hit: Hit) -> BaseNode:
    """A search hit as a node whose metadata carries the per-representation scores."""
    node = record_to_node(hit.id, hit.text, hit.metadata)
    node.metadata[SCORES_KEY] = dict(hit.scores)
    for excluded in (node.excluded_embed_metadata_keys, node.excluded_llm_metadata_keys):
        if SCORES_KEY not in excluded:
            excluded.append(SCORES_KEY)
    return node


def hits_to_result(hits: Sequence[Hit]) -> VectorStoreQueryResult:
    nodes = [hit_to_node(h) for h in hits]
    return VectorStoreQueryResult(
        nodes=nodes, similarities=[h.score for h in hits], ids=[n.node_id for n in nodes]
    )


def to_m3_filter(filters: MetadataFilters | None) -> Filter | None:
    """LlamaIndex ``MetadataFilters`` as an m3connect filter (``None`` for no condition).

    ``==``, ``!=``, ``>``, ``>=``, ``<``, ``<=``, ``in``, ``nin``, ``any`` (the stored list
    holds one of the values), ``all`` (it holds every value) and ``contains`` (it holds the
    value) translate exactly; conditions ``and``, ``or`` and ``not`` (none of the filters
    match) and nested ``MetadataFilters`` too. ``text_match`` and ``is_empty`` have no
    equivalent in m3connect's filter language and raise ``NotImplementedError``.
    """
    if filters is None or not filters.filters:
        return None
    children = [_translate(f) for f in filters.filters]
    children = [c for c in children if c is not None]
    if not children:
        return None
    condition = filters.condition or FilterCondition.AND
    if condition == FilterCondition.NOT:
        return Not(children[0] if len(children) == 1 else Or(tuple(children)))
    if len(children) == 1:
        return children[0]
    return And(tuple(children)) if condition == FilterCondition.AND else Or(tuple(children))


def _translate(item: MetadataFilter | MetadataFilters) -> Filter | None:
    if isinstance(item, MetadataFilters):
        return to_m3_filter(item)
    key, value, op = item.key, item.value, item.operator
    field = Field(key)
    if op in (FilterOperator.EQ, FilterOperator.CONTAINS):
        return field == _scalar(value, key, op)
    if op == FilterOperator.NE:
        return field != _scalar(value, key, op)
    if op == FilterOperator.GT:
        return field > _scalar(value, key, op)
    if op == FilterOperator.GTE:
        return field >= _scalar(value, key, op)
    if op == FilterOperator.LT:
        return field < _scalar(value, key, op)
    if op == FilterOperator.LTE:
        return field <= _scalar(value, key, op)
    if op in (FilterOperator.IN, FilterOperator.ANY):
        return field.isin(_values(value, key, op))
    if op == FilterOperator.NIN:
        return ~field.isin(_values(value, key, op))
    if op == FilterOperator.ALL:
        values = _values(value, key, op)
        return (
            And(tuple(Field(key) == v for v in values))
            if len(values) > 1
            else Field(key) == values[0]
        )
    raise NotImplementedError(
        f"the filter operator {op.value!r} (key {key!r}) has no equivalent in m3connect's filter "
        "language"
    )


def _scalar(value: Any, key: str, op: FilterOperator) -> Any:
    if isinstance(value, list) or value is None:
        raise ValueError(
            f"the filter operator {op.value!r} on {key!r} takes one value, got {value!r}"
        )
    return value


def _values(value: Any, key: str, op: FilterOperator) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    if not values or any(v is None for v in values):
        raise ValueError(
            f"the filter operator {op.value!r} on {key!r} takes a non-empty list, got {value!r}"
        )
    return list(values)
