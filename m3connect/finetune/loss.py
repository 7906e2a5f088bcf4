"""The paper's unified fine-tuning loss with self-knowledge distillation, in torch.

The semantics are those of FlagEmbedding's ``EncoderOnlyEmbedderM3Model.forward`` with
``unified_finetuning=True`` and ``use_self_distill=True`` (the reference BGE-M3 was trained
with), see ``M3-REFERENCE.md``:

- representations: the encoder's (:mod:`m3connect.encoder`): dense ``normalize(H[0])``; sparse
  ``relu(sparse_linear(H))`` max-pooled per token id, ``<s>``, ``</s>``, ``<pad>``, ``<unk>``
  zeroed; ColBERT ``normalize(colbert_linear(H[1:]))`` over the real tokens;
- scores: the core's (:mod:`m3connect.scoring`), as matrices (every query against every
  passage of the batch, or only its own group), divided by the temperature; the ensemble is
  ``dense + 0.3 * sparse + colbert``;
- loss: cross-entropy with the positive as target, ``L = (L_dense + L_ensemble + 0.1 * L_sparse
  + L_colbert) / 4``; with self-distillation the teacher ``p = softmax(ensemble)`` (detached)
  adds ``D_x = -mean_i sum_j p_ij * log_softmax(x)_ij`` and the total is
  ``(L + (D_dense + 0.1 * D_sparse + D_colbert) / 3) / 2``.

The torch score functions here are the matrix form of :func:`m3connect.scoring.dense_scores`,
:func:`~m3connect.scoring.lexical_scores` and :func:`~m3connect.scoring.colbert_scores`; the
tests check both forms give the same numbers on the same texts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from m3connect.encoder import M3Encoder

__all__ = [
    "PARTS",
    "ENSEMBLE_WEIGHTS",
    "LOSS_WEIGHTS",
    "DEFAULT_TEMPERATURE",
    "M3Reps",
    "M3TrainModel",
    "UnifiedLoss",
    "unified_loss",
    "dense_score_matrix",
    "sparse_score_matrix",
    "colbert_score_matrix",
]

PARTS: tuple[str, ...] = ("dense", "sparse", "colbert")
#: The ensemble (teacher) score ``dense + 0.3 * sparse + colbert`` (FlagEmbedding's fixed 0.3).
ENSEMBLE_WEIGHTS: Mapping[str, float] = {"dense": 1.0, "sparse": 0.3, "colbert": 1.0}
#: lambda of each part in the loss and in the distillation terms.
LOSS_WEIGHTS: Mapping[str, float] = {"dense": 1.0, "sparse": 0.1, "colbert": 1.0}
DEFAULT_TEMPERATURE = 0.02


# --------------------------------------------------------------------------------------------
# The trainable model: the encoder's body and heads as one torch module
# --------------------------------------------------------------------------------------------


@dataclass
class M3Reps:
    """The three representations of a padded batch, with gradients.

    ``dense`` ``[B, d]``; ``sparse`` ``[B, vocab]`` (max-pooled lexical weights, specials 0);
    ``colbert`` ``[B, L - 1, c]`` (rows after CLS, padding rows zero) and ``colbert_mask``
    ``[B, L - 1]`` (1 for real rows)."""

    dense: torch.Tensor
    sparse: torch.Tensor | None
    colbert: torch.Tensor | None
    colbert_mask: torch.Tensor


class M3TrainModel(torch.nn.Module):
    """The body and both heads of an :class:`~m3connect.encoder.M3Encoder` as one module,
    for training (and for wrapping in ``DistributedDataParallel``).

    :meth:`from_encoder` shares the encoder's modules: training this model trains the
    encoder in place (its fingerprint, computed at load time, refers to the base model until
    the checkpoint is saved and loaded again). Gradients are off on the encoder's modules;
    turn them on with ``requires_grad_()`` for the parts you train.
    """

    def __init__(
        self,
        body: torch.nn.Module,
        colbert_linear: torch.nn.Linear,
        sparse_linear: torch.nn.Linear,
        tokenizer: Any,
        special_token_ids: Sequence[int],
    ) -> None:
        super().__init__()
        self.model = body
        self.colbert_linear = colbert_linear
        self.sparse_linear = sparse_linear
        self.tokenizer = tokenizer
        self.vocab_size = int(body.config.vocab_size)
        self.pad_token_id = int(
            tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else body.config.pad_token_id
        )
        self.special_token_ids = sorted(int(i) for i in special_token_ids)

    @classmethod
    def from_encoder(cls, encoder: M3Encoder) -> M3TrainModel:
        return cls(
            encoder.model,
            encoder.colbert_linear,
            encoder.sparse_linear,
            encoder.tokenizer,
            encoder.special_token_ids,
        )

    def tokenize(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` of ``texts`` (with ``<s>``/``</s>``,
        truncated to ``max_length``) on the model's device."""
        batch = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        device = next(self.parameters()).device
        return {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
        }

    def represent(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        parts: Sequence[str] = PARTS,
    ) -> M3Reps:
        """The representations of one padded batch (see :class:`M3Reps`)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # The heads run in float32 on the upcast hidden states, as in M3Encoder (also under
        # autocast): the L2 norms and the relu threshold stay as exact as the body allows.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            hidden = hidden.float()
            dense = F.normalize(hidden[:, 0], dim=-1)
            mask = attention_mask.to(hidden.dtype)
            sparse = colbert = None
            if "sparse" in parts:
                weights = torch.relu(self.sparse_linear(hidden)).squeeze(-1) * mask
                pooled = torch.zeros(
                    input_ids.shape[0], self.vocab_size, dtype=weights.dtype, device=weights.device
                ).scatter_reduce(1, input_ids, weights, reduce="amax", include_self=True)
                keep = torch.ones(self.vocab_size, dtype=weights.dtype, device=weights.device)
                keep[self.special_token_ids] = 0.0
                sparse = pooled * keep
            colbert_mask = mask[:, 1:]
            if "colbert" in parts:
                colbert = F.normalize(self.colbert_linear(hidden[:, 1:]), dim=-1)
                colbert = colbert * colbert_mask[:, :, None]
        return M3Reps(dense, sparse, colbert, colbert_mask)

    def forward(
        self,
        query_ids: torch.Tensor,
        query_mask: torch.Tensor,
        passage_ids: torch.Tensor,
        passage_mask: torch.Tensor,
        parts: Sequence[str] = PARTS,
    ) -> tuple[M3Reps, M3Reps]:
        """Queries and passages in one call (one DDP forward per step)."""
        return (
            self.represent(query_ids, query_mask, parts),
            self.represent(passage_ids, passage_mask, parts),
        )


# --------------------------------------------------------------------------------------------
# Scores: m3connect.scoring's definitions as query x passage matrices
# --------------------------------------------------------------------------------------------


def dense_score_matrix(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """``<e_q, e_p>`` for every query/passage pair: ``[Q, P]``."""
    return queries @ passages.T


def sparse_score_matrix(queries: torch.Tensor, passages: torch.Tensor) -> torch.Tensor:
    """``sum over shared token ids of w_q * w_p`` from vocabulary-sized weight vectors."""
    return queries @ passages.T


def colbert_score_matrix(
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    passages: torch.Tensor,
    passage_mask: torch.Tensor,
    *,
    padding_scores_zero: bool = False,
) -> torch.Tensor:
    """Mean over each query's real rows of the best dot product with a real row of the
    passage: ``[Q, P]``. Rows are ``[n, L, c]`` with masks ``[n, L]``.

    ``padding_scores_zero``: FlagEmbedding's training quirk, where a passage's padding rows
    (zero vectors) take part in the max, so that a query row's best score against a passage
    shorter than the batch's longest never falls below 0."""
    sims = torch.einsum("qid,pjd->qpij", queries, passages)
    if not padding_scores_zero:
        sims = sims.masked_fill(passage_mask[None, :, None, :] == 0, float("-inf"))
    best = sims.max(dim=-1).values * query_mask[:, None, :]
    best = torch.nan_to_num(best, neginf=0.0)  # a padded query row against anything
    return best.sum(-1) / query_mask.sum(-1, keepdim=True).clamp(min=1)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------


