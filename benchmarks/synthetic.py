"""What the adapter benchmarks share: random vectors of BGE-M3's shapes, and the timing of an
adapter call against the raw database call it replaces.

Dense 1024, ~100 sparse tokens over a Zipf vocabulary (so queries share tokens with
documents), a range of 1024-wide ColBERT rows per document, 32 ColBERT rows per query.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np

from m3connect.types import M3Embedding, M3Output

DIM = 1024
VOCAB = 30_000


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def sparse_row(rng: np.random.Generator, n: int) -> dict[int, float]:
    tokens = np.unique(np.minimum(rng.zipf(1.3, size=n), VOCAB - 1) + rng.integers(0, 50, size=n))
    weights = rng.uniform(0.01, 0.3, size=len(tokens))
    return {int(t): float(w) for t, w in zip(tokens, weights, strict=True)}


def corpus(
    n: int, colbert_rows: tuple[int, int], seed: int = 0
) -> tuple[list[str], M3Output, list[str], list[dict]]:
    """``n`` documents: ids, embeddings (``colbert_rows`` = min, max rows), texts, metadata."""
    rng = np.random.default_rng(seed)
    dense = unit(rng.normal(size=(n, DIM)))
    sparse = [sparse_row(rng, 100) for _ in range(n)]
    low, high = colbert_rows
    colbert = [unit(rng.normal(size=(int(rng.integers(low, high + 1)), DIM))) for _ in range(n)]
    ids = [f"doc-{i}" for i in range(n)]
    texts = [f"passage {i} " + "lorem ipsum " * 40 for i in range(n)]
    metas = [{"lang": ["en", "ko", "de"][i % 3], "year": 2000 + i % 25} for i in range(n)]
    return ids, M3Output(dense=dense, sparse=sparse, colbert=colbert), texts, metas


def queries(n: int, seed: int = 1) -> list[M3Embedding]:
    rng = np.random.default_rng(seed)
    return [
        M3Embedding(
            dense=unit(rng.normal(size=DIM)),
            sparse=sparse_row(rng, 20),
            colbert=unit(rng.normal(size=(32, DIM))),
        )
        for _ in range(n)
    ]


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples)


def interleaved(
    adapter: Callable[[M3Embedding], object],
    raw: Callable[[M3Embedding], object],
    qs: list[M3Embedding],
    warmup: int = 2,
) -> tuple[float, float]:
    """Median ms of ``adapter`` and of ``raw`` over the queries, alternating query by query so
    that a busy machine slows both alike."""
    for q in qs[:warmup]:
        adapter(q)
        raw(q)
    a, r = [], []
    for q in qs:
        t = time.perf_counter()
        raw(q)
        r.append(time.perf_counter() - t)
        t = time.perf_counter()
        adapter(q)
        a.append(time.perf_counter() - t)
    return median_ms(a), median_ms(r)
