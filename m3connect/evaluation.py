"""The paper's ablation on your data: nDCG@10 and Recall@100 of each BGE-M3 retrieval mode.

Input is a BEIR-format folder: ``corpus.jsonl`` (``{"_id", "title", "text", ...}``),
``queries.jsonl`` (``{"_id", "text"}``) and qrels, a TSV with the header
``query-id corpus-id score`` (``qrels.tsv`` or BEIR's ``qrels/<split>.tsv``). The corpus is
indexed with an :class:`~m3connect.indexing.IndexJob` (BEIR's ``title + text``), each query is
encoded once, and every mode searches the same store:

============== =================================================================================
``dense``      dense retrieval
``sparse``     lexical (sparse) retrieval
``colbert``    ColBERT (multi-vector) retrieval, exact MaxSim
``dense+sparse`` dense and sparse legs, **weighted** fusion ``1 * s_dense + 0.3 * s_lex`` (the
               paper's "Dense+Sparse", ``w = (1, 0.3)``; m3connect divides by the weight sum,
               which does not change the ranking)
``all``        the same candidates re-ranked with ``1 * s_dense + 0.3 * s_lex + 1 * s_mul``
               (``rerank="all"``, the paper's "All", ``w = (1, 0.3, 1)``)
============== =================================================================================

Hits are chunks; a document's rank is that of its best chunk. Metrics come from
``pytrec_eval`` (``pytrec-eval-terrier``: the C ``trec_eval`` that BEIR uses, small wheels), fed
with the store's ranks so that ties keep the store's order (trec_eval would re-break them by
document id). A query in the qrels that retrieves nothing scores 0; it is never dropped.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m3connect.chunking import DOC_ID_KEY, parse_chunk_id
from m3connect.sources import open_source
from m3connect.store import Hit, SearchParams

if TYPE_CHECKING:
    from m3connect.encoder import M3Encoder
    from m3connect.store import M3Store

__all__ = [
    "EVAL_MODES",
    "EvalError",
    "EvalReport",
    "ModeResult",
    "evaluate",
    "evaluate_run",
    "load_beir",
    "read_qrels",
    "doc_ranking",
]

logger = logging.getLogger(__name__)

#: The paper's rows (Table "ablation"), as search parameters.
EVAL_MODES: dict[str, dict[str, Any]] = {
    "dense": {"mode": "dense"},
    "sparse": {"mode": "sparse"},
    "colbert": {"mode": "colbert"},
    "dense+sparse": {
        "mode": "hybrid",
        "hybrid_legs": ("dense", "sparse"),
        "fusion": "weighted",
        "weights": (1.0, 0.3, 0.0),
    },
    "all": {
        "mode": "hybrid",
        "hybrid_legs": ("dense", "sparse"),
        "fusion": "weighted",
        "weights": (1.0, 0.3, 1.0),
        "rerank": "all",
    },
}
NDCG_K = 10
RECALL_K = 100
#: Candidates each leg retrieves for the hybrid modes (and re-ranked by "all"): the paper's 200.
DEFAULT_CANDIDATES = 200


class EvalError(ValueError):
    """A data folder that is not BEIR-shaped, or a metrics library that is missing."""


@dataclass
class ModeResult:
    mode: str
    ndcg: float
    recall: float
    queries: int
    seconds: float
    per_query: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)

    @property
    def queries_per_s(self) -> float:
        return self.queries / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EvalReport:
    results: list[ModeResult]
    queries: int
    docs: int
    chunks: int
    index_seconds: float
    store: str = ""
    model: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "store": self.store,
            "docs": self.docs,
            "chunks": self.chunks,
            "queries": self.queries,
            "index_seconds": round(self.index_seconds, 3),
            "metrics": {
                r.mode: {
                    f"ndcg@{NDCG_K}": r.ndcg,
                    f"recall@{RECALL_K}": r.recall,
                    "queries_per_s": round(r.queries_per_s, 2),
                }
                for r in self.results
            },
        }

    def format(self) -> str:
        lines = [
            f"{self.queries} queries, {self.docs} documents ({self.chunks} chunks), model {self.model}",
            f"{'mode':<14} {'nDCG@10':>8} {'Recall@100':>11} {'queries/s':>10}",
        ]
        for r in self.results:
            lines.append(f"{r.mode:<14} {r.ndcg:>8.4f} {r.recall:>11.4f} {r.queries_per_s:>10.1f}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def read_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """``{query_id: {doc_id: relevance}}`` from a BEIR qrels TSV (header ``query-id corpus-id
    score``; a file without that header is read as three columns)."""
    qrels: dict[str, dict[str, int]] = {}
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        for line_no, row in enumerate(reader, start=1):
            if not row or not "".join(row).strip():
                continue
            if line_no == 1 and row[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if len(row) < 3:
                raise EvalError(
                    f"{path} line {line_no}: expected query-id, corpus-id, score; got {row!r}"
                )
            qid, did, score = row[0].strip(), row[1].strip(), row[-1].strip()
            try:
                relevance = int(float(score))
            except ValueError:
                raise EvalError(f"{path} line {line_no}: score {score!r} is not a number") from None
            qrels.setdefault(qid, {})[did] = relevance
    return qrels


def _read_queries(path: Path) -> dict[str, str]:
    queries: dict[str, str] = {}
    source = open_source(path, format="jsonl", id_field=None, text_field="text", on_error="stop")
    for record in source:
        queries[str(record.id)] = record.text
    return queries


def _find(data_dir: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    raise EvalError(f"{data_dir} has no {what} ({' or '.join(names)}); a BEIR folder is expected")


def load_beir(
    data_dir: str | Path, split: str = "test"
) -> tuple[Path, dict[str, str], dict[str, dict[str, int]]]:
    """The corpus path, the queries and the qrels of a BEIR folder."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise EvalError(f"{data_dir} is not a folder")
    corpus = _find(folder, ("corpus.jsonl", "corpus.jsonl.gz"), "corpus")
    queries = _read_queries(_find(folder, ("queries.jsonl", "queries.jsonl.gz"), "queries"))
    qrels = read_qrels(_find(folder, ("qrels.tsv", f"qrels/{split}.tsv"), "qrels"))
    return corpus, queries, qrels


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def doc_ranking(hits: Sequence[Hit]) -> list[str]:
    """Document ids in rank order from chunk hits (a document ranks at its best chunk)."""
    seen: dict[str, None] = {}
    for hit in hits:
        doc_id = hit.metadata.get(DOC_ID_KEY) if hit.metadata else None
        if doc_id is None:
            try:
                doc_id = parse_chunk_id(str(hit.id))[0]
            except ValueError:
                doc_id = hit.id
        seen.setdefault(str(doc_id), None)
    return list(seen)