@dataclass
class UnifiedLoss:
    """The value to minimise and the terms it is made of.

    ``parts``: ``dense``, ``sparse``, ``colbert``, ``ensemble`` (each one's cross-entropy, or
    its teacher-distillation loss with ``teacher_scores``), and with self-distillation
    ``distill_dense``, ``distill_sparse``, ``distill_colbert``. ``scores``: the score matrices
    divided by the temperature (``[Q, Q * group_size]`` with in-batch negatives, else
    ``[Q, group_size]``), detached."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_floats(self) -> dict[str, float]:
        """``{"loss": total, <part>: value, ...}`` as Python floats (for logs)."""
        return {
            "loss": float(self.total.detach()),
            **{k: float(v.detach()) for k, v in self.parts.items()},
        }


def _module(encoder: Any) -> M3TrainModel:
    """The :class:`M3TrainModel` behind an encoder, a train model or a DDP wrapper of one."""
    from m3connect.encoder import M3Encoder

    if isinstance(encoder, M3Encoder):
        return M3TrainModel.from_encoder(encoder)
    inner = getattr(encoder, "module", encoder)
    if not isinstance(inner, M3TrainModel):
        raise TypeError(
            f"unified_loss takes an M3Encoder or an M3TrainModel (or DDP of one), got "
            f"{type(encoder).__name__}"
        )
    return inner


def _group_local(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[Q, Q * G]`` -> each query's own group ``[Q, G]``."""
    n = scores.shape[0]
    index = torch.arange(n, device=scores.device)[:, None] * group_size + torch.arange(
        group_size, device=scores.device
    )
    return scores.gather(1, index)


