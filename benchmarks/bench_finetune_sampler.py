"""Padding of the fine-tuning batches: the length-grouped sampler against random batches.

A script, not a test. Every example brings ``--group-size`` passages; a batch pads every
passage to the longest of the batch, so its cost is ``queries x group x longest``. Lengths are
drawn (seeded) from a long-tailed mix like a real training set: mostly short passages
(log-normal around 120 tokens), a tail of long documents up to ``--max-len`` tokens (MLDR-like).
An example's length is its longest passage.

Printed per plan: batches, padded tokens, the padded share (padding / padded tokens) and the
ratio of padded tokens against random batches of the same size. Three plans:

- random: shuffled examples in batches of ``--batch-size`` (what a plain DataLoader does);
- grouped: the length-grouped sampler, same batch size everywhere (``batch_tokens=None``);
- grouped + budget: the sampler with a token budget (larger batches for short buckets),
  m3connect finetune's default ``--batch-tokens``.

Padded tokens are what a forward and backward pass costs (attention more than linearly), so
the ratio is the work saved; it is a count, the same on every machine.

Run from the repository root::

    python benchmarks/bench_finetune_sampler.py              # a few seconds
    python benchmarks/bench_finetune_sampler.py --long-share 0 --max-len 512   # short data only
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from m3connect.finetune.sampler import LengthGroupedSampler, padded_tokens  # noqa: E402


def lengths(n: int, group: int, max_len: int, long_share: float, seed: int) -> list[int]:
    rng = random.Random(seed)

    def passage() -> int:
        if rng.random() < long_share:
            return min(max_len, int(math.exp(rng.uniform(math.log(512), math.log(max_len)))))
        return max(8, min(max_len, int(rng.lognormvariate(math.log(120), 0.6))))

    return [max(passage() for _ in range(group)) for _ in range(n)]


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, default=65536)
    parser.add_argument("--max-len", type=int, default=8192)
    parser.add_argument("--long-share", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    lens = lengths(args.examples, args.group_size, args.max_len, args.long_share, args.seed)
    real = sum(lens) * args.group_size  # lower bound: every example at its own length
    plans = {
        "random": random_batches(len(lens), args.batch_size, args.seed),
        "grouped": LengthGroupedSampler(lens, args.batch_size, seed=args.seed).batches(0),
        "grouped + budget": LengthGroupedSampler(
            lens,
            args.batch_size,
            batch_tokens=args.batch_tokens,
            tokens_per_length=args.group_size,
            seed=args.seed,
        ).batches(0),
    }
    print(
        f"{args.examples} examples x {args.group_size} passages, lengths median "
        f"{sorted(lens)[len(lens) // 2]} max {max(lens)} tokens, batch size {args.batch_size}, "
        f"budget {args.batch_tokens} tokens"
    )
    base = padded_tokens(lens, plans["random"]) * args.group_size
    print(f"{'plan':18s} {'batches':>8s} {'padded tokens':>14s} {'padding':>8s} {'vs random':>10s}")
    for name, batches in plans.items():
        padded = padded_tokens(lens, batches) * args.group_size
        print(
            f"{name:18s} {len(batches):8d} {padded:14,d} {1 - real / padded:8.1%} "
            f"{base / padded:9.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
