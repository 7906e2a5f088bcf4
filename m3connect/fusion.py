"""Fusion of ranked result lists: RRF, DBSF and weighted sums of exact scores.

Each input list is a ranking, best first, of ``(doc_id, score)`` pairs. Each function returns
one fused ranking, best first; ties keep the order in which ids were first seen (first list
first), so the result is deterministic.

These definitions are the project's semantics. Databases differ (Qdrant's RRF is
``1 / (k + rank - 1)``, Milvus's weighted ranker squashes scores); adapters choose their
database's parameters so that its answer equals these.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)

#: The constant of the RRF paper (Cormack et al., 2009) and of Milvus and Elasticsearch.
DEFAULT_RRF_K = 60


def _sorted(scores: dict[Key, float]) -> list[tuple[Key, float]]:
    # dicts keep insertion order and sorted() is stable: equal scores stay in first-seen order.
    return sorted(scores.items(), key=lambda item: -item[1])


def rrf(
    rankings: Sequence[Sequence[tuple[Key, float]] | Sequence[Key]],
    k: float = DEFAULT_RRF_K,
    weights: Sequence[float] | None = None,
) -> list[tuple[Key, float]]:
    """Reciprocal rank fusion: ``sum over lists of w_i / (k + rank_i)``, ranks from 1.

    A document absent from a list contributes nothing for it (RRF needs no score). Lists may
    be plain id sequences or ``(id, score)`` pairs (the scores are ignored).
    """
    if k < 0:
        raise ValueError(f"RRF k must be >= 0, got {k}")
    if weights is not None and len(weights) != len(rankings):
        raise ValueError(f"{len(weights)} RRF weights for {len(rankings)} rankings")
    fused: dict[Key, float] = {}
    for i, ranking in enumerate(rankings):
        w = 1.0 if weights is None else float(weights[i])
        for rank, item in enumerate(ranking, start=1):
            key = item[0] if isinstance(item, tuple) else item
            fused[key] = fused.get(key, 0.0) + w / (k + rank)
    return _sorted(fused)


def dbsf_normalize(scores: Sequence[float]) -> list[float]:
    """Distribution-based normalization: ``(s - (mu - 3 sigma)) / (6 sigma)``.

    ``sigma`` is the sample standard deviation (n - 1); one score, or all equal, gives 0.5.
    Not clipped. This is the definition Qdrant uses for ``Fusion.DBSF``.
    """
    n = len(scores)
    if n == 0:
        return []
    if n == 1:
        return [0.5]
    mean = sum(scores) / n
    variance = sum((s - mean) ** 2 for s in scores) / (n - 1)
    if variance == 0:
        return [0.5] * n
    std = variance**0.5
    low = mean - 3 * std
    return [(s - low) / (6 * std) for s in scores]


def dbsf(rankings: Sequence[Sequence[tuple[Key, float]]]) -> list[tuple[Key, float]]:
    """Distribution-based score fusion: normalize each list with :func:`dbsf_normalize`, then
    sum each document's normalized scores over the lists it appears in."""
    fused: dict[Key, float] = {}
    for ranking in rankings:
        normalized = dbsf_normalize([score for _, score in ranking])
        for (key, _), value in zip(ranking, normalized):
            fused[key] = fused.get(key, 0.0) + value
    return _sorted(fused)


def weighted(
    scores: Sequence[Mapping[Key, float]], weights: Sequence[float]
) -> list[tuple[Key, float]]:
    """``sum_i w_i * s_i / sum_i w_i`` over documents that have a score in every list.

    The scores must be exact for every document (compute a leg's score for the documents it
    missed, never take it as 0). A document missing from a list with a non-zero weight is an
    error.
    """
    if len(weights) != len(scores):
        raise ValueError(f"{len(weights)} weights for {len(scores)} score lists")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {tuple(weights)}")
    total = float(sum(weights))
    keys: dict[Key, None] = {}
    for score_map in scores:
        keys.update(dict.fromkeys(score_map))
    fused: dict[Key, float] = {}
    for key in keys:
        value = 0.0
        for score_map, w in zip(scores, weights):
            if w == 0:
                continue
            if key not in score_map:
                raise ValueError(f"document {key!r} has no score in one of the weighted lists")
            value += w * score_map[key]
        fused[key] = value / total
    return _sorted(fused)
