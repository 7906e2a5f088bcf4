"""The exact in-memory reference store: numpy, brute force, no database.

It defines the right answer of every search: each adapter's tests compare against it on the
same data. It is also a fine store for small corpora (thousands of documents) and tests.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3connect.filters import Filter, FilterLike, RawFilter, matches, parse_filter
from m3connect.scoring import colbert_scores, dense_scores, lexical_scores
from m3connect.search import run_search
from m3connect.store import (
    Hit,
    M3Store,
    Record,
    SearchParams,
    StoreError,
    check_delete_target,
    check_id,
    id_list,
)
from m3connect.types import DocId, M3Embedding, M3Output


@dataclass
class _Doc:
    dense: np.ndarray
    sparse: dict[int, float]
    colbert: np.ndarray
    text: str | None
    metadata: dict[str, Any]


class InMemoryStore(M3Store):
    """Brute-force exact search over documents held in memory.

    Ties in a ranking keep insertion order (an upsert keeps a document's original place).
    """

    def __init__(self, encoder=None, **options: Any) -> None:  # type: ignore[no-untyped-def]
        super().__init__(encoder, **options)
        self._docs: dict[DocId, _Doc] = {}
        self._dense_cache: tuple[list[DocId], np.ndarray] | None = None

    # --- writing --------------------------------------------------------------------------

    def add(
        self,
        ids: Sequence[DocId],
        embeddings: M3Output,
        texts: Sequence[str | None] | None = None,
        metadatas: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> None:
        batch = self.prepare_batch(ids, embeddings, texts, metadatas)
        # Every document is built before the first is stored: one update, whole or nothing.
        new = {
            doc_id: _Doc(
                dense=batch.embeddings.dense[i].copy(),  # type: ignore[index]
                sparse=dict(batch.embeddings.sparse[i]),  # type: ignore[index]
                colbert=batch.embeddings.colbert[i].copy(),  # type: ignore[index]
                text=batch.texts[i],
                metadata=copy.deepcopy(batch.metadatas[i]),
            )
            for i, doc_id in enumerate(batch.ids)
        }
        self._docs.update(new)
        self._dense_cache = None

    def get(self, ids: Sequence[DocId], *, with_vectors: bool = False) -> list[Record]:
        records = []
        for doc_id in id_list(ids):
            doc = self._docs.get(check_id(doc_id))
            if doc is None:
                continue
            embedding = (
                M3Embedding(doc.dense.copy(), dict(doc.sparse), doc.colbert.copy())
                if with_vectors
                else None
            )
            records.append(Record(doc_id, doc.text, copy.deepcopy(doc.metadata), embedding))
        return records

    def delete(self, ids: Sequence[DocId] | None = None, *, filter: FilterLike = None) -> None:
        check_delete_target(ids, filter)
        node = self._filter(filter) if filter is not None else None
        doomed = set()
        if ids is not None:
            doomed.update(i for i in id_list(ids) if i in self._docs)
        if filter is not None:
            doomed.update(i for i, d in self._docs.items() if matches(node, d.metadata))
        for doc_id in doomed:
            del self._docs[doc_id]
        self._dense_cache = None

    def iter_records(
        self, *, filter: FilterLike = None, with_vectors: bool = False, batch_size: int = 256
    ) -> Iterator[Record]:
        node = self._filter(filter)
        for doc_id in list(self._docs):  # a snapshot: writes while iterating are not seen
            doc = self._docs.get(doc_id)
            if doc is not None and matches(node, doc.metadata):
                yield from self.get([doc_id], with_vectors=with_vectors)

    def count(self, *, filter: FilterLike = None) -> int:
        node = self._filter(filter)
        if node is None:
            return len(self._docs)
        return sum(matches(node, d.metadata) for d in self._docs.values())

    # --- searching ------------------------------------------------------------------------

    def _search(self, query: M3Embedding, params: SearchParams) -> list[Hit]:
        node = self._filter(params.filter)
        allowed = [i for i, d in self._docs.items() if matches(node, d.metadata)]

        def leg_search(leg: str, limit: int) -> list[tuple[DocId, float]]:
            scores = self._leg_scores(query, leg, allowed)
            keep = scores > 0 if leg == "sparse" else np.ones(len(allowed), dtype=bool)
            order = np.argsort(-scores, kind="stable")
            return [(allowed[j], float(scores[j])) for j in order if keep[j]][:limit]

        def fetch(ids: Sequence[DocId], parts: Sequence[str]) -> dict[DocId, M3Embedding]:
            return {
                i: M3Embedding(self._docs[i].dense, self._docs[i].sparse, self._docs[i].colbert)
                for i in ids
                if i in self._docs
            }

        return [
            Hit(
                s.id,
                s.score,
                s.scores,
                self._docs[s.id].text,
                copy.deepcopy(self._docs[s.id].metadata),
            )
            for s in run_search(query, params, leg_search, fetch)
        ]

    def _leg_scores(self, query: M3Embedding, leg: str, ids: list[DocId]) -> np.ndarray:
        if not ids:
            return np.zeros(0)
        if leg == "dense":
            all_ids, matrix = self._dense_matrix()
            if len(ids) == len(all_ids):
                return dense_scores(query.dense, matrix)  # type: ignore[arg-type]
            return dense_scores(query.dense, np.stack([self._docs[i].dense for i in ids]))  # type: ignore[arg-type]
        if leg == "sparse":
            return lexical_scores(query.sparse, [self._docs[i].sparse for i in ids])  # type: ignore[arg-type]
        return colbert_scores(query.colbert, [self._docs[i].colbert for i in ids])  # type: ignore[arg-type]

    def _dense_matrix(self) -> tuple[list[DocId], np.ndarray]:
        if self._dense_cache is None:
            ids = list(self._docs)
            self._dense_cache = (ids, np.stack([self._docs[i].dense for i in ids]))
        return self._dense_cache

    @staticmethod
    def _filter(spec: FilterLike) -> Filter | None:
        node = parse_filter(spec)
        if isinstance(node, RawFilter):
            raise StoreError(
                "the in-memory store has no database filter language: use the core filters"
            )
        return node
