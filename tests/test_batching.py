"""Token-budget batching and the out-of-memory split, as pure functions of lengths."""

from __future__ import annotations

import random

import pytest
import torch

from m3connect.batching import OOMSplitter, is_out_of_memory, padded_tokens, plan_batches


def check_plan(
    lengths: list[int], batches: list[list[int]], budget: int, max_size: int | None
) -> None:
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(lengths)))  # every input exactly once
    for batch in batches:
        assert batch
        if len(batch) > 1:
            assert padded_tokens(lengths, batch) <= budget
        if max_size is not None:
            assert len(batch) <= max_size
        # Each batch is longest-first, so its padded length is its first member's.
        members = [lengths[i] for i in batch]
        assert members == sorted(members, reverse=True)
        assert members[-1] >= 0.8 * members[0]


def test_short_texts_are_not_padded_to_a_long_one() -> None:
    lengths = [10, 500, 12, 11, 9]
    batches = plan_batches(lengths, batch_tokens=600)
    assert batches == [[1], [2, 3, 0], [4]]  # 9 < 0.8 x 12 starts a new batch
    assert padded_tokens(lengths, batches[1]) == 36  # 3 x 12, not 3 x 500
    # Fixed batches in input order would pad 10, 12, 11 and 9 to 500 tokens.
    assert sum(padded_tokens(lengths, b) for b in batches) < padded_tokens(lengths, range(5)) / 4
    assert plan_batches(lengths, batch_tokens=600, min_length_ratio=0.0) == [[1], [2, 3, 0, 4]]


def test_batches_hold_similar_lengths() -> None:
    # Decreasing lengths under a large budget: the budget alone would make one batch padded to
    # 100 (2 x the real tokens); the length ratio keeps every batch within 20% of its longest.
    lengths = list(range(100, 19, -4))
    batches = plan_batches(lengths, batch_tokens=100_000)
    assert [[lengths[i] for i in b] for b in batches][:2] == [
        [100, 96, 92, 88, 84, 80],
        [76, 72, 68, 64],
    ]
    real = sum(lengths)
    assert sum(padded_tokens(lengths, b) for b in batches) < 1.15 * real
    assert plan_batches(lengths, batch_tokens=100_000, min_length_ratio=0.0) == [
        list(range(len(lengths)))
    ]


def test_text_over_budget_goes_alone() -> None:
    lengths = [8192, 8192, 30, 30, 8192]
    batches = plan_batches(lengths, batch_tokens=4096)
    assert batches[:3] == [[0], [1], [4]]
    assert batches[3] == [2, 3]


def test_budget_and_max_batch_size() -> None:
    lengths = [16] * 10
    assert plan_batches(lengths, batch_tokens=64) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plan_batches(lengths, batch_tokens=10_000, max_batch_size=3) == [
        [0, 1, 2],
        [3, 4, 5],
        [6, 7, 8],
        [9],
    ]


def test_ties_keep_input_order_and_plan_is_deterministic() -> None:
    lengths = [5, 7, 5, 7, 5]
    assert plan_batches(lengths, batch_tokens=14) == [[1, 3], [0, 2], [4]]
    assert plan_batches(lengths, batch_tokens=14) == plan_batches(list(lengths), batch_tokens=14)


@pytest.mark.parametrize("seed", range(5))
def test_random_lengths_satisfy_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [int(rng.paretovariate(1.2) * 10) + 2 for _ in range(300)]
    for budget, max_size in ((512, None), (4096, 32), (100, 4)):
        check_plan(lengths, plan_batches(lengths, budget, max_size), budget, max_size)


def test_empty_and_invalid_arguments() -> None:
    assert plan_batches([], batch_tokens=100) == []
    assert plan_batches([0], batch_tokens=100) == [[0]]
    with pytest.raises(ValueError, match="batch_tokens"):
        plan_batches([3], batch_tokens=0)
    with pytest.raises(ValueError, match="max_batch_size"):
        plan_batches([3], batch_tokens=10, max_batch_size=0)
    with pytest.raises(ValueError, match="min_length_ratio"):
        plan_batches([3], batch_tokens=10, min_length_ratio=1.5)


@pytest.mark.parametrize(
    "exc, expected",
    [
        (MemoryError(), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB"), True),
        (
            RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"
            ),
            True,
        ),
        (RuntimeError("MPS backend out of memory"), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_is_out_of_memory(exc: BaseException, expected: bool) -> None:
    assert is_out_of_memory(exc) is expected


def test_oom_split_in_halves_loses_nothing() -> None:
    lengths = [10] * 8
    calls: list[list[int]] = []

    def run(batch: list[int]) -> list[int]:
        calls.append(batch)
        if len(batch) > 2:
            raise MemoryError
        return [i * 100 for i in batch]

    cleared: list[bool] = []
    splitter = OOMSplitter(lengths, on_oom=lambda: cleared.append(True))
    results = splitter.run(list(range(8)), run)
    assert [indices for indices, _ in results] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [value for _, value in results] == [[0, 100], [200, 300], [400, 500], [600, 700]]
    # 8 fails, 4 fails; the second 4 is pre-split because 4 x 10 tokens is known to fail.
    assert calls == [list(range(8)), [0, 1, 2, 3], [0, 1], [2, 3], [4, 5], [6, 7]]
    assert splitter.failed_tokens == 40 and splitter.splits == 2 and len(cleared) == 2
    # A later batch as large as a failed one is split before it runs.
    calls.clear()
    splitter.run([0, 1, 2, 3], run)
    assert calls == [[0, 1], [2, 3]]


def test_oom_on_a_single_text_and_other_errors_propagate() -> None:
    splitter = OOMSplitter([10, 10])

    def always_oom(batch: list[int]) -> None:
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        splitter.run([0, 1], always_oom)

    def broken(batch: list[int]) -> None:
        raise RuntimeError("index out of range")

    calls: list[list[int]] = []

    def broken_counting(batch: list[int]) -> None:
        calls.append(batch)
        broken(batch)

    with pytest.raises(RuntimeError, match="index out of range"):
        OOMSplitter([10, 10]).run([0, 1], broken_counting)
    assert calls == [[0, 1]]  # not retried: only allocation failures are


def test_encoder_batches_follow_the_plan(m3_encoder, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    texts = ["short one", "a much longer text " * 20, "tiny", "medium length text " * 5, ""]
    lengths = m3_encoder.count_tokens(texts)
    real = m3_encoder._hidden_states
    shapes: list[tuple[int, int]] = []

    def spy(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(input_ids.shape))
        # Padding is the tokenizer's pad id and masked out.
        assert bool(((input_ids == 1) == (attention_mask == 0)).all())
        return real(input_ids, attention_mask)

    monkeypatch.setattr(m3_encoder, "_hidden_states", spy)
    budget = max(lengths) + 10
    m3_encoder.encode(texts, batch_tokens=budget)
    expected = [
        (len(batch), max(lengths[i] for i in batch)) for batch in plan_batches(lengths, budget)
    ]
    assert shapes == expected
    assert all(rows * width <= budget for rows, width in shapes)
