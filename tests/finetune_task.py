"""A synthetic retrieval task for the fine-tuning tests: queries and passages share rare made-up
words among common filler words; the training split and the held-out split use different words.

A random model scores passages by whatever tokens and filler happen to overlap; fine-tuning
teaches it that the rare words decide relevance, which carries over to words it never saw.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FILLER = [
    "the",
    "city",
    "is",
    "of",
    "and",
    "a",
    "in",
    "capital",
    "people",
    "live",
    "large",
    "country",
    "about",
    "one",
    "vector",
    "text",
    "model",
    "score",
    "query",
    "passage",
    "token",
    "weight",
    "retrieval",
    "ten",
    "million",
    "south",
    "largest",
]
_CONSONANTS = "bcdfghklmnprstvz"
_VOWELS = "aeiou"


def _rare_word(rng: random.Random) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(3))


def _filler(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(FILLER) for _ in range(n)]


def _topic(rng: random.Random) -> tuple[str, str]:
    words = [_rare_word(rng), _rare_word(rng)]
    body = _filler(rng, 6) + words + _filler(rng, 6)
    rng.shuffle(body)
    query = _filler(rng, 3) + words
    rng.shuffle(query)
    return " ".join(query) + "?", " ".join(body) + "."


def build_task(
    folder: str | Path,
    *,
    train_topics: int = 64,
    test_topics: int = 40,
    negatives: int = 7,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` (FlagEmbedding's format) and a BEIR folder ``heldout/`` with new
    rare words; returns both paths."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = [_topic(rng) for _ in range(train_topics)]
    with (folder / "train.jsonl").open("w", encoding="utf-8") as handle:
        for i, (query, passage) in enumerate(train):
            others = [p for j, (_, p) in enumerate(train) if j != i]
            record = {"query": query, "pos": [passage], "neg": rng.sample(others, negatives)}
            handle.write(json.dumps(record) + "\n")
    heldout = folder / "heldout"
    heldout.mkdir(exist_ok=True)
    test = [_topic(rng) for _ in range(test_topics)]
    with (heldout / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for i, (_, passage) in enumerate(test):
            handle.write(json.dumps({"_id": f"d{i}", "title": "", "text": passage}) + "\n")
    with (heldout / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for i, (query, _) in enumerate(test):
            handle.write(json.dumps({"_id": f"q{i}", "text": query}) + "\n")
    with (heldout / "qrels.tsv").open("w", encoding="utf-8") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for i in range(test_topics):
            handle.write(f"q{i}\td{i}\t1\n")
    return folder / "train.jsonl", heldout
