"""Compare m3connect.finetune.unified_loss with FlagEmbedding's training loss.

The reference is ``EncoderOnlyEmbedderM3Model.forward`` (FlagEmbedding 1.4.2) with
``unified_finetuning=True``, ``use_self_distill=True``, ``normalize_embeddings=True``,
temperature 0.02 and in-batch negatives: the configuration BGE-M3 was fine-tuned with.
Not part of the test suite (FlagEmbedding 1.4.x does not import under transformers 5). Run it in
a separate environment::

    python -m venv --system-site-packages /tmp/ref
    /tmp/ref/bin/pip install "transformers<5" FlagEmbedding==1.4.2
    PYTHONPATH=. /tmp/ref/bin/python tests/reference/compare_finetune_flagembedding.py --random

Both sides see the same checkpoint, the same batch (3 queries, groups of 4, texts of different
lengths so that padding occurs) and dropout off (FlagEmbedding only computes its loss in
training mode, so its wrapper is put in training mode and the transformer body in eval mode).
Four cases: self-distillation on and off, with and without external teacher scores
(``pos_scores``/``neg_scores``, FlagEmbedding's ``m3_kd_loss``). Exits non-zero when a loss
differs by more than ``--atol``.

FlagEmbedding's group-only path (``no_in_batch_neg_flag``) fails with unified fine-tuning (an
index error in its ensemble step), so that option is tested against the formula only
(tests/test_finetune_loss.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

QUERIES = [
    "What is the capital of France?",
    "How many people live in Seoul? A longer query with several more words in it",
    "dense",
]
PASSAGES = [
    "Paris is the capital and largest city of France.",
    "Seoul is a large city.",
    "Sparse retrieval gives each token a weight, and the lexical score sums shared tokens.",
    "the the the",
    "About ten million people live in the city of Seoul.",
    "Berlin is the capital of Germany; Munich lies in the south of the country. " * 3,
    "emoji 😀 and unknown symbols ☃",
    "北京是中国的首都",
    "Dense retrieval encodes the query and the passage into one vector.",
    "Multi vector retrieval keeps one vector per token and scores with late interaction.",
    "",
    "A hybrid system combines dense, sparse and multi vector scores into one ranking.",
]
GROUP = 4
TEACHER = [[3.0, 1.0, 0.5, -1.0], [2.0, 2.5, 0.0, 0.1], [1.0, -1.0, 0.3, 0.2]]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="hub id or local folder of a BGE-M3 checkpoint")
    source.add_argument(
        "--random", action="store_true", help="use m3connect's random test checkpoint"
    )
    parser.add_argument("--temperature", type=float, default=0.02)
    parser.add_argument("--atol", type=float, default=1e-5)
    args = parser.parse_args()

    import torch
    from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import (
        EncoderOnlyEmbedderM3Model,
    )
    from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import (
        EncoderOnlyEmbedderM3Runner,
    )
    from transformers import AutoTokenizer

    from m3connect.encoder import M3Encoder
    from m3connect.finetune import unified_loss
    from m3connect.testing import build_random_checkpoint

    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_random_checkpoint(Path(tmp) / "m3")) if args.random else args.model
        tokenizer = AutoTokenizer.from_pretrained(model)
        reference = EncoderOnlyEmbedderM3Model(
            EncoderOnlyEmbedderM3Runner.get_model(model),
            tokenizer=tokenizer,
            temperature=args.temperature,
            kd_loss_type="m3_kd_loss",
            normalize_embeddings=True,
            unified_finetuning=True,
            use_self_distill=True,
            self_distill_start_step=-1,
        )
        reference.train()  # its loss exists only in training mode
        reference.model.eval()  # dropout off, as on our side
        ours = M3Encoder.from_pretrained(model, device="cpu")

        def batch(texts: list[str]) -> dict[str, torch.Tensor]:
            return dict(
                tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
            )

        for quirk in (True, False):
            for distill in (True, False):
                for teacher in (None, TEACHER):
                    reference.use_self_distill = distill
                    expected = reference(
                        queries=batch(QUERIES),
                        passages=batch(PASSAGES),
                        teacher_scores=None
                        if teacher is None
                        else [s for row in teacher for s in row],
                    ).loss
                    got = unified_loss(
                        ours,
                        QUERIES,
                        PASSAGES,
                        group_size=GROUP,
                        temperature=args.temperature,
                        self_distill=distill,
                        teacher_scores=teacher,
                        query_max_len=512,
                        passage_max_len=512,
                        colbert_padding_scores_zero=quirk,
                    )
                    diff = abs(float(expected) - float(got.total))
                    ok = diff <= args.atol
                    if quirk:
                        failures += not ok
                    else:
                        # Real tokens only (the default): equal unless a query row's best dot
                        # product with some short passage is negative (FlagEmbedding takes 0).
                        ok = ok or "(differs by the padding rule)"
                    parts = ", ".join(f"{k} {v:.4f}" for k, v in got.as_floats().items())
                    print(
                        f"{'ok  ' if ok is True else ok if ok else 'FAIL'} padding_scores_zero={quirk} "
                        f"self_distill={distill} teacher="
                        f"{'yes' if teacher else 'no'}: FlagEmbedding {float(expected):.6f}, "
                        f"m3connect {float(got.total):.6f}, |diff| {diff:.2e} ({parts})"
                    )
    print("all losses match" if not failures else f"{failures} losses differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