def _teacher_loss(scores: torch.Tensor, teacher: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """FlagEmbedding's ``m3_kd_loss``: for each passage ``i`` of the group, the teacher's
    probability times the cross-entropy with ``i`` as target, the group's earlier passages
    masked out."""
    loss = scores.new_zeros(())
    masked = scores
    for i in range(teacher.shape[1]):
        target = first + i
        loss = loss + (teacher[:, i] * F.cross_entropy(masked, target, reduction="none")).mean()
        masked = masked.scatter(1, target[:, None], torch.finfo(scores.dtype).min)
    return loss


def _self_distill(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return -(teacher * torch.log_softmax(student, dim=-1)).sum(-1).mean()


def unified_loss(
    encoder: M3Encoder | M3TrainModel | torch.nn.Module,
    queries: Sequence[str],
    passages: Sequence[str],
    *,
    group_size: int,
    temperature: float = DEFAULT_TEMPERATURE,
    in_batch_negatives: bool = True,
    self_distill: bool = True,
    teacher_scores: Sequence[Sequence[float]] | torch.Tensor | None = None,
    parts: Sequence[str] = PARTS,
    query_max_len: int = 512,
    passage_max_len: int = 8192,
    colbert_padding_scores_zero: bool = False,
) -> UnifiedLoss:
    """The unified fine-tuning loss of a batch (see the module docstring for the formula).

    ``passages`` is grouped per query: ``len(passages) == len(queries) * group_size``, each
    group's positive first. With ``in_batch_negatives`` every query is scored against every
    passage of the batch (the target of query ``i`` is passage ``i * group_size``), else only
    against its own group. ``teacher_scores`` (``[len(queries), group_size]``, an external
    teacher's scores, e.g. ``pos_scores`` + ``neg_scores``) replace each cross-entropy by
    FlagEmbedding's ``m3_kd_loss`` against ``softmax(teacher_scores)``.

    ``parts``: all three (the unified loss), or a subset: then the loss is the mean of the
    chosen parts' cross-entropies (no ensemble, no self-distillation; ``("dense",)`` is
    FlagEmbedding without unified fine-tuning).

    ``encoder`` is an :class:`~m3connect.encoder.M3Encoder`, an :class:`M3TrainModel` or a
    ``DistributedDataParallel`` of one. Its train/eval mode is the caller's (eval turns
    dropout off); gradients flow to the parameters that require them.

    ``colbert_padding_scores_zero`` reproduces FlagEmbedding's handling of padded passage rows
    in the ColBERT score (see :func:`colbert_score_matrix`); by default a passage is scored on
    its real tokens only, as at retrieval time (:func:`m3connect.scoring.colbert_scores`). The
    two agree whenever some real row of the passage has a positive dot product with the
    query row, which is the rule for a trained model.
    """
    model = _module(encoder)
    chosen = tuple(p for p in PARTS if p in set(parts))
    unknown = set(parts) - set(PARTS)
    if unknown or not chosen:
        raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {tuple(parts)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    if not queries:
        raise ValueError("no queries")
    if len(passages) != len(queries) * group_size:
        raise ValueError(
            f"{len(passages)} passages for {len(queries)} queries: expected queries x group_size "
            f"= {len(queries) * group_size} (each group's positive first)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = len(queries)
    q_in = model.tokenize(queries, query_max_len)
    p_in = model.tokenize(passages, passage_max_len)
    # Through the wrapper when there is one: DDP synchronises gradients of its own forward.
    forward = model if _is_encoder(encoder) else encoder
    q_reps, p_reps = forward(
        q_in["input_ids"], q_in["attention_mask"], p_in["input_ids"], p_in["attention_mask"], chosen
    )

    full: dict[str, torch.Tensor] = {}
    full["dense"] = dense_score_matrix(q_reps.dense, p_reps.dense)
    if "sparse" in chosen:
        full["sparse"] = sparse_score_matrix(q_reps.sparse, p_reps.sparse)  # type: ignore[arg-type]
    if "colbert" in chosen:
        full["colbert"] = colbert_score_matrix(
            q_reps.colbert,
            q_reps.colbert_mask,
            p_reps.colbert,
            p_reps.colbert_mask,  # type: ignore[arg-type]
            padding_scores_zero=colbert_padding_scores_zero,
        )
    scores = {k: v / temperature for k, v in full.items() if k in chosen}
    if not in_batch_negatives:
        scores = {k: _group_local(v, group_size) for k, v in scores.items()}
    unified = chosen == PARTS
    if unified:
        scores["ensemble"] = sum(ENSEMBLE_WEIGHTS[p] * scores[p] for p in PARTS)  # type: ignore[assignment]

    device = q_reps.dense.device
    first = (
        torch.arange(n, device=device) * group_size
        if in_batch_negatives
        else torch.zeros(n, dtype=torch.long, device=device)
    )
    teacher = None
    if teacher_scores is not None:
        given = torch.as_tensor(teacher_scores, dtype=torch.float32, device=device)
        if given.shape != (n, group_size):
            raise ValueError(
                f"teacher_scores must be [queries, group_size] = [{n}, {group_size}], got "
                f"{tuple(given.shape)}"
            )
        teacher = torch.softmax(given, dim=-1)

    terms: dict[str, torch.Tensor] = {}
    for name, matrix in scores.items():
        terms[name] = (
            F.cross_entropy(matrix, first)
            if teacher is None
            else _teacher_loss(matrix, teacher, first)
        )
    if unified:
        total = (
            terms["dense"]
            + terms["ensemble"]
            + LOSS_WEIGHTS["sparse"] * terms["sparse"]
            + terms["colbert"]
        ) / 4
        if self_distill:
            target = torch.softmax(scores["ensemble"].detach(), dim=-1)
            for p in PARTS:
                terms[f"distill_{p}"] = _self_distill(target, scores[p])
            distill = sum(LOSS_WEIGHTS[p] * terms[f"distill_{p}"] for p in PARTS) / 3
            total = (total + distill) / 2
    else:
        total = sum(terms[p] for p in chosen) / len(chosen)
    return UnifiedLoss(total, terms, {k: v.detach() for k, v in scores.items()})  # type: ignore[arg-type]


def _is_encoder(encoder: Any) -> bool:
    from m3connect.encoder import M3Encoder

    return isinstance(encoder, M3Encoder)
