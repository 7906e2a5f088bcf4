"""unified_loss against the formula, computed independently in float64 from the inference path
(M3Encoder.encode) and the core's numpy scores (m3connect.scoring)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from m3connect.encoder import M3Encoder
from m3connect.finetune import M3TrainModel, unified_loss
from m3connect.scoring import colbert_scores, dense_scores, lexical_scores

QUERIES = [
    "What is the capital of France?",
    "How many people live in Seoul?",
    "dense retrieval with one vector",
]
PASSAGES = [
    # group of query 0: positive first
    "Paris is the capital and largest city of France.",
    "Seoul is a large city.",
    "Sparse retrieval gives each token a weight.",
    # group of query 1
    "About ten million people live in the city of Seoul.",
    "Berlin is the capital of Germany.",
    "the the the repeated tokens",
    # group of query 2
    "Dense retrieval encodes the query and the passage into one vector.",
    "Multi vector retrieval keeps one vector per token and scores with late interaction.",
    "北京是中国的首都",
]
GROUP = 3
T = 0.02


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _reference(
    encoder: M3Encoder, *, in_batch: bool, self_distill: bool, teacher=None
) -> dict[str, float]:
    """The issue's formula in float64 over the encoder's inference outputs."""
    q = encoder.encode(QUERIES, max_length=512)
    p = encoder.encode(PASSAGES, max_length=512)
    n = len(QUERIES)
    raw = {
        "dense": np.stack([dense_scores(q.dense[i], p.dense) for i in range(n)]),
        "sparse": np.stack([lexical_scores(q.sparse[i], p.sparse) for i in range(n)]),
        "colbert": np.stack([colbert_scores(q.colbert[i], p.colbert) for i in range(n)]),
    }
    scores = {k: v.astype(np.float64) / T for k, v in raw.items()}
    if in_batch:
        first = np.arange(n) * GROUP
    else:
        scores = {
            k: np.stack([v[i, i * GROUP : (i + 1) * GROUP] for i in range(n)])
            for k, v in scores.items()
        }
        first = np.zeros(n, dtype=int)
    scores["ensemble"] = scores["dense"] + 0.3 * scores["sparse"] + scores["colbert"]
    out: dict[str, float] = {}
    for name, s in scores.items():
        logp = _log_softmax(s)
        if teacher is None:
            out[name] = float(-logp[np.arange(n), first].mean())
        else:
            t = np.exp(_log_softmax(np.asarray(teacher, dtype=np.float64)))
            total, masked = 0.0, s.copy()
            for i in range(GROUP):
                lp = _log_softmax(masked)
                total += float((t[:, i] * -lp[np.arange(n), first + i]).mean())
                masked[np.arange(n), first + i] = -np.inf
            out[name] = total
    loss = (out["dense"] + out["ensemble"] + 0.1 * out["sparse"] + out["colbert"]) / 4
    if self_distill:
        teacher_p = np.exp(_log_softmax(scores["ensemble"]))
        for name in ("dense", "sparse", "colbert"):
            out[f"distill_{name}"] = float(-(teacher_p * _log_softmax(scores[name])).sum(1).mean())
        loss = (
            loss + (out["distill_dense"] + 0.1 * out["distill_sparse"] + out["distill_colbert"]) / 3
        ) / 2
    out["loss"] = loss
    return out


@pytest.mark.parametrize("in_batch", [True, False], ids=["in-batch", "group-only"])
@pytest.mark.parametrize("self_distill", [True, False], ids=["distill", "no-distill"])
def test_unified_loss_equals_the_formula_in_float64(
    m3_encoder: M3Encoder, in_batch: bool, self_distill: bool
) -> None:
    result = unified_loss(
        m3_encoder,
        QUERIES,
        PASSAGES,
        group_size=GROUP,
        in_batch_negatives=in_batch,
        self_distill=self_distill,
    )
    expected = _reference(m3_encoder, in_batch=in_batch, self_distill=self_distill)
    got = result.as_floats()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=2e-4, abs=2e-4), name
    width = len(PASSAGES) if in_batch else GROUP
    assert result.scores["dense"].shape == (len(QUERIES), width)
    # The losses are not degenerate: the random model does not rank every positive first.
    assert expected["dense"] > 0.01 and expected["colbert"] > 0.01


def test_teacher_scores_use_the_m3_distillation_loss(m3_encoder: M3Encoder) -> None:
    teacher = [[2.0, 0.5, -1.0], [1.0, 1.0, 0.0], [3.0, -2.0, 0.1]]
    result = unified_loss(m3_encoder, QUERIES, PASSAGES, group_size=GROUP, teacher_scores=teacher)
    expected = _reference(m3_encoder, in_batch=True, self_distill=True, teacher=teacher)
    for name, value in expected.items():
        assert result.as_floats()[name] == pytest.approx(value, rel=2e-4, abs=2e-4), name
    plain = unified_loss(m3_encoder, QUERIES, PASSAGES, group_size=GROUP)
    assert abs(float(plain.parts["dense"]) - float(result.parts["dense"])) > 1e-3


def test_a_subset_of_parts_is_the_mean_of_their_cross_entropies(m3_encoder: M3Encoder) -> None:
    expected = _reference(m3_encoder, in_batch=True, self_distill=False)
    dense = unified_loss(m3_encoder, QUERIES, PASSAGES, group_size=GROUP, parts=["dense"])
    assert set(dense.parts) == {"dense"}
    assert float(dense.total) == pytest.approx(expected["dense"], rel=2e-4)
    two = unified_loss(m3_encoder, QUERIES, PASSAGES, group_size=GROUP, parts=["sparse", "dense"])
    assert float(two.total) == pytest.approx((expected["dense"] + expected["sparse"]) / 2, rel=2e-4)


def test_gradients_reach_body_and_both_heads(m3_checkpoint) -> None:
    encoder = M3Encoder.from_pretrained(m3_checkpoint, device="cpu")
    model = M3TrainModel.from_encoder(encoder).requires_grad_(True)
    result = unified_loss(model, QUERIES, PASSAGES, group_size=GROUP)
    result.total.backward()
    for name in (
        "model.embeddings.word_embeddings.weight",
        "colbert_linear.weight",
        "sparse_linear.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    # Only the dense part trains nothing in the heads.
    model.zero_grad(set_to_none=True)
    unified_loss(model, QUERIES, PASSAGES, group_size=GROUP, parts=["dense"]).total.backward()
    assert model.colbert_linear.weight.grad is None and model.sparse_linear.weight.grad is None


def test_dropout_follows_the_callers_mode(m3_checkpoint) -> None:
    encoder = M3Encoder.from_pretrained(m3_checkpoint, device="cpu")
    model = M3TrainModel.from_encoder(encoder)
    eval_a = float(unified_loss(model, QUERIES, PASSAGES, group_size=GROUP).total)
    eval_b = float(unified_loss(model, QUERIES, PASSAGES, group_size=GROUP).total)
    assert eval_a == eval_b
    model.train()
    torch.manual_seed(0)
    train = float(unified_loss(model, QUERIES, PASSAGES, group_size=GROUP).total)
    assert train != eval_a


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"group_size": 2}, "expected queries x group_size"),
        ({"group_size": GROUP, "parts": ["bm25"]}, "subset"),
        ({"group_size": GROUP, "temperature": 0.0}, "temperature"),
        ({"group_size": GROUP, "teacher_scores": [[1.0, 2.0]] * 3}, "teacher_scores"),
    ],
)
def test_bad_arguments_are_named(m3_encoder: M3Encoder, kwargs, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        unified_loss(m3_encoder, QUERIES, PASSAGES, **kwargs)


def test_colbert_padding_rule() -> None:
    """Real passage rows only by default; FlagEmbedding's padding rows scoring 0 on request."""
    from m3connect.finetune import colbert_score_matrix

    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # 2 real rows + padding
    query_mask = torch.tensor([[1.0, 1.0, 0.0]])
    passage = torch.tensor([[[-0.6, -0.8], [0.0, 0.0]]])  # 1 real row + padding
    passage_mask = torch.tensor([[1.0, 0.0]])
    real = colbert_score_matrix(query, query_mask, passage, passage_mask)
    assert real.item() == pytest.approx((-0.6 - 0.8) / 2)
    padded = colbert_score_matrix(
        query, query_mask, passage, passage_mask, padding_scores_zero=True
    )
    assert padded.item() == pytest.approx(0.0)
