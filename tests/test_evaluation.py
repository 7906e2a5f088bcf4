"""``m3connect eval``: nDCG@10 and Recall@100 equal the hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from m3connect.evaluation import (
    EVAL_MODES,
    EvalError,
    doc_ranking,
    evaluate,
    evaluate_run,
    load_beir,
    read_qrels,
)
from m3connect.store import Hit, SearchParams
from m3connect.testing import SAMPLE_TEXTS

QRELS = {
    "q1": {"d8": 1, "d13": 2},
    "q2": {"d9": 1, "d19": 2, "d4": 0},
    "q3": {"d0": 1, "d14": 1, "d16": 1, "d17": 1},
    "q4": {"d27": 1},
}
QUERIES = {
    "q1": "What is the capital of France and Germany?",
    "q2": "How many people live in Seoul?",
    "q3": "the quick brown fox",
    "q4": "Cairo",
    "q5": "a query without judgements",
}


def make_beir(folder: Path, *, long_docs: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for i, text in enumerate(SAMPLE_TEXTS):
            body = " ".join([text] * (1 + i % 3)) if long_docs else text
            title = f"Title {i}" if i % 2 else ""
            handle.write(
                json.dumps({"_id": f"d{i}", "title": title, "text": body, "metadata": {}}) + "\n"
            )
    with (folder / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for qid, text in QUERIES.items():
            handle.write(json.dumps({"_id": qid, "text": text}) + "\n")
    lines = ["query-id\tcorpus-id\tscore"]
    lines += [f"{q}\t{d}\t{r}" for q, docs in QRELS.items() for d, r in docs.items()]
    (folder / "qrels.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture
def beir_dir(tmp_path) -> Path:
    return make_beir(tmp_path / "beir")


def ndcg(ranked: list[str], judged: dict[str, int], k: int = 10) -> float:
    """By hand: linear gains, log2(rank + 1) discounts (trec_eval, BEIR)."""
    dcg = sum(judged.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:k]))
    ideal = sorted((r for r in judged.values() if r > 0), reverse=True)[:k]
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall(ranked: list[str], judged: dict[str, int], k: int = 100) -> float:
    relevant = {d for d, r in judged.items() if r > 0}
    return len(relevant & set(ranked[:k])) / len(relevant) if relevant else 0.0


def test_metrics_by_hand() -> None:
    qrels = {"a": {"d1": 1, "d2": 2}, "b": {"d5": 1}, "c": {"d4": 1, "d9": 1}}
    run = {"a": ["d3", "d1", "d2"], "c": ["d4"], "x": ["d1"]}
    got = evaluate_run(qrels, run)
    # a: DCG = 1/log2(3) + 2/log2(4); IDCG = 2/log2(2) + 1/log2(3)
    assert got["a"]["ndcg"] == pytest.approx((1 / math.log2(3) + 1) / (2 + 1 / math.log2(3)))
    assert got["a"]["recall"] == 1.0
    assert got["b"] == {"ndcg": 0.0, "recall": 0.0}  # retrieved nothing: scored 0, not dropped
    assert got["c"]["ndcg"] == pytest.approx(1 / (1 + 1 / math.log2(3)))
    assert got["c"]["recall"] == 0.5
    assert set(got) == {"a", "b", "c"}


def test_metrics_cutoffs_and_order() -> None:
    ranked = [f"n{i}" for i in range(150)]
    ranked[10] = "rel1"  # just outside the nDCG@10 cut
    ranked[120] = "rel2"  # outside Recall@100
    got = evaluate_run({"q": {"rel1": 1, "rel2": 1}}, {"q": ranked})["q"]
    assert (got["ndcg"], got["recall"]) == (0.0, 0.5)
    # The given order counts, never the ids (trec_eval would sort ties by id).
    got = evaluate_run({"q": {"z": 1}}, {"q": ["z", "a"]})["q"]
    assert got["ndcg"] == 1.0


def test_read_qrels_and_layouts(tmp_path) -> None:
    path = tmp_path / "q.tsv"
    path.write_text("q1\td1\t1\nq1\td2\t0\n")  # no header
    assert read_qrels(path) == {"q1": {"d1": 1, "d2": 0}}
    (tmp_path / "bad.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\n")
    with pytest.raises(EvalError, match="line 2"):
        read_qrels(tmp_path / "bad.tsv")
    folder = make_beir(tmp_path / "beir")
    (folder / "qrels").mkdir()
    (folder / "qrels.tsv").rename(folder / "qrels" / "test.tsv")  # BEIR's own layout
    corpus, queries, qrels = load_beir(folder)
    assert corpus.name == "corpus.jsonl" and len(queries) == 5 and qrels == QRELS
    with pytest.raises(EvalError, match="no qrels"):
        load_beir(folder, split="dev")


def test_paper_modes() -> None:
    assert EVAL_MODES["dense+sparse"]["weights"] == (1.0, 0.3, 0.0)
    assert EVAL_MODES["dense+sparse"]["fusion"] == "weighted"
    assert EVAL_MODES["all"]["weights"] == (1.0, 0.3, 1.0) and EVAL_MODES["all"]["rerank"] == "all"


def test_doc_ranking_takes_the_best_chunk() -> None:
    hits = [
        Hit("a#1", 0.9, metadata={"doc_id": "a"}),
        Hit("b#0", 0.8, metadata={"doc_id": "b"}),
        Hit("a#0", 0.7, metadata={"doc_id": "a"}),
        Hit("c#2", 0.6),
    ]
    assert doc_ranking(hits) == ["a", "b", "c"]


@pytest.mark.parametrize("long_docs", [False, True])
def test_evaluate_equals_hand_computed(m3_encoder, tmp_path, long_docs: bool) -> None:
    folder = make_beir(tmp_path / "beir", long_docs=long_docs)
    max_tokens = 16 if long_docs else None  # several chunks per document
    from m3connect.stores.memory import InMemoryStore

    store = InMemoryStore()
    report = evaluate(m3_encoder, folder, store, max_tokens=max_tokens, candidates=50)
    assert report.queries == 4 and report.docs == 30
    assert (report.chunks > 30) is long_docs
    assert [r.mode for r in report.results] == list(EVAL_MODES)
    # The same searches, scored by hand.
    k = min(report.chunks, 100 + report.chunks - report.docs)
    for result in report.results:
        ndcgs, recalls = [], []
        for qid, judged in QRELS.items():
            query = m3_encoder.encode_queries([QUERIES[qid]])[0]
            params = SearchParams(k=k, candidates=max(50, k), **EVAL_MODES[result.mode])
            ranked = []
            for hit in store.search(query, params):
                if hit.metadata["doc_id"] not in ranked:
                    ranked.append(hit.metadata["doc_id"])
            ndcgs.append(ndcg(ranked, judged))
            recalls.append(recall(ranked, judged))
            assert result.per_query[qid]["ndcg"] == pytest.approx(ndcgs[-1], abs=1e-4)
        assert result.ndcg == pytest.approx(sum(ndcgs) / 4, abs=1e-4)
        assert result.recall == pytest.approx(sum(recalls) / 4, abs=1e-6)
    # Every document is within the top 100: dense retrieves all 30 (Recall@100 = 1).
    assert report.results[0].recall == 1.0
    text = report.format()
    assert "nDCG@10" in text and "Recall@100" in text and "dense+sparse" in text


def test_evaluate_into_a_persistent_store_resumes(m3_encoder, tmp_path, beir_dir) -> None:
    uri = f"qdrant:{tmp_path / 'q'}"
    first = evaluate(m3_encoder, beir_dir, uri, modes=["dense"])
    second = evaluate(m3_encoder, beir_dir, uri, modes=["dense"])
    assert first.results[0].ndcg == second.results[0].ndcg
    assert second.chunks == 30


def test_bad_folder(tmp_path, m3_encoder) -> None:
    with pytest.raises(EvalError, match="corpus"):
        evaluate(m3_encoder, tmp_path)
    folder = make_beir(tmp_path / "b")
    with pytest.raises(EvalError, match="unknown mode"):
        evaluate(m3_encoder, folder, modes=["bm25"])
