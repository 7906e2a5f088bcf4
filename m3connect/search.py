"""The search pipeline of the store contract (legs -> fusion -> re-rank -> top k), once.

A store supplies two callables: ``leg_search(leg, limit)``, its database's ranking of the top
``limit`` documents for one representation with exact scores, and
``fetch(ids, parts)``, the stored representations of some documents (to compute the exact
score of a leg for a candidate the leg missed). :func:`run_search` does the rest with the core's
scoring and fusion, so every store means the same thing by the same parameters.

Adapters whose database fuses and re-ranks in the server use :func:`complete_scores` to give
their hits the same per-representation scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from m3connect import fusion
from m3connect.scoring import colbert_scores, combine_scores, dense_scores, lexical_scores
from m3connect.store import LEG_NAMES, SearchParams, StoreError
from m3connect.types import DocId, M3Embedding

LegSearch = Callable[[str, int], Sequence[tuple[DocId, float]]]
FetchEmbeddings = Callable[[Sequence[DocId], Sequence[str]], Mapping[DocId, M3Embedding]]

#: ``scores[doc_id][part]``: exact scores known so far.
ScoreTable = dict[DocId, dict[str, float]]


@dataclass
class ScoredId:
    """A ranked document before its text and metadata are loaded."""

    id: DocId
    score: float
    scores: dict[str, float]


def exact_scores(
    query: M3Embedding, embeddings: Sequence[M3Embedding], part: str
) -> list[float]:
    """The exact ``part`` score of the query against each embedding."""
    if part == "dense":
        import numpy as np

        values = dense_scores(query.dense, np.stack([e.dense for e in embeddings]))  # type: ignore[arg-type,misc]
    elif part == "sparse":
        values = lexical_scores(query.sparse, [e.sparse for e in embeddings])  # type: ignore[arg-type,misc]
    elif part == "colbert":
        values = colbert_scores(query.colbert, [e.colbert for e in embeddings])  # type: ignore[arg-type,misc]
    else:
        raise ValueError(f"unknown representation {part!r}")
    return [float(v) for v in values]


def complete_scores(
    query: M3Embedding,
    table: ScoreTable,
    ids: Sequence[DocId],
    parts: Sequence[str],
    fetch: FetchEmbeddings,
) -> None:
    """Fill ``table`` with the exact ``parts`` scores of ``ids``, fetching only what is missing."""
    missing_parts = [p for p in parts if any(p not in table.get(i, {}) for i in ids)]
    if not missing_parts:
        return
    missing_ids = [i for i in ids if any(p not in table.get(i, {}) for p in missing_parts)]
    fetched = fetch(missing_ids, missing_parts)
    lost = [i for i in missing_ids if i not in fetched]
    if lost:
        raise StoreError(f"documents {lost[:5]!r} vanished from the store during the search")
    for part in missing_parts:
        need = [i for i in missing_ids if part not in table.get(i, {})]
        if not need:
            continue
        values = exact_scores(query, [fetched[i] for i in need], part)
        for doc_id, value in zip(need, values):
            table.setdefault(doc_id, {})[part] = value


def run_search(
    query: M3Embedding,
    params: SearchParams,
    leg_search: LegSearch,
    fetch: FetchEmbeddings,
) -> list[ScoredId]:
    """The contract's answer: legs, fusion, re-rank, top ``k``, with per-part exact scores."""
    table: ScoreTable = {}
    rankings: list[list[tuple[DocId, float]]] = []
    for leg in params.legs:
        ranking = [(doc_id, float(score)) for doc_id, score in leg_search(leg, params.leg_limit)]
        rankings.append(ranking)
        for doc_id, score in ranking:
            table.setdefault(doc_id, {})[leg] = score

    ranked = fuse(query, params, rankings, table, fetch)

    if params.rerank is not None:
        pool = [doc_id for doc_id, _ in ranked[: params.candidates]]
        parts = ("colbert",) if params.rerank == "colbert" else LEG_NAMES
        complete_scores(query, table, pool, parts, fetch)
        if params.rerank == "colbert":
            rescored = {doc_id: table[doc_id]["colbert"] for doc_id in pool}
        else:
            rescored = {
                doc_id: float(
                    combine_scores(
                        table[doc_id]["dense"],
                        table[doc_id]["sparse"],
                        table[doc_id]["colbert"],
                        params.weights,
                    )
                )
                for doc_id in pool
            }
        ranked = sorted(rescored.items(), key=lambda item: -item[1])

    top = ranked[: params.k]
    top_ids = [doc_id for doc_id, _ in top]
    complete_scores(query, table, top_ids, params.scored_parts, fetch)
    return [
        ScoredId(doc_id, score, {p: table[doc_id][p] for p in params.scored_parts})
        for doc_id, score in top
    ]


def fuse(
    query: M3Embedding,
    params: SearchParams,
    rankings: Sequence[Sequence[tuple[DocId, float]]],
    table: ScoreTable,
    fetch: FetchEmbeddings,
) -> list[tuple[DocId, float]]:
    """Fuse the legs' rankings as ``params.fusion`` says (one leg: its ranking)."""
    if len(rankings) == 1:
        return list(rankings[0])
    if params.fusion == "rrf":
        return fusion.rrf(rankings, k=params.rrf_k)
    if params.fusion == "dbsf":
        return fusion.dbsf(rankings)
    candidates = list(dict.fromkeys(doc_id for ranking in rankings for doc_id, _ in ranking))
    legs = [leg for leg, w in zip(params.legs, params.leg_weights) if w > 0]
    complete_scores(query, table, candidates, legs, fetch)
    return fusion.weighted(
        [{doc_id: table[doc_id][leg] for doc_id in candidates} for leg in legs],
        [w for w in params.leg_weights if w > 0],
    )
