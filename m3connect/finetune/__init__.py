"""Fine-tune BGE-M3 the way the paper did: unified fine-tuning of the dense, sparse and
ColBERT outputs with self-knowledge distillation, on length-grouped batches.

- :func:`unified_loss`: the loss of one batch (FlagEmbedding's semantics), for your own loop;
- :class:`Trainer`: epochs, warmup + linear decay, checkpoints and resume, DDP, BGE-M3 output;
- :func:`read_training_data`: FlagEmbedding's JSONL (``query``, ``pos``, ``neg``, optional
  ``pos_scores``/``neg_scores``);
- :class:`LengthGroupedSampler`: batches from one length bucket, larger for short texts.

Command line: ``m3connect finetune DATA.jsonl --model BASE --output DIR``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Imported on first use: `m3connect --help` registers the finetune command through this
# package and must not pay for torch.
_EXPORTS = {
    "TrainingData": "data",
    "TrainingDataError": "data",
    "TrainingExample": "data",
    "read_training_data": "data",
    "sample_group": "data",
    "DEFAULT_TEMPERATURE": "loss",
    "PARTS": "loss",
    "M3Reps": "loss",
    "M3TrainModel": "loss",
    "UnifiedLoss": "loss",
    "colbert_score_matrix": "loss",
    "dense_score_matrix": "loss",
    "sparse_score_matrix": "loss",
    "unified_loss": "loss",
    "LengthGroupedSampler": "sampler",
    "FinetuneError": "trainer",
    "Trainer": "trainer",
    "TrainingConfig": "trainer",
    "TrainingResult": "trainer",
}

__all__ = [
    "DEFAULT_TEMPERATURE",
    "FinetuneError",
    "LengthGroupedSampler",
    "M3Reps",
    "M3TrainModel",
    "PARTS",
    "Trainer",
    "TrainingConfig",
    "TrainingData",
    "TrainingDataError",
    "TrainingExample",
    "TrainingResult",
    "UnifiedLoss",
    "colbert_score_matrix",
    "dense_score_matrix",
    "read_training_data",
    "sample_group",
    "sparse_score_matrix",
    "unified_loss",
]

if TYPE_CHECKING:
    from m3connect.finetune.data import (
        TrainingData,
        TrainingDataError,
        TrainingExample,
        read_training_data,
        sample_group,
    )
    from m3connect.finetune.loss import (
        DEFAULT_TEMPERATURE,
        PARTS,
        M3Reps,
        M3TrainModel,
        UnifiedLoss,
        colbert_score_matrix,
        dense_score_matrix,
        sparse_score_matrix,
        unified_loss,
    )
    from m3connect.finetune.sampler import (
        LengthGroupedSampler,
    )
    from m3connect.finetune.trainer import (
        FinetuneError,
        Trainer,
        TrainingConfig,
        TrainingResult,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"m3connect.finetune.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
