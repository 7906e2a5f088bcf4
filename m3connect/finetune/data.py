"""Training data in FlagEmbedding's JSONL format, and the per-query groups drawn from it.

One JSON object per line::

    {"query": "...", "pos": ["...", ...], "neg": ["...", ...],
     "pos_scores": [...], "neg_scores": [...]}        # scores optional (an external teacher)

Each step, a query gets a group of ``group_size`` passages: one positive drawn from ``pos``,
then ``group_size - 1`` negatives drawn from ``neg`` without replacement, or with replacement
(FlagEmbedding's repetition of the list) when there are too few. The draws depend only on the
seed, the epoch and the example, so a resumed run draws the same groups.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from m3connect.sources import BadRecord

__all__ = [
    "TrainingDataError",
    "TrainingExample",
    "TrainingData",
    "read_training_data",
    "sample_group",
]

logger = logging.getLogger(__name__)


class TrainingDataError(ValueError):
    """A bad training record (with ``on_error="stop"``) or an unusable file."""


@dataclass
class TrainingExample:
    query: str
    pos: list[str]
    neg: list[str]
    line: int
    pos_scores: list[float] | None = None
    neg_scores: list[float] | None = None


@dataclass
class TrainingData:
    examples: list[TrainingExample]
    path: str
    #: Lines skipped (``on_error="skip"``).
    errors: list[BadRecord] = field(default_factory=list)

    @property
    def has_teacher_scores(self) -> bool:
        return bool(self.examples) and all(e.pos_scores is not None for e in self.examples)


def _strings(record: dict, name: str) -> list[str]:
    value = record.get(name, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name!r} must be a list of strings")
    return value


def _scores(record: dict, name: str, expected: int) -> list[float] | None:
    if name not in record:
        return None
    value = record[name]
    if not isinstance(value, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise ValueError(f"{name!r} must be a list of finite numbers")
    if len(value) != expected:
        raise ValueError(f"{name!r} has {len(value)} scores for {expected} passages")
    return [float(v) for v in value]


def _parse(line: str, group_size: int) -> TrainingExample:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    query = record.get("query")
    if not isinstance(query, str) or not query.strip():
        raise ValueError("no 'query' string")
    pos = _strings(record, "pos")
    if not pos:
        raise ValueError("empty 'pos': a query needs at least one positive passage")
    neg = _strings(record, "neg")
    if group_size > 1 and not neg:
        raise ValueError(
            f"no 'neg' passages, but a group of {group_size} needs {group_size - 1} negatives "
            f"(use --group-size 1 for positives only)"
        )
    pos_scores = _scores(record, "pos_scores", len(pos))
    neg_scores = _scores(record, "neg_scores", len(neg))
    if (pos_scores is None) != (neg_scores is None):
        raise ValueError("'pos_scores' and 'neg_scores' go together")
    return TrainingExample(query, pos, neg, 0, pos_scores, neg_scores)


def read_training_data(
    path: str | Path,
    *,
    group_size: int,
    on_error: Literal["skip", "stop"] = "stop",
) -> TrainingData:
    """Read and check every line; a bad line is reported with its number and skipped, or
    raises :class:`TrainingDataError` (``on_error="stop"``)."""
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    file = Path(path)
    data = TrainingData([], str(file))
    try:
        with file.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    example = _parse(line, group_size)
                except ValueError as exc:
                    bad = BadRecord(str(file), lineno, str(exc))
                    if on_error == "stop":
                        raise TrainingDataError(
                            f"bad record at {bad}. Fix it, or pass --on-error skip to report "
                            f"and skip bad records"
                        ) from None
                    logger.warning("skipping bad record at %s", bad)
                    data.errors.append(bad)
                    continue
                example.line = lineno
                data.examples.append(example)
    except OSError as exc:
        raise TrainingDataError(f"cannot read {file}: {exc}") from None
    except UnicodeDecodeError as exc:
        raise TrainingDataError(
            f"{file} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    with_scores = sum(e.pos_scores is not None for e in data.examples)
    if 0 < with_scores < len(data.examples):
        raise TrainingDataError(
            f"{file}: {with_scores} of {len(data.examples)} records have pos_scores/neg_scores; "
            f"teacher scores must be given for every record or none"
        )
    if not data.examples:
        raise TrainingDataError(f"{file} holds no usable training records")
    return data


def sample_group(
    example: TrainingExample, group_size: int, seed: int, epoch: int, index: int
) -> tuple[list[str], list[float] | None]:
    """The passages of one query's group (positive first) and their teacher scores, drawn
    deterministically from ``(seed, epoch, index)``."""
    rng = random.Random(f"m3connect-finetune:{seed}:{epoch}:{index}")
    p = rng.randrange(len(example.pos))
    chosen: Sequence[int] = []
    if group_size > 1:
        need = group_size - 1
        pool = list(range(len(example.neg)))
        if len(pool) < need:
            pool = pool * math.ceil(need / len(pool))
        chosen = rng.sample(pool, need)
    passages = [example.pos[p], *(example.neg[i] for i in chosen)]
    if example.pos_scores is None or example.neg_scores is None:
        return passages, None
    return passages, [example.pos_scores[p], *(example.neg_scores[i] for i in chosen)]
