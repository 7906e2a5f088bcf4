"""Fine-tune BGE-M3 the way the paper did: unified fine-tuning of the dense, sparse and
ColBERT outputs with self-knowledge distillation, on length-grouped batches.

- :func:`unified_loss`: the loss of one batch (FlagEmbedding's semantics), for your own loop;
- :class:`Trainer`: epochs, warmup + linear decay, checkpoints and resume, DDP, BGE-M3 output;
- :func:`read_training_data`: FlagEmbedding's JSONL (``query``, ``pos``, ``neg``, optional
  ``pos_scores``/``neg_scores``);
- :class:`LengthGroupedSampler`: batches from one length bucket, larger for short texts.

Command line: ``m3connect finetune DATA.jsonl --model BASE --output DIR``.
"""

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
from m3connect.finetune.sampler import LengthGroupedSampler
from m3connect.finetune.trainer import FinetuneError, Trainer, TrainingConfig, TrainingResult

__all__ = [
    "FinetuneError",
    "LengthGroupedSampler",
    "Trainer",
    "TrainingConfig",
    "TrainingData",
    "TrainingDataError",
    "TrainingExample",
    "TrainingResult",
    "read_training_data",
    "sample_group",
    "DEFAULT_TEMPERATURE",
    "PARTS",
    "M3Reps",
    "M3TrainModel",
    "UnifiedLoss",
    "colbert_score_matrix",
    "dense_score_matrix",
    "sparse_score_matrix",
    "unified_loss",
]