def evaluate_run(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Sequence[str]],
    ndcg_k: int = NDCG_K,
    recall_k: int = RECALL_K,
) -> dict[str, dict[str, float]]:
    """Per query ``{"ndcg": nDCG@ndcg_k, "recall": Recall@recall_k}`` of ranked document ids
    against the qrels (trec_eval's definitions: linear gains, ``log2(rank + 1)`` discounts).
    Every query of the qrels is scored; one without a ranking scores 0."""
    try:
        import pytrec_eval
    except ImportError:
        raise EvalError("m3connect eval needs pytrec_eval: pip install 'm3connect[eval]'") from None
    ndcg_name, recall_name = f"ndcg_cut.{ndcg_k}", f"recall.{recall_k}"
    qrels_str = {str(q): {str(d): int(r) for d, r in docs.items()} for q, docs in qrels.items()}
    # Scores from the ranks: trec_eval sorts by score, then by document id (descending), so
    # equal store scores would be re-ordered; decreasing integers keep the store's order.
    run_str = {
        str(q): {str(d): float(len(ranked) - i) for i, d in enumerate(ranked)}
        for q, ranked in run.items()
        if ranked and str(q) in qrels_str
    }
    evaluator = pytrec_eval.RelevanceEvaluator(qrels_str, {ndcg_name, recall_name})
    measured = evaluator.evaluate(run_str) if run_str else {}
    key_n, key_r = ndcg_name.replace(".", "_"), recall_name.replace(".", "_")
    out: dict[str, dict[str, float]] = {}
    for qid in qrels_str:
        values = measured.get(qid, {})
        out[qid] = {"ndcg": float(values.get(key_n, 0.0)), "recall": float(values.get(key_r, 0.0))}
    return out


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def evaluate(
    encoder: M3Encoder,
    data_dir: str | Path,
    store: str | M3Store = "memory:",
    *,
    modes: Sequence[str] = tuple(EVAL_MODES),
    split: str = "test",
    candidates: int = DEFAULT_CANDIDATES,
    max_tokens: int | None = None,
    overlap: int = 0,
    batch_tokens: int | None = None,
    rebuild: bool = False,
    progress: bool = False,
) -> EvalReport:
    """Index the corpus of ``data_dir`` into ``store`` (resuming if it is already there) and
    measure each of ``modes`` (keys of :data:`EVAL_MODES`)."""
    from m3connect.chunking import Chunker
    from m3connect.indexing import IndexJob, _open_target, index_fingerprint

    unknown = [m for m in modes if m not in EVAL_MODES]
    if unknown:
        raise EvalError(f"unknown mode(s) {unknown}; choose from {', '.join(EVAL_MODES)}")
    corpus, queries, qrels = load_beir(data_dir, split)
    judged = {q: docs for q, docs in qrels.items() if q in queries}
    missing = sorted(set(qrels) - set(queries))
    if missing:
        logger.warning(
            "%d qrels queries are not in queries.jsonl and are left out: %s",
            len(missing),
            missing[:5],
        )
    if not judged:
        raise EvalError(f"no query of the qrels of {data_dir} is in queries.jsonl")

    # The job gets the open store: "memory:" would be a new store at each opening.
    fingerprint = index_fingerprint(
        encoder.fingerprint,
        Chunker(encoder.tokenizer, max_tokens or int(encoder.max_length), overlap),
    )
    opened = _open_target(store, fingerprint, rebuild)
    target, label = opened.store, opened.label
    try:
        job = IndexJob(
            encoder,
            [target],
            max_tokens=max_tokens,
            overlap=overlap,
            batch_tokens=batch_tokens,
            progress=progress,
        )
        summary = job.run(
            corpus, id_field="_id", text_field="text", title_field="title", on_error="stop"
        )
        chunks = target.count()
        docs = summary.docs
        qids = list(judged)
        embeddings = encoder.encode_queries([queries[q] for q in qids])
        # Enough chunk hits for RECALL_K distinct documents: each extra chunk of a document can
        # push one document out of the top.
        k = max(1, min(chunks, RECALL_K + max(0, chunks - docs)))
        results = []
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(modes) * len(qids), desc="searching", unit="query")
        for mode in modes:
            params = SearchParams(k=k, candidates=max(candidates, k), **EVAL_MODES[mode])
            start = time.perf_counter()
            run = {}
            for i, qid in enumerate(qids):
                run[qid] = doc_ranking(target.search(embeddings[i], params))
                if bar is not None:
                    bar.update()
            seconds = time.perf_counter() - start
            per_query = evaluate_run(judged, run)
            results.append(
                ModeResult(
                    mode,
                    _mean([v["ndcg"] for v in per_query.values()]),
                    _mean([v["recall"] for v in per_query.values()]),
                    len(qids),
                    seconds,
                    per_query,
                )
            )
        if bar is not None:
            bar.close()
    finally:
        opened.close()
    return EvalReport(results, len(judged), docs, chunks, summary.seconds, label, encoder.name)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def write_report(report: EvalReport, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
