"""A tiny random BGE-M3 checkpoint and its encoder, built once per test session.

``M3CONNECT_TEST_CHECKPOINT`` names a checkpoint folder (or hub id) to use instead, e.g. a
local copy of ``BAAI/bge-m3``.
"""

from __future__ import annotations

import os

import pytest

from m3connect.encoder import M3Encoder
from m3connect.testing import build_random_checkpoint

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


@pytest.fixture(scope="session")
def checkpoint_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    configured = os.environ.get("M3CONNECT_TEST_CHECKPOINT")
    if configured:
        return configured
    return str(build_random_checkpoint(tmp_path_factory.mktemp("m3-random")))


@pytest.fixture(scope="session")
def encoder(checkpoint_path: str) -> M3Encoder:
    return M3Encoder.from_pretrained(checkpoint_path, device="cpu")
