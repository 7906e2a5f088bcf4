"""The paper's length-grouped batches for training.

Examples are put in length buckets (up to 64 tokens, 91, 128, 182, 256, ...: each bucket
~1.41 times the previous one, so a batch pads at most ~30% of its tokens); each batch
is drawn from one bucket, so a batch pads to about its own length rather than to the longest
text of the data set, and a bucket's batch holds as many examples as fit a token budget (larger
batches for short texts), at most ``batch_size``. Batches are shuffled within buckets and then
across buckets, from ``(seed, epoch)`` only: the plan of an epoch is the same in every process
and after a resume.

``benchmarks/bench_finetune_sampler.py`` measures the padding saved against random batches.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

__all__ = ["LengthGroupedSampler", "bucket_of", "padded_tokens"]

#: The upper length of the smallest bucket; each next bucket is BUCKET_GROWTH times longer.
SMALLEST_BUCKET = 64
BUCKET_GROWTH = math.sqrt(2)


def bucket_of(length: int) -> int:
    """The upper length of the bucket of ``length`` (64, 91, 128, 182, 256, ...)."""
    k = 0
    while SMALLEST_BUCKET * BUCKET_GROWTH**k < length:
        k += 1
    return math.ceil(SMALLEST_BUCKET * BUCKET_GROWTH**k - 1e-9)


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens of the batches once each is padded to its longest member."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches if b)


class LengthGroupedSampler:
    """Batches of example indices, each from one length bucket.

    ``lengths``: the padded length an example brings (e.g. its longest passage, in tokens).
    ``batch_size``: examples per batch at most. ``batch_tokens``: padded tokens per batch at
    most, counted as ``examples x bucket length x tokens_per_length`` (``tokens_per_length``:
    the texts each example contributes, e.g. the group size); ``None`` gives every bucket
    ``batch_size``. A bucket's last batch may be smaller.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        batch_tokens: int | None = None,
        tokens_per_length: int = 1,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_tokens is not None and batch_tokens < 1:
            raise ValueError(f"batch_tokens must be >= 1 or None, got {batch_tokens}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.tokens_per_length = max(1, tokens_per_length)
        self.seed = seed
        self.buckets: dict[int, list[int]] = {}
        for index, length in enumerate(self.lengths):
            self.buckets.setdefault(bucket_of(length), []).append(index)

    def bucket_batch_size(self, bucket: int) -> int:
        """Examples per batch in the bucket of upper length ``bucket``."""
        if self.batch_tokens is None:
            return self.batch_size
        fit = self.batch_tokens // (bucket * self.tokens_per_length)
        return max(1, min(self.batch_size, fit))

    def batches(self, epoch: int) -> list[list[int]]:
        """Every example once, in batches; the order depends on ``(seed, epoch)`` only."""
        rng = random.Random(f"m3connect-sampler:{self.seed}:{epoch}")
        out: list[list[int]] = []
        for bucket in sorted(self.buckets):
            members = list(self.buckets[bucket])
            rng.shuffle(members)
            size = self.bucket_batch_size(bucket)
            out.extend(members[i : i + size] for i in range(0, len(members), size))
        rng.shuffle(out)
        return out

    def __len__(self) -> int:
        return sum(math.ceil(len(m) / self.bucket_batch_size(b)) for b, m in self.buckets.items())

    def shard(self, epoch: int, rank: int, world_size: int) -> list[list[int]]:
        """The batches of process ``rank``: every ``world_size``-th batch, the same number in
        every process (the last few batches of an epoch are left out when they do not divide
        evenly, so that no process waits for the others at a collective)."""
        batches = self.batches(epoch)
        usable = len(batches) - len(batches) % world_size
        return batches[rank:usable:world_size]

    def steps_per_epoch(self, world_size: int = 1) -> int:
        return len(self) // world_size
