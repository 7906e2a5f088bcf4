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

from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from m3connect import fusion
from m3connect.scoring import colbert_scores, combine_scores, dense_scores, lexical_scores
from m3connect.store import LEG_NAMES, SearchParams, StoreError
from m3connect.types import DocId, M3Embedding

LegSearch = Callable[[str, int], Sequence[tuple[DocId, float]]]
FetchEmbeddings = Callable[[Sequence[DocId], Sequence[str]], Mapping[DocId, M3Embedding]]
ScoreMissing = Callable[[Sequence[DocId], Sequence[str]], Mapping[DocId, Mapping[str, float]]]

#: ``scores[doc_id][part]``: exact scores known so far.
ScoreTable = dict[DocId, dict[str, float]]


@dataclass
class ScoredId:
    """A ranked document before its text and metadata are loaded."""

    id: DocId
    score: float
    scores: dict[str, float]


def exact_scores(query: M3Embedding, embeddings: Sequence[M3Embedding], part: str) -> list[float]:
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


@dataclass
class LegStep:
    """Ask the store for one leg: its top ``limit`` documents as ``(id, exact score)``."""

    leg: str
    limit: int


@dataclass
class FusedStep:
    """Ask the store for the fused ranking computed in its database (only when the store said
    it fuses in the server): answer ``(ranking, known)``, the top ``limit`` ``(id, fused score)``
    and any exact per-part scores it learned on the way (``{id: {part: score}}``)."""

    limit: int


@dataclass
class ScoreStep:
    """Ask the store for exact scores: answer ``{id: {part: score}}`` for every id and part."""

    ids: list[DocId]
    parts: list[str]


Step = LegStep | FusedStep | ScoreStep
SearchSteps = Generator[Step, Any, list[ScoredId]]


def search_steps(
    query: M3Embedding, params: SearchParams, *, fused_in_server: bool = False
) -> SearchSteps:
    """The contract's pipeline as a generator of the questions it asks the store.

    Sans I/O: a sync store answers with plain calls (:func:`run_search`), an async store with
    awaits (:func:`run_search_async`), and a store that can compute a score in its database
    (a dot product in an Elasticsearch script) answers :class:`ScoreStep` there.
    """
    table: ScoreTable = {}

    def complete(ids: Sequence[DocId], parts: Sequence[str]) -> Generator[Step, Any, None]:
        missing_parts = [p for p in parts if any(p not in table.get(i, {}) for i in ids)]
        if not missing_parts:
            return
        missing_ids = [i for i in ids if any(p not in table.get(i, {}) for p in missing_parts)]
        answer = yield ScoreStep(missing_ids, missing_parts)
        for doc_id in missing_ids:
            got = answer.get(doc_id)
            if got is None:
                raise StoreError(f"document {doc_id!r} vanished from the store during the search")
            row = table.setdefault(doc_id, {})
            for part in missing_parts:
                row.setdefault(part, float(got[part]))

    if fused_in_server:
        ranking, known = yield FusedStep(params.leg_limit if params.rerank else params.k)
        for doc_id, parts in known.items():
            table.setdefault(doc_id, {}).update(parts)
        ranked = [(doc_id, float(score)) for doc_id, score in ranking]
    else:
        rankings: list[list[tuple[DocId, float]]] = []
        for leg in params.legs:
            answer = yield LegStep(leg, params.leg_limit)
            ranking = [(doc_id, float(score)) for doc_id, score in answer]
            rankings.append(ranking)
            for doc_id, score in ranking:
                table.setdefault(doc_id, {})[leg] = score
        if len(rankings) > 1 and params.fusion == "weighted":
            # The weighted mean needs every leg's exact score of every candidate.
            candidates = list(dict.fromkeys(d for ranking in rankings for d, _ in ranking))
            yield from complete(
                candidates,
                [leg for leg, w in zip(params.legs, params.leg_weights, strict=True) if w > 0],
            )
        ranked = fuse_rankings(params, rankings, table)

    if params.rerank is not None:
        pool = [doc_id for doc_id, _ in ranked[: params.candidates]]
        yield from complete(pool, ("colbert",) if params.rerank == "colbert" else LEG_NAMES)
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
    yield from complete([doc_id for doc_id, _ in top], params.scored_parts)
    return [
        ScoredId(doc_id, score, {p: table[doc_id][p] for p in params.scored_parts})
        for doc_id, score in top
    ]


