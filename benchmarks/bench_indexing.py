"""End-to-end indexing vs encoding alone: what writing to the store costs.

    python benchmarks/bench_indexing.py                       # the embedded default store
    python benchmarks/bench_indexing.py --store milvus: --store memory: --max-tokens 512

On the bundled sample corpus (or ``--corpus FILE``), with a random checkpoint of the BGE-M3
layout (hidden 384, 6 layers by default: the shapes of a small real model; the vectors mean
nothing, the cost of producing and storing them is real):

- encode only: chunk the corpus as the job does, then ``encoder.encode`` every chunk in the
  job's steps (256 chunks per call), nothing written;
- end to end: ``IndexJob(...).run(corpus)`` into a new store (read, chunk, ask the store what it
  holds, encode, write), per ``--store``.

Prints docs/s and tokens/s of both and their ratio (1.0 = writing is free). Encode-only runs
before and after the store runs; the faster of the two is the reference (the machine may be
shared). ``--json`` for machine output.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from m3connect.chunking import Chunker  # noqa: E402
from m3connect.encoder import M3Encoder  # noqa: E402
from m3connect.indexing import DEFAULT_WRITE_CHUNKS, IndexJob  # noqa: E402
from m3connect.sources import open_source  # noqa: E402
from m3connect.testing import build_random_checkpoint  # noqa: E402
from m3connect.uris import DEFAULT_STORE_URI, parse_store_uri  # noqa: E402

SAMPLE = ROOT / "m3connect" / "data" / "sample" / "corpus.jsonl"


def encode_only(
    encoder: M3Encoder, records: list, max_tokens: int, batch_tokens: int | None
) -> dict:
    start = time.perf_counter()
    chunker = Chunker(encoder.tokenizer, max_tokens)
    chunks = [
        c
        for cs in chunker.chunk_many([r.id for r in records], [r.text for r in records])
        for c in cs
    ]
    kwargs = {"max_length": max_tokens}
    if batch_tokens:
        kwargs["batch_tokens"] = batch_tokens
    for i in range(0, len(chunks), DEFAULT_WRITE_CHUNKS):
        encoder.encode([c.text for c in chunks[i : i + DEFAULT_WRITE_CHUNKS]], **kwargs)
    seconds = time.perf_counter() - start
    tokens = sum(c.n_tokens for c in chunks)
    return {"seconds": seconds, "chunks": len(chunks), "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=SAMPLE)
    parser.add_argument(
        "--store", action="append", help=f"store URI kind (default {DEFAULT_STORE_URI})"
    )
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--docs", type=int, default=None, help="use the first N documents")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_random_checkpoint(
            Path(tmp) / "ckpt",
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=max(1, args.hidden // 64),
            intermediate_size=4 * args.hidden,
        )
        encoder = M3Encoder.from_pretrained(checkpoint, device="cpu")
        records = list(open_source(args.corpus, title_field="title", on_error="stop"))[: args.docs]
        encoder.encode(
            [r.text for r in records[:8]], max_length=min(512, args.max_tokens)
        )  # warm-up

        reference = [encode_only(encoder, records, args.max_tokens, args.batch_tokens)]
        runs = []
        for i, uri in enumerate(args.store or [DEFAULT_STORE_URI]):
            parsed = parse_store_uri(uri)
            if parsed.embedded and parsed.kind != "memory":  # a new store in the temp folder
                suffix = ".db" if parsed.kind == "milvus" else ""
                uri = f"{parsed.kind}:{Path(tmp) / f'store{i}{suffix}'}#bench"
            start = time.perf_counter()
            summary = IndexJob(
                encoder, [uri], max_tokens=args.max_tokens, batch_tokens=args.batch_tokens
            ).run(records)
            runs.append((uri, time.perf_counter() - start, summary))
        reference.append(encode_only(encoder, records, args.max_tokens, args.batch_tokens))

    best = min(reference, key=lambda r: r["seconds"])
    n = len(records)
    result = {
        "corpus": str(args.corpus),
        "docs": n,
        "chunks": best["chunks"],
        "tokens": best["tokens"],
        "model": f"random hidden {args.hidden}, {args.layers} layers",
        "max_tokens": args.max_tokens,
        "encode_only": {
            "seconds": [round(r["seconds"], 2) for r in reference],
            "docs_per_s": round(n / best["seconds"], 2),
            "tokens_per_s": round(best["tokens"] / best["seconds"], 1),
        },
        "end_to_end": [
            {
                "store": uri.split(":", 1)[0],
                "seconds": round(seconds, 2),
                "docs_per_s": round(n / seconds, 2),
                "tokens_per_s": round(summary.tokens / seconds, 1),
                "ratio_to_encode_only": round(best["seconds"] / seconds, 3),
                # Measured inside the same run, so immune to load changes between runs.
                "write_seconds": round(summary.write_seconds, 2),
                "lookup_seconds": round(summary.lookup_seconds, 2),
                "encode_seconds": round(summary.encode_seconds, 2),
                "store_share": round((summary.write_seconds + summary.lookup_seconds) / seconds, 3),
                "write_ms_per_chunk": round(
                    1000 * summary.write_seconds / max(1, summary.chunks), 2
                ),
            }
            for uri, seconds, summary in runs
        ],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{n} docs, {result['chunks']} chunks, {result['tokens']:,} tokens; {result['model']}; "
        f"max_tokens {args.max_tokens}"
    )
    enc = result["encode_only"]
    print(
        f"encode only      {enc['docs_per_s']:>8.2f} docs/s {enc['tokens_per_s']:>10,.0f} tokens/s  (runs {enc['seconds']} s)"
    )
    for row in result["end_to_end"]:
        print(
            f"end to end {row['store']:<6}{row['docs_per_s']:>8.2f} docs/s {row['tokens_per_s']:>10,.0f} tokens/s  "
            f"ratio {row['ratio_to_encode_only']:.3f}"
        )
        print(
            f"    in the job: encode {row['encode_seconds']} s, write {row['write_seconds']} s "
            f"({row['write_ms_per_chunk']} ms/chunk), lookup {row['lookup_seconds']} s: the store takes "
            f"{100 * row['store_share']:.1f}% of the job"
        )


if __name__ == "__main__":
    main()
