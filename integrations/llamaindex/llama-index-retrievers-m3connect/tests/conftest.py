"""A tiny random BGE-M3 checkpoint and its encoder, built once per test session.

``M3CONNECT_TEST_CHECKPOINT`` names a checkpoint folder (or hub id) to use instead, e.g. a
local copy of ``BAAI/bge-m3``.
"""

from __future__ import annotations

import pytest

from m3connect.encoder import M3Encoder
from m3connect.testing import EXAMPLE_METADATAS as METADATAS
from m3connect.testing import EXAMPLE_TEXTS as TEXTS
from m3connect.testing import checkpoint_for_tests

__all__ = ["METADATAS", "TEXTS"]


@pytest.fixture(scope="session")
def checkpoint_path() -> str:
    return checkpoint_for_tests()


@pytest.fixture(scope="session")
def encoder(checkpoint_path: str) -> M3Encoder:
    return M3Encoder.from_pretrained(checkpoint_path, device="cpu")
