"""Compare M3Encoder with the reference implementation, FlagEmbedding's BGEM3FlagModel.

Not part of the test suite (pytest does not collect this file, and FlagEmbedding 1.4.x does not
import under transformers 5). Run it in a separate environment::

    python -m venv /tmp/ref && . /tmp/ref/bin/activate
    pip install "torch==2.13.0" "transformers<5" FlagEmbedding -e .
    python tests/reference/compare_flagembedding.py --model BAAI/bge-m3     # or a local folder
    python tests/reference/compare_flagembedding.py --random                # no download needed

It encodes the same texts with both, in float32 on CPU, and exits non-zero when dense, sparse
or ColBERT outputs differ by more than ``--atol``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

TEXTS = [
    "What is BGE M3?",
    "BGE M3 is an embedding model supporting dense retrieval, lexical matching and multi-vector interaction.",
    "Definition of BM25: a ranking function used by search engines to estimate relevance.",
    "서울은 대한민국의 수도입니다. 北京是中国的首都。東京は日本の首都です。",
    "emoji and symbols 😀 ☃ 🚀 are unknown to small vocabularies",
    "",
    "the the the the repeated tokens keep their largest weight the",
    "Long documents are split into chunks before they are indexed. " * 60,
]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="hub id or local folder of a BGE-M3 checkpoint")
    source.add_argument(
        "--random", action="store_true", help="use m3connect's random test checkpoint"
    )
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args()

    from FlagEmbedding import BGEM3FlagModel

    from m3connect.encoder import M3Encoder
    from m3connect.testing import build_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = str(build_random_checkpoint(Path(tmp) / "m3")) if args.random else args.model
        reference = BGEM3FlagModel(model, use_fp16=False, devices=["cpu"])
        expected = reference.encode(
            TEXTS,
            batch_size=4,
            max_length=args.max_length,
            return_dense=True,
            return_sparse=True,
            return_colbert_vecs=True,
        )
        ours = M3Encoder.from_pretrained(model, device="cpu").encode(
            TEXTS, max_length=args.max_length
        )

    failures = 0
    for i, text in enumerate(TEXTS):
        label = f"text {i} ({text[:30]!r})"
        dense_diff = float(np.max(np.abs(np.asarray(expected["dense_vecs"][i]) - ours.dense[i])))
        ref_sparse = {int(k): float(v) for k, v in expected["lexical_weights"][i].items()}
        keys = set(ref_sparse) | set(ours.sparse[i])
        sparse_diff = max(
            (abs(ref_sparse.get(k, 0.0) - ours.sparse[i].get(k, 0.0)) for k in keys), default=0.0
        )
        ref_colbert = np.asarray(expected["colbert_vecs"][i], dtype=np.float32)
        if ref_colbert.shape != ours.colbert[i].shape:
            print(f"FAIL {label}: colbert shapes {ref_colbert.shape} vs {ours.colbert[i].shape}")
            failures += 1
            continue
        colbert_diff = (
            float(np.max(np.abs(ref_colbert - ours.colbert[i]))) if ref_colbert.size else 0.0
        )
        worst = max(dense_diff, sparse_diff, colbert_diff)
        status = "ok  " if worst <= args.atol else "FAIL"
        failures += worst > args.atol
        print(
            f"{status} {label}: max |diff| dense {dense_diff:.2e}, sparse {sparse_diff:.2e} "
            f"({len(ref_sparse)} vs {len(ours.sparse[i])} tokens), colbert {colbert_diff:.2e}"
        )
    print("all outputs match" if not failures else f"{failures} texts differ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