def scores_from_embeddings(query: M3Embedding, fetch: FetchEmbeddings) -> ScoreMissing:
    """Answer :class:`ScoreStep` s on the client: fetch the stored vectors, score with the core."""

    def score(ids: Sequence[DocId], parts: Sequence[str]) -> dict[DocId, dict[str, float]]:
        fetched = fetch(ids, parts)
        present = [i for i in ids if i in fetched]
        out: dict[DocId, dict[str, float]] = {i: {} for i in present}
        for part in parts:
            for doc_id, value in zip(
                present, exact_scores(query, [fetched[i] for i in present], part)
            ):
                out[doc_id][part] = value
        return out

    return score


def drive_steps(
    steps: SearchSteps,
    leg: Callable[[str, int], Generator[Any, Any, Sequence[tuple[DocId, float]]]],
    score: Callable[[Sequence[DocId], Sequence[str]], Generator[Any, Any, ScoreTable]],
    fused: Callable[[int], Generator[Any, Any, tuple[Sequence[tuple[DocId, float]], ScoreTable]]]
    | None = None,
) -> Generator[Any, Any, list[ScoredId]]:
    """Answer the pipeline's questions with a store's own generator-based I/O.

    Each handler is a generator function: what it yields (the store's requests) passes through
    to the store's driver, sync or async, and what it returns answers the step.
    """
    answer: Any = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration as done:
            return done.value
        if isinstance(step, LegStep):
            answer = yield from leg(step.leg, step.limit)
        elif isinstance(step, ScoreStep):
            answer = yield from score(step.ids, step.parts)
        else:
            if fused is None:
                raise ValueError("the pipeline asked for a server-side fusion nobody provides")
            answer = yield from fused(step.limit)


def run_search(
    query: M3Embedding, params: SearchParams, leg_search: LegSearch, fetch: FetchEmbeddings
) -> list[ScoredId]:
    """The contract's answer for a store whose calls return at once: legs from
    ``leg_search``, missing scores from the core on the vectors that ``fetch`` returns."""
    driver = drive_steps(
        search_steps(query, params),
        _returning(leg_search),
        _returning(scores_from_embeddings(query, fetch)),
    )
    try:
        next(driver)
    except StopIteration as done:
        return done.value
    raise AssertionError("plain functions make no requests")  # pragma: no cover


def _returning(function: Callable[..., Any]) -> Callable[..., Generator[Any, Any, Any]]:
    """``function`` as a handler for :func:`drive_steps` that makes no request."""

    def handler(*args: Any) -> Generator[Any, Any, Any]:
        return function(*args)
        yield  # pragma: no cover - makes this a generator function

    return handler


def fuse_rankings(
    params: SearchParams, rankings: Sequence[Sequence[tuple[DocId, float]]], table: ScoreTable
) -> list[tuple[DocId, float]]:
    """Fuse the legs' rankings as ``params.fusion`` says (one leg: its ranking). Weighted
    fusion reads every leg's exact score of every candidate from ``table``."""
    if len(rankings) == 1:
        return list(rankings[0])
    if params.fusion == "rrf":
        return fusion.rrf(rankings, k=params.rrf_k)
    if params.fusion == "dbsf":
        return fusion.dbsf(rankings)
    legs = [(leg, w) for leg, w in zip(params.legs, params.leg_weights, strict=True) if w > 0]
    candidates = list(dict.fromkeys(doc_id for ranking in rankings for doc_id, _ in ranking))
    return fusion.weighted(
        [{doc_id: table[doc_id][leg] for doc_id in candidates} for leg, _ in legs],
        [w for _, w in legs],
    )
