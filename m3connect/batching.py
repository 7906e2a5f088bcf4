"""Length-grouped, token-budget batches for inference, and splitting a batch that runs out of
memory.

The cost of a padded batch is ``batch_size * longest_length`` tokens (attention makes long
rows even dearer), so texts are sorted by length and each batch takes texts of similar length
(within 20% of its longest) up to a token budget: short texts travel in large batches and are
never padded to a long text's length, and a long text travels in a small batch (alone when it
is over the budget by itself). This is the
paper's training-time "group by length" idea applied to inference.

Everything here is pure Python over lengths and indices; the encoder supplies the model call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "DEFAULT_MIN_LENGTH_RATIO",
    "is_out_of_memory",
    "padded_tokens",
    "plan_batches",
    "OOMSplitter",
]

logger = logging.getLogger(__name__)

R = TypeVar("R")

#: Padded tokens per forward pass: 16 texts of 1024 tokens, or 2 of 8192. Large enough to keep
#: a CPU or a GPU busy, small enough for the 8192-token worst case to fit in a few GB.
DEFAULT_BATCH_TOKENS = 16384

#: A text joins a batch only if it is at least this fraction of the batch's longest text. A
#: budget alone would let a batch led by a 780-token text fill up with 200-token texts (twice
#: the work); bands of similar length cost at most a few dozen extra batches per call (one per
#: 20% step in length from 8192 tokens down), which even a GPU does not notice.
DEFAULT_MIN_LENGTH_RATIO = 0.8

# Messages of allocation failures that are not raised as a dedicated exception type: CUDA and
# MPS ("out of memory"), the CPU allocator ("can't allocate memory"), HIP, XLA.
_OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "failed to allocate",
    "oom when allocating",
)


def padded_tokens(lengths: Sequence[int], batch: Sequence[int]) -> int:
    """Tokens a batch occupies once padded to its longest member."""
    return len(batch) * max((lengths[i] for i in batch), default=0)


def plan_batches(
    lengths: Sequence[int],
    batch_tokens: int,
    max_batch_size: int | None = None,
    min_length_ratio: float = DEFAULT_MIN_LENGTH_RATIO,
) -> list[list[int]]:
    """Group the indices of ``lengths`` into batches, longest texts first.

    Each batch satisfies ``len(batch) * max(length in batch) <= batch_tokens`` (a text longer
    than the budget on its own forms a batch of one), ``len(batch) <= max_batch_size``, and
    holds only texts at least ``min_length_ratio`` times as long as its longest one, so no text
    is padded by more than ``1 - min_length_ratio`` of the batch length. Every index appears in
    exactly one batch. Ties in length keep input order, so the plan is deterministic.

    Longest first: the most memory-hungry batch runs first, so an out-of-memory failure (and
    the split that follows) happens at the start rather than after an hour of work.
    """
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1 or None, got {max_batch_size}")
    if not 0.0 <= min_length_ratio <= 1.0:
        raise ValueError(f"min_length_ratio must be between 0 and 1, got {min_length_ratio}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        # The first member of a batch is its longest (descending order), so adding a text never
        # changes the padded length: the budget check is simply (size + 1) * longest.
        if current and (
            (max_batch_size is not None and len(current) >= max_batch_size)
            or (len(current) + 1) * longest > batch_tokens
            or lengths[index] < min_length_ratio * longest
        ):
            batches.append(current)
            current = []
        if not current:
            longest = max(lengths[index], 1)
        current.append(index)
    if current:
        batches.append(current)
    return batches


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure that a smaller batch might avoid."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency; keeps this module pure
        torch = None  # type: ignore[assignment]
    if torch is not None:
        oom_types = tuple(
            t
            for t in (
                getattr(torch, "OutOfMemoryError", None),
                getattr(torch.cuda, "OutOfMemoryError", None),
            )
            if isinstance(t, type)
        )
        if oom_types and isinstance(exc, oom_types):
            return True
    if isinstance(exc, RuntimeError):
        message = str(exc).lower()
        return any(text in message for text in _OOM_MESSAGES)
    return False


class OOMSplitter:
    """Run batches, halving any batch that fails with an allocation error.

    A failed batch is split in two halves (by position in the batch, so each half stays
    length-sorted) and each half is retried, recursively, down to single texts; a single text
    that still does not fit re-raises the error. No input is lost or run twice: the results
    cover exactly the indices of the batch.

    After a failure the splitter remembers the padded size that failed and pre-splits later
    batches that are at least as large, so one OOM does not cost one failed attempt per batch.
    """

    def __init__(self, lengths: Sequence[int], on_oom: Callable[[], None] | None = None) -> None:
        self.lengths = lengths
        self.on_oom = on_oom
        #: Padded-token size known to fail; later batches this large are split before running.
        self.failed_tokens: int | None = None
        self.splits = 0

    def run(self, batch: Sequence[int], fn: Callable[[list[int]], R]) -> list[tuple[list[int], R]]:
        """``fn`` on ``batch`` (or its halves); returns ``(indices, fn(indices))`` pairs in order."""
        pending: list[list[int]] = [list(batch)]
        results: list[tuple[list[int], R]] = []
        while pending:
            part = pending.pop(0)
            size = padded_tokens(self.lengths, part)
            if len(part) > 1 and self.failed_tokens is not None and size >= self.failed_tokens:
                pending[:0] = self._halves(part)
                continue
            failure: BaseException | None = None
            try:
                results.append((part, fn(part)))
            except Exception as exc:  # MemoryError is an Exception too
                if not is_out_of_memory(exc) or len(part) == 1:
                    raise
                failure = exc
            if failure is not None:
                # Outside the except block, so the traceback (and the tensors its frames hold)
                # is released before the retry allocates again.
                del failure
                self.failed_tokens = (
                    size if self.failed_tokens is None else min(self.failed_tokens, size)
                )
                self.splits += 1
                logger.warning(
                    "out of memory on a batch of %d texts (%d padded tokens); retrying in halves. "
                    "A smaller batch_tokens avoids the retries.",
                    len(part),
                    size,
                )
                if self.on_oom is not None:
                    self.on_oom()
                pending[:0] = self._halves(part)
        return results

    @staticmethod
    def _halves(part: list[int]) -> list[list[int]]:
        middle = len(part) // 2
        return [part[:middle], part[middle:]]
