"""A tiny random BGE-M3 checkpoint and its encoder, built once per test session.

``M3CONNECT_TEST_CHECKPOINT`` names a checkpoint folder (or hub id) to use instead, e.g. a
local copy of ``BAAI/bge-m3``.
"""

from __future__ import annotations

import functools

import pytest

from m3connect.encoder import M3Encoder
from m3connect.testing import EXAMPLE_METADATAS as METADATAS
from m3connect.testing import EXAMPLE_TEXTS as TEXTS
from m3connect.testing import checkpoint_for_tests

__all__ = ["METADATAS", "TEXTS", "checkpoint_path", "shared_encoder"]

checkpoint_path = checkpoint_for_tests


@functools.cache
def shared_encoder() -> M3Encoder:
    return M3Encoder.from_pretrained(checkpoint_path(), device="cpu")


def assert_same_ranking(
    got: list[tuple[object, float]], want: list[tuple[object, float]], tol: float = 1e-4
) -> None:
    """``got`` ranks like the reference ranking ``want`` (ids and scores), up to ties: documents
    with equal scores may come in any order, and a tie at ``got``'s cut may keep any of them.
    ``want`` may be longer than ``got`` (to show the ties at the cut)."""
    assert len(got) <= len(want)
    assert [s for _, s in got] == pytest.approx([s for _, s in want[: len(got)]], abs=tol)
    start = 0
    while start < len(got):
        end = start
        while end + 1 < len(want) and abs(want[end + 1][1] - want[start][1]) <= tol:
            end += 1
        assert {i for i, _ in got[start : end + 1]} <= {i for i, _ in want[start : end + 1]}
        start = end + 1
