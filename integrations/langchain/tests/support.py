"""A tiny random BGE-M3 checkpoint and its encoder, built once per test session.

``M3CONNECT_TEST_CHECKPOINT`` names a checkpoint folder (or hub id) to use instead, e.g. a
local copy of ``BAAI/bge-m3``.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from m3connect.encoder import M3Encoder
from m3connect.testing import build_random_checkpoint

CHECKPOINT_ENV = "M3CONNECT_TEST_CHECKPOINT"

TEXTS = [
    "Dense retrieval encodes the query and the passage into one vector and compares them.",
    "Sparse retrieval gives each token a weight, and the lexical score sums shared tokens.",
    "Multi vector retrieval keeps one vector per token and scores with late interaction.",
    "A hybrid system combines dense, sparse and multi vector scores into one ranking.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "How many people live in Seoul? About ten million people live in the city of Seoul.",
    "Die Hauptstadt von Deutschland ist Berlin; München liegt im Süden des Landes.",
    "北京是中国的首都，上海是中国最大的城市之一。",
]
METADATAS = [
    {"lang": "en", "topic": "retrieval", "year": 2021},
    {"lang": "en", "topic": "retrieval", "year": 2022},
    {"lang": "en", "topic": "retrieval", "year": 2023},
    {"lang": "en", "topic": "retrieval", "year": 2024, "tags": ["hybrid", "fusion"]},
    {"lang": "en", "topic": "geo", "year": 2015},
    {"lang": "en", "topic": "geo", "year": 2016},
    {"lang": "de", "topic": "geo", "year": 2017},
    {"lang": "zh", "topic": "geo", "year": 2018},
]


@functools.cache
def checkpoint_path() -> str:
    configured = os.environ.get(CHECKPOINT_ENV)
    if configured:
        return configured
    folder = Path(tempfile.mkdtemp(prefix="m3connect-random-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return str(build_random_checkpoint(folder))


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
