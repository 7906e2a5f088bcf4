"""``m3connect index / search / eval / demo`` end to end through the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_evaluation import make_beir
from test_indexing import MAX_TOKENS, write_corpus

from m3connect import cli_jobs
from m3connect.cli import main
from m3connect.cli_jobs import COMMANDS
from m3connect.uris import open_store

REPO = Path(__file__).resolve().parent.parent

for _command in COMMANDS:  # registered by m3connect.cli; added here if it does not (yet)
    if _command.name not in main.commands:
        main.add_command(_command)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def beir_dir(tmp_path) -> Path:
    return make_beir(tmp_path / "beir")


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus.jsonl", 20, bad_lines={7: "{broken"})


def run(runner: CliRunner, *args: str, code: int = 0):  # type: ignore[no-untyped-def]
    result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


def test_index_then_search(runner, corpus, tmp_path, m3_checkpoint) -> None:
    uri = f"qdrant:{tmp_path / 'store'}#docs"
    result = run(
        runner,
        "index",
        corpus,
        "--store",
        uri,
        "--model",
        m3_checkpoint,
        "--max-tokens",
        MAX_TOKENS,
        "--json",
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert (summary["docs"], summary["indexed"], summary["errors"]) == (19, 19, 1)
    assert "line 7: invalid JSON" in summary["bad_records"][0]
    with open_store(uri) as handle:
        assert handle.store.count() == summary["chunks"]

    # Again: everything is skipped.
    result = run(
        runner,
        "index",
        corpus,
        "--store",
        uri,
        "--model",
        m3_checkpoint,
        "--max-tokens",
        MAX_TOKENS,
    )
    assert re.search(r"skipped\s+19 documents already stored", result.output)

    # The model defaults to the one the store was indexed with.
    result = run(runner, "search", uri, "capital of France", "--rerank", "all", "-k", "5")
    lines = result.stdout.strip().splitlines()
    # The score that orders the hits is named after what it is ("all": the weighted sum of
    # the exact scores), the per-representation scores after the bar; a legend says so.
    assert lines[0].split()[:7] == ["#", "id", "all", "|", "dense", "sparse", "colbert"]
    assert len(lines) == 2 + 5 + 1
    assert lines[-1].startswith("all: the weighted sum of the exact scores")
    assert re.match(r"\s+1\s+doc-\d+#\d+\s", lines[2])

    result = run(
        runner,
        "search",
        uri,
        "Seoul",
        "--json",
        "--mode",
        "dense",
        "-k",
        "3",
        "--filter",
        '{"n": {"$lt": 10}}',
    )
    hits = json.loads(result.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3][: len(hits)] and hits
    assert all(set(h["scores"]) == {"dense"} and h["metadata"]["n"] < 10 for h in hits)
    assert hits == sorted(hits, key=lambda h: -h["score"])


def test_search_with_weights_and_errors(runner, corpus, tmp_path, m3_checkpoint) -> None:
    uri = f"qdrant:{tmp_path / 'store'}"
    run(
        runner,
        "index",
        corpus,
        "--store",
        uri,
        "--model",
        m3_checkpoint,
        "--max-tokens",
        MAX_TOKENS,
        "--no-progress",
    )
    result = run(
        runner,
        "search",
        uri,
        "fox",
        "--fusion",
        "weighted",
        "--weights",
        "1,0.3,0",
        "--json",
        "--model",
        m3_checkpoint,
    )
    assert json.loads(result.stdout)
    result = run(runner, "search", uri, "fox", "--weights", "1,2", code=2)
    assert "three numbers" in result.output
    result = run(runner, "search", uri, "fox", "--filter", "{nope", code=2)
    assert "not valid JSON" in result.output
    result = run(runner, "search", "mongodb://x", "fox", code=2)
    assert "unknown store URI" in result.output


def test_on_error_stop_names_the_line(runner, corpus, tmp_path, m3_checkpoint) -> None:
    uri = f"qdrant:{tmp_path / 'store'}"
    result = run(
        runner,
        "index",
        corpus,
        "--store",
        uri,
        "--model",
        m3_checkpoint,
        "--on-error",
        "stop",
        "--no-progress",
        code=1,
    )
    assert "line 7: invalid JSON" in result.output
    assert "Traceback" not in result.output
    with open_store(uri) as handle:  # the six documents before it are indexed
        assert {
            r.metadata["doc_id"] for r in handle.store.get([f"doc-{i}#0" for i in range(20)])
        } == {f"doc-{i}" for i in range(6)}


@pytest.mark.slow
def test_changed_chunking_is_refused_then_rebuilt(runner, corpus, tmp_path, m3_checkpoint) -> None:
    uri = f"qdrant:{tmp_path / 'store'}"
    base = ["index", corpus, "--store", uri, "--model", m3_checkpoint, "--no-progress"]
    run(runner, *base, "--max-tokens", MAX_TOKENS)
    result = run(runner, *base, "--max-tokens", 40, "--overlap", 5, code=1)
    assert "other chunking settings" in result.output and "--rebuild" in result.output
    assert "Traceback" not in result.output
    result = run(runner, *base, "--max-tokens", 40, "--overlap", 5, "--rebuild", "--json")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    with open_store(uri) as handle:
        assert handle.store.count() == summary["chunks"]
        assert handle.store.fingerprint.extra["chunking"]["max_tokens"] == 40


def test_two_stores_one_job(runner, corpus, tmp_path, m3_checkpoint) -> None:
    uris = [f"qdrant:{tmp_path / 'q'}", f"milvus:{tmp_path / 'm.db'}"]
    result = run(
        runner,
        "index",
        corpus,
        "--store",
        uris[0],
        "--store",
        uris[1],
        "--model",
        m3_checkpoint,
        "--json",
        "--no-progress",
    )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["stores"] == [f"{uris[0]}#m3connect", f"{uris[1]}#m3connect"]
    for uri in uris:
        with open_store(uri) as handle:
            assert handle.store.count() == summary["chunks"] == 19


@pytest.mark.slow
def test_sigint_then_resume(corpus, tmp_path, m3_checkpoint, m3_encoder) -> None:
    """A real Ctrl-C in a subprocess (with its own store files); the next run finishes the job
    with exact counts."""
    from m3connect.indexing import IndexJob
    from m3connect.stores.memory import InMemoryStore

    n = 80
    big = write_corpus(tmp_path / "big.jsonl", n)
    uri = f"qdrant:{tmp_path / 'store'}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-c",
        "from m3connect.cli_jobs import index_command; index_command()",
        str(big),
        "--store",
        uri,
        "--model",
        str(m3_checkpoint),
        "--max-tokens",
        str(MAX_TOKENS),
        "--write-batch",
        "4",
        "--progress",
    ]
    process = subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    seen = ""
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            char = process.stderr.read(1)  # type: ignore[union-attr]
            if not char:
                break
            seen += char
            if re.search(rf"\| *([89]|\d\d)/{n}", seen):  # some steps are written
                break
        assert process.poll() is None, seen
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    seen += err
    assert process.returncode == 130, seen
    assert "interrupted" in seen and "run the same command again" in seen
    with open_store(uri) as handle:
        written = handle.store.count()
    assert written > 0

    expected = InMemoryStore()
    IndexJob(m3_encoder, [expected], max_tokens=MAX_TOKENS).run(big)
    assert written < expected.count()
    summary = IndexJob(m3_encoder, [uri], max_tokens=MAX_TOKENS, write_chunks=64).run(big)
    assert summary.skipped > 0 and summary.indexed + summary.skipped == n
    assert summary.chunks == expected.count() - written  # only what was missing is encoded
    with open_store(uri) as handle:
        assert handle.store.count() == expected.count()
        ids = [f"doc-{i}#{j}" for i in range(n) for j in range(12)]
        assert [r.id for r in handle.store.get(ids)] == [r.id for r in expected.get(ids)]


def test_eval(runner, tmp_path, m3_checkpoint, beir_dir, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the default store, ./m3connect-eval.edge, lands here
    result = run(runner, "eval", beir_dir, "--model", m3_checkpoint)
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines[2:]] == [
        "dense",
        "sparse",
        "colbert",
        "dense+sparse",
        "all",
    ]
    result = run(
        runner,
        "eval",
        beir_dir,
        "--model",
        m3_checkpoint,
        "--json",
        "--modes",
        "dense,all",
        "--output",
        tmp_path / "r.json",
    )
    report = json.loads(result.stdout)
    assert set(report["metrics"]) == {"dense", "all"}
    assert json.loads((tmp_path / "r.json").read_text()) == report
    for values in report["metrics"].values():
        assert 0 <= values["ndcg@10"] <= 1 and 0 <= values["recall@100"] <= 1
    result = run(
        runner, "eval", beir_dir, "--model", m3_checkpoint, "--modes", "dense,bm25", code=1
    )
    assert "unknown mode" in result.output


@pytest.mark.slow
def test_demo(runner, tmp_path, m3_checkpoint, beir_dir, monkeypatch) -> None:
    monkeypatch.setattr(cli_jobs, "SAMPLE_DIR", beir_dir)
    monkeypatch.chdir(tmp_path)
    result = run(runner, "demo", "--model", m3_checkpoint)
    assert (
        "indexed the sample corpus into qdrant-edge:./m3connect.edge#m3connect_sample"
        in result.output
    )
    assert result.output.count("query: ") == 3
    assert (tmp_path / "m3connect.edge" / "m3connect_sample").is_dir()  # the embedded default
    result = run(runner, "demo", "--model", m3_checkpoint)  # again: nothing to encode
    assert "0 encoded" in result.output


def test_demo_offline_hub_id_prints_the_encoder_message(
    runner, tmp_path, beir_dir, monkeypatch
) -> None:
    monkeypatch.setattr(cli_jobs, "SAMPLE_DIR", beir_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    result = runner.invoke(main, ["demo"])  # BAAI/bge-m3 by default
    assert result.exit_code == 1, result.output
    assert "BAAI/bge-m3" in result.output and "--model" in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


@pytest.mark.slow
def test_bundled_sample_demo_with_random_model(runner, tmp_path, monkeypatch) -> None:
    if not (cli_jobs.SAMPLE_DIR / "corpus.jsonl").is_file():
        pytest.skip("the bundled sample corpus is not there yet")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    result = run(runner, "demo", "--model", "random")
    assert "query: " in result.output
