"""The length-grouped training sampler."""

from __future__ import annotations

import random

import pytest

from m3connect.finetune.sampler import LengthGroupedSampler, bucket_of, padded_tokens


def _lengths(n: int = 500, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [
        rng.choice([rng.randint(5, 60), rng.randint(100, 400), rng.randint(1000, 4000)])
        for _ in range(n)
    ]


def test_every_batch_comes_from_one_bucket_and_every_example_once() -> None:
    lengths = _lengths()
    sampler = LengthGroupedSampler(lengths, 16, seed=3)
    batches = sampler.batches(0)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len({bucket_of(lengths[i]) for i in batch}) == 1
        assert 1 <= len(batch) <= 16
    assert len(batches) == len(sampler)


def test_short_buckets_get_larger_batches_under_a_token_budget() -> None:
    lengths = _lengths()
    sampler = LengthGroupedSampler(lengths, 64, batch_tokens=8192, tokens_per_length=4)
    sizes = {bucket_of(lengths[b[0]]): len(b) for b in sampler.batches(0)}
    assert sampler.bucket_batch_size(64) == 32  # 8192 // (64 * 4)
    assert sampler.bucket_batch_size(4096) == 1  # over budget alone: a batch of one
    for batch in sampler.batches(0):
        bucket = bucket_of(lengths[batch[0]])
        assert len(batch) * bucket * 4 <= 8192 or len(batch) == 1
    assert max(sizes.values()) > min(sizes.values())


def test_plans_depend_on_seed_and_epoch_only_and_save_padding() -> None:
    lengths = _lengths()
    a = LengthGroupedSampler(lengths, 16, seed=1)
    b = LengthGroupedSampler(lengths, 16, seed=1)
    assert a.batches(2) == b.batches(2)
    assert a.batches(2) != a.batches(3)
    rng = random.Random(0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    random_plan = [order[i : i + 16] for i in range(0, len(order), 16)]
    assert padded_tokens(lengths, a.batches(0)) * 2 < padded_tokens(lengths, random_plan)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_split_the_batches_evenly_across_processes(world: int) -> None:
    sampler = LengthGroupedSampler(_lengths(101), 8, seed=0)
    shards = [sampler.shard(0, rank, world) for rank in range(world)]
    assert (
        len({len(s) for s in shards}) == 1 == len({sampler.steps_per_epoch(world), len(shards[0])})
    )
    seen = [tuple(b) for s in shards for b in s]
    assert len(seen) == len(set(seen))
    assert len(seen) == len(sampler) - len(sampler) % world


def test_registering_the_command_does_not_import_torch() -> None:
    """`m3connect --help` stays instant: the finetune package loads its parts on first use."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = "import sys, m3connect.cli; print('torch' in sys.modules, 'finetune' in m3connect.cli.main.commands)"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == ["False", "True"]
