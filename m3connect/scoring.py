"""Exact BGE-M3 scores: one query against many documents, vectorized.

These are the project's definitions (the paper's section 3 and the reference ``compute_score``).
Every store adapter and retriever reports scores on this scale; adapters convert what their
database computes (a MaxSim *sum*, Elasticsearch's ``(1 + dot) / 2``) back to these.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import ThreadpoolController

from m3connect.types import M3Embedding, M3Output

logger = logging.getLogger(__name__)

#: The reference README's weights for (dense, sparse, colbert).
DEFAULT_WEIGHTS: tuple[float, float, float] = (0.4, 0.2, 0.4)

# Float32 elements of document rows per matmul block in colbert_scores (1 MiB: two documents
# of 128 x 1024): each block is converted into a scratch buffer that stays in the core's cache
# and multiplied from there at once, so float16 rows cost little more than float32 ones, and
# memory stays bounded for any number of candidates (mode="colbert" over a whole collection).
_COLBERT_BLOCK_ELEMENTS = 1 << 18

# Float32 elements of the blocks one worker thread takes at a time (8 MiB).
_COLBERT_TASK_ELEMENTS = 1 << 21

# One scratch block per thread, reused across calls: a fresh buffer per call costs its page
# faults every time, about as much as converting the rows into it.
_scratch = threading.local()


def dense_scores(query: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """``<e_q, e_p>`` for each document row. ``query`` is ``[d]``, ``docs`` ``[n, d]``."""
    query = np.asarray(query, dtype=np.float32)
    docs = np.asarray(docs)
    if docs.ndim != 2 or docs.shape[1] != query.shape[-1]:
        raise ValueError(f"dense shapes do not match: query {query.shape}, docs {docs.shape}")
    return (docs.astype(np.float32, copy=False) @ query).astype(np.float64)


def lexical_score(query: Mapping[int, float], doc: Mapping[int, float]) -> float:
    """``sum over shared token ids t of w_q[t] * w_p[t]``."""
    if len(doc) < len(query):
        query, doc = doc, query
    return float(sum(w * doc[t] for t, w in query.items() if t in doc))


def lexical_scores(query: Mapping[int, float], docs: Sequence[Mapping[int, float]]) -> np.ndarray:
    """:func:`lexical_score` of the query against each document."""
    items = list(query.items())
    out = np.zeros(len(docs), dtype=np.float64)
    for i, doc in enumerate(docs):
        out[i] = sum(w * doc[t] for t, w in items if t in doc)
    return out


def colbert_scores(query: np.ndarray, docs: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over query rows of the best dot product with any document row.

    ``query`` is ``[m, d]``; each document ``[n_i, d]`` (float32 or float16). A document with
    no rows scores 0. Databases compute the *sum* (MaxSim); divide theirs by ``m`` to compare.

    One batched computation: the documents' rows are packed block by block into one float32
    matrix (float16 converted once, on the way in), multiplied with the query in BLAS, and
    reduced per document with a max over its rows, then a mean over the query rows.
    """
    query = np.asarray(query, dtype=np.float32)
    if query.ndim != 2:
        raise ValueError(f"a ColBERT query must be [m, d], got shape {query.shape}")
    out = np.zeros(len(docs), dtype=np.float64)
    m, dim = query.shape
    if len(docs) == 0 or m == 0:
        return out
    lengths = [len(doc) for doc in docs]
    for doc, n in zip(docs, lengths, strict=True):
        if n and (np.ndim(doc) != 2 or np.shape(doc)[1] != dim):
            raise ValueError(
                f"ColBERT shapes do not match: query {query.shape}, doc {np.shape(doc)}"
            )
    query_t = np.ascontiguousarray(query.T)  # [d, m]: each block is rows @ query_t
    block_rows = max(1, _COLBERT_BLOCK_ELEMENTS // max(1, dim))
    task_rows = max(block_rows, _COLBERT_TASK_ELEMENTS // max(1, dim))
    tasks: list[list[tuple[list[int], int]]] = [[]]
    task_size = 0
    start = 0
    while start < len(docs):
        # The next block: documents until their rows fill it (a longer document alone).
        members: list[int] = []
        rows = 0
        stop = start
        while stop < len(docs) and (rows == 0 or rows + lengths[stop] <= block_rows):
            if lengths[stop]:
                members.append(stop)
                rows += lengths[stop]
            stop += 1
        if members:
            if task_size >= task_rows:
                tasks.append([])
                task_size = 0
            tasks[-1].append((members, rows))
            task_size += rows
        start = stop

    half = any(isinstance(doc, np.ndarray) and doc.dtype == np.float16 for doc in docs)
    # Worker threads (numpy and torch release the GIL) each run one-threaded products: a
    # block is too small for BLAS's own threads, whose start and join per product cost more
    # than the product on a busy machine.
    # float16 blocks go to the workers even alone: there torch converts and multiplies in one
    # thread (see _serial_torch); the calling thread's torch may run parallel regions.
    in_caller = (len(tasks) == 1 or _WORKERS == 1) and not (half and _torch() is not None)
    # torch multiplies (in the workers only) in IEEE float32: a process may have allowed bf16
    # or tf32 matmuls.
    torch_mm = not in_caller and _torch_matmul_is_float32()

    def run(task: list[tuple[list[int], int]]) -> None:
        for members, rows in task:
            out[members] = _block_maxsim(query_t, [docs[i] for i in members], rows, torch_mm)

    with _one_blas_thread():
        if in_caller:
            for task in tasks:
                run(task)
        else:
            for _ in _pool().map(run, tasks):
                pass
    return out


def _block_maxsim(
    query_t: np.ndarray, docs: Sequence[np.ndarray], rows: int, torch_mm: bool = False
) -> np.ndarray:
    """ColBERT means of non-empty ``docs`` (``rows`` rows in all) in one matrix product.
    ``torch_mm``: torch's matrix products are plain float32 now (see :func:`colbert_scores`)."""
    torch = _serial_torch()
    # torch's BLAS (MKL) multiplies a 128 x 1024 document by 32 query rows ~25% faster than
    # numpy's, where it runs one-threaded in this worker.
    torch_mm = torch is not None and torch_mm and _torch_multiplies_here(torch)
    if all(_multiplies_in_place(doc) for doc in docs):
        # float32 rows BLAS reads where they lie (a memory-mapped file, an array per
        # document): one product per document, no copy.
        if torch_mm:
            query = torch.from_numpy(query_t)
            products = [torch.mm(_from_numpy(torch, doc), query).numpy() for doc in docs]
        else:
            products = [doc @ query_t for doc in docs]
        best = np.stack([product.max(axis=0) for product in products])
        return best.mean(axis=1, dtype=np.float64)
    half = torch is not None and any(getattr(doc, "dtype", None) == np.float16 for doc in docs)
    # float16 rows: converted into the scratch block a document at a time, in this thread, and
    # multiplied there: the product and its input stay in this core's cache.
    matrix = _block_matrix(docs, rows, query_t.shape[0], torch if half else None)
    if half and torch_mm:
        sims = torch.mm(torch.from_numpy(matrix), torch.from_numpy(query_t)).numpy()
    else:
        sims = matrix @ query_t  # [rows, m]
    if len(docs) == 1:
        best = sims.max(axis=0, keepdims=True)
    else:
        offsets = np.zeros(len(docs), dtype=np.intp)
        np.cumsum([len(doc) for doc in docs[:-1]], out=offsets[1:])
        best = np.maximum.reduceat(sims, offsets, axis=0)  # [docs, m]
    return best.mean(axis=1, dtype=np.float64)


#: Rows from which a float32 document is multiplied where it lies rather than packed.
_IN_PLACE_ROWS = 32


def _multiplies_in_place(doc: np.ndarray) -> bool:
    return (
        isinstance(doc, np.ndarray)
        and doc.dtype == np.float32
        and doc.flags.c_contiguous
        and len(doc) >= _IN_PLACE_ROWS
    )


def _block_matrix(
    docs: Sequence[np.ndarray], rows: int, dim: int, serial_torch: Any = None
) -> np.ndarray:
    """The documents' rows one after another as one float32 ``[rows, dim]`` matrix.
    ``serial_torch``: torch, where it runs one-threaded in this thread (:func:`_serial_torch`):
    a float16 document is then converted in one call, above torch's grain size."""
    first = docs[0]
    if len(docs) == 1 and isinstance(first, np.ndarray) and first.dtype == np.float32:
        return first  # BLAS takes it as it is
    matrix = _scratch_rows("float32", rows, dim)
    torch = serial_torch or _torch()
    if torch is None:
        return _pack_rows(docs, matrix)  # any dtype -> float32, once
    at = 0
    for doc in docs:
        n = len(doc)
        if isinstance(doc, np.ndarray) and doc.dtype == np.float16:
            if not (doc.flags.c_contiguous and doc.dtype.isnative):
                doc = np.ascontiguousarray(doc, dtype=np.float16)  # strided or byte-swapped
            if serial_torch is not None:
                torch.from_numpy(matrix[at : at + n]).copy_(_from_numpy(torch, doc))
            else:
                _float16_to_float32(torch, doc, matrix[at : at + n])  # converted where it lies
        else:
            matrix[at : at + n] = doc
        at += n
    return matrix


def _from_numpy(torch, array: np.ndarray):  # type: ignore[no-untyped-def]
    """``torch.from_numpy``; a read-only array (a memory-mapped file), only read here, without
    torch's warning about it (``catch_warnings`` only then: it is slow and process-wide)."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _pack_rows(docs: Sequence[np.ndarray], out: np.ndarray) -> np.ndarray:
    """The documents' rows one after another into ``out``."""
    at = 0
    for doc in docs:
        out[at : at + len(doc)] = doc
        at += len(doc)
    return out


def _float16_to_float32(torch, half: np.ndarray, out: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    """``out[:] = half``: torch's vectorized conversion (numpy's takes about three times as
    long, as long as the product itself). Pieces stay under torch's parallel grain size so the
    conversion runs in this thread: a torch thread pool waking beside OpenBLAS's spinning
    threads (the product) slows both down severalfold on small machines, and on a busy
    machine each parallel region can stall for a time slice."""
    step = max(1, (_TORCH_GRAIN_SIZE - 1) // max(1, half.shape[1]))
    source = _from_numpy(torch, half)
    target = torch.from_numpy(out)
    for start in range(0, len(half), step):
        target[start : start + step].copy_(source[start : start + step])


#: torch's ``at::internal::GRAIN_SIZE``: element-wise ops on fewer elements run serially.
_TORCH_GRAIN_SIZE = 32768
_TORCH = None


def _torch():  # type: ignore[no-untyped-def]
    """torch (an m3connect dependency), imported on the first float16 conversion; ``None``
    where it is missing (numpy converts then)."""
    global _TORCH
    if _TORCH is None:
        try:
            import torch
        except ImportError:  # pragma: no cover - torch is a dependency
            _TORCH = False
        else:
            _TORCH = torch
    return _TORCH or None


def _scratch_rows(dtype: str, rows: int, dim: int) -> np.ndarray:
    """A ``[rows, dim]`` work matrix, reused by the calling thread (a document longer than a
    block gets one of its own, not kept)."""
    if rows * dim > _COLBERT_BLOCK_ELEMENTS:
        return np.empty((rows, dim), dtype=dtype)
    buffer = getattr(_scratch, dtype, None)
    if buffer is None or buffer.size < rows * dim:
        buffer = np.empty(_COLBERT_BLOCK_ELEMENTS, dtype=dtype)
        setattr(_scratch, dtype, buffer)
    return buffer[: rows * dim].reshape(rows, dim)


#: Threads that score ColBERT blocks in parallel: the cores this process may use (at most 8).
_WORKERS = max(
    1,
    min(
        8,
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
    ),
)
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(
                _WORKERS, thread_name_prefix="m3connect-colbert", initializer=_mark_worker
            )
        return _POOL


def _mark_worker() -> None:
    _scratch.worker = True


def _serial_torch():  # type: ignore[no-untyped-def]
    """torch, where the calling thread is one of this module's workers and torch runs in it
    one-threaded; else ``None`` (convert in pieces under torch's grain size, multiply in numpy).

    torch sizes its OpenMP team per thread: each thread reads the process's setting on its
    first parallel op, then follows its own OpenMP thread count. A worker sets its own count to
    1 after that first read, once: whole documents convert in one call, and no caller's torch
    setting changes. Checked, not assumed: ``torch.get_num_threads()`` must then say 1 here."""
    torch = _torch()
    if torch is None or not getattr(_scratch, "worker", False):
        return None
    serial = getattr(_scratch, "serial_torch", None)
    if serial is None:
        torch.get_num_threads()  # torch's per-thread setup, before ours
        _threadpool_controller().limit(limits=1, user_api="openmp")  # this thread only
        serial = _scratch.serial_torch = torch.get_num_threads() == 1
        if not serial:  # pragma: no cover - an OpenMP runtime without per-thread counts
            logger.debug("torch stays parallel in ColBERT worker threads; converting in pieces")
    return torch if serial else None


def _torch_multiplies_here(torch) -> bool:  # type: ignore[no-untyped-def]
    """Whether torch's matrix product runs one-threaded in the calling (serial) worker. torch
    links MKL, whose count follows this thread's OpenMP count unless ``torch.set_num_threads``
    ran before the thread's torch setup (it then sets MKL's count in each thread, a count only
    read here): numpy multiplies then (its BLAS is one-threaded during scoring)."""
    ok = getattr(_scratch, "torch_mm", None)
    if ok is None:
        if torch.backends.mkl.is_available():  # one thread, or unknown: not ok
            mkl = _torch_mkl(torch)
            ok = mkl is not None and int(mkl.MKL_Get_Max_Threads()) == 1
        else:  # torch's BLAS follows this thread's OpenMP count
            ok = True
        _scratch.torch_mm = ok
        if not ok:
            logger.debug("torch's MKL is multi-threaded in ColBERT workers; numpy multiplies")
    return ok


def _torch_matmul_is_float32() -> bool:
    """Whether torch's CPU matrix products are plain float32 now: no bf16 or tf32 allowed by
    ``torch.set_float32_matmul_precision`` or the ``fp32_precision`` settings (checked at
    every level, on each call: they are process-wide and may change). ``False`` without torch
    or when unsure."""
    torch = _torch()
    if torch is None:
        return False
    try:
        if torch.get_float32_matmul_precision() != "highest":
            return False
        backends = torch.backends
        mkldnn = getattr(backends, "mkldnn", None)
        levels = (
            getattr(backends, "fp32_precision", None),
            getattr(mkldnn, "fp32_precision", None),
            getattr(getattr(mkldnn, "matmul", None), "fp32_precision", None),
        )
    except RuntimeError:  # legacy and new precision settings mixed: unsure
        return False
    return all(level in (None, "none", "ieee") for level in levels)


_TORCH_MKL: Any = None


def _torch_mkl(torch):  # type: ignore[no-untyped-def]
    """The MKL linked into torch's CPU library (threadpoolctl does not see it), or ``None``.
    Only its no-argument ``MKL_Get_Max_Threads`` is called."""
    global _TORCH_MKL
    with _BLAS_LOCK:
        if _TORCH_MKL is None:
            _TORCH_MKL = False
            for path in sorted(Path(torch.__file__).parent.joinpath("lib").glob("libtorch_cpu.*")):
                try:
                    lib = ctypes.CDLL(str(path))
                    lib.MKL_Get_Max_Threads.restype = ctypes.c_int
                    lib.MKL_Get_Max_Threads.argtypes = []
                except (OSError, AttributeError):
                    continue
                _TORCH_MKL = lib
                break
    return _TORCH_MKL or None


def _threadpool_controller() -> ThreadpoolController:
    """The process's threadpoolctl controller (made once: it inspects every loaded library)."""
    global _BLAS_CONTROLLER
    with _BLAS_LOCK:
        if _BLAS_CONTROLLER is None:
            _BLAS_CONTROLLER = ThreadpoolController()
        return _BLAS_CONTROLLER


_BLAS_LOCK = threading.Lock()
_BLAS_USERS = 0
_BLAS_LIMIT: Any = None
_BLAS_CONTROLLER: Any = None


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """numpy's BLAS limited to one thread while ColBERT blocks are scored (process-wide, as
    BLAS's thread count is: other threads' numpy products run one-threaded meanwhile)."""
    global _BLAS_USERS, _BLAS_LIMIT
    controller = _threadpool_controller()
    with _BLAS_LOCK:
        if _BLAS_USERS == 0:
            _BLAS_LIMIT = controller.limit(limits=1, user_api="blas")
        _BLAS_USERS += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0:
                _BLAS_LIMIT.restore_original_limits()
                _BLAS_LIMIT = None


def combine_scores(
    dense: np.ndarray | float | None,
    sparse: np.ndarray | float | None,
    colbert: np.ndarray | float | None,
    weights: Sequence[float] = DEFAULT_WEIGHTS,
) -> np.ndarray:
    """``(w1*s_dense + w2*s_lex + w3*s_mul) / (w1 + w2 + w3)``, the reference ``compute_score``.

    A part may be ``None`` only if its weight is 0.
    """
    if len(weights) != 3:
        raise ValueError(f"weights are (dense, sparse, colbert), got {tuple(weights)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {tuple(weights)}")
    total: np.ndarray | float = 0.0
    for name, part, w in zip(("dense", "sparse", "colbert"), (dense, sparse, colbert), weights):
        if w == 0:
            continue
        if part is None:
            raise ValueError(f"weight {w} given for {name} but no {name} score")
        total = total + w * np.asarray(part, dtype=np.float64)
    return np.asarray(total, dtype=np.float64) / float(sum(weights))


def score_all(
    query: M3Embedding,
    docs: M3Output,
    parts: Sequence[str] = ("dense", "sparse", "colbert"),
) -> dict[str, np.ndarray]:
    """Each requested score of one query against every document, keyed by part name."""
    scorers = {
        "dense": lambda: dense_scores(_need(query.dense, "dense"), _need(docs.dense, "dense")),
        "sparse": lambda: lexical_scores(
            _need(query.sparse, "sparse"), _need(docs.sparse, "sparse")
        ),
        "colbert": lambda: colbert_scores(
            _need(query.colbert, "colbert"), _need(docs.colbert, "colbert")
        ),
    }
    unknown = set(parts) - scorers.keys()
    if unknown:
        raise ValueError(f"unknown score parts {sorted(unknown)}; known: dense, sparse, colbert")
    return {name: scorers[name]() for name in parts}


def compute_score(
    query: M3Embedding, docs: M3Output, weights: Sequence[float] = DEFAULT_WEIGHTS
) -> dict[str, np.ndarray]:
    """All three scores and their weighted combination, as the reference ``compute_score``
    returns them (keys ``dense``, ``sparse``, ``colbert``, ``all``)."""
    parts = [name for name, w in zip(("dense", "sparse", "colbert"), weights) if w != 0]
    scores = score_all(query, docs, parts)
    scores["all"] = combine_scores(
        scores.get("dense"), scores.get("sparse"), scores.get("colbert"), weights
    )
    return scores


def _need(value, name: str):  # type: ignore[no-untyped-def]
    if value is None:
        raise ValueError(f"the {name} representation was not computed (encode with it enabled)")
    return value
