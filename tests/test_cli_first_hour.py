"""The first hour of a new user (issue 14): what the command line says when something is wrong,
the "random" model everywhere, progress, and what is left behind. Messages and exit codes are
asserted, through click's CliRunner or a real subprocess."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_indexing import MAX_TOKENS, write_corpus

from m3connect import __version__, cli_errors, cli_jobs, testing, uris
from m3connect.cli import main
from m3connect.cli_jobs import display_width, format_hits
from m3connect.encoder import CheckpointError, M3Encoder
from m3connect.indexing import IndexJob, IndexSummary
from m3connect.sources import open_source
from m3connect.store import Hit, SearchParams

REPO = Path(__file__).resolve().parent.parent


def invoke(*args: object, code: int):  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == code, result.output
    return result


def error_line(result) -> str:  # type: ignore[no-untyped-def]
    """The one ``Error:`` line of a failed command (and nothing else on stderr but warnings)."""
    lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING ")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, m3_encoder) -> Path:  # type: ignore[no-untyped-def]
    """A Qdrant local store with a collection "docs" indexed from a small corpus."""
    folder = tmp_path_factory.mktemp("indexed")
    corpus = write_corpus(folder / "corpus.jsonl", 6)
    IndexJob(m3_encoder, [f"qdrant:{folder / 'store'}#docs"], max_tokens=MAX_TOKENS).run(corpus)
    return folder / "store"


# --------------------------------------------------------------------------------------------
# 1. reading commands never create a store
# --------------------------------------------------------------------------------------------


def test_search_refuses_a_store_path_that_does_not_exist(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for uri, path in (("qdrant:./nonexistent", "./nonexistent"), ("milvus:./nope.db", "./nope.db")):
        result = invoke("search", uri, "x", code=1)
        line = error_line(result)
        assert line.startswith(f"Error: no store at {path} ")
        assert "m3connect index" in line  # what to do
        assert not (tmp_path / path).exists()  # nothing created
    line = error_line(invoke("search", "memory:", "x", code=1))
    assert "in-memory store lives only in the process that made it" in line


def test_search_refuses_a_missing_collection_and_lists_the_others(indexed) -> None:
    line = error_line(invoke("search", f"qdrant:{indexed}#typo", "x", code=1))
    assert f"no collection 'typo' at {indexed} (there: docs)" in line
    with uris.open_store(f"qdrant:{indexed}#docs", create=False) as handle:
        names = [c.name for c in handle.client.get_collections().collections]
    assert names == ["docs"]  # the typo created nothing


def test_open_store_for_reading_creates_nothing(tmp_path) -> None:
    with pytest.raises(uris.StoreNotFoundError, match="no store at"):
        uris.open_store(f"qdrant:{tmp_path / 'absent'}", create=False)
    assert not (tmp_path / "absent").exists()
    with uris.open_store(f"qdrant:{tmp_path / 'made'}#a") as handle:  # writers still create
        assert handle.store.count() == 0
    with pytest.raises(uris.StoreNotFoundError, match="no collection 'a'"):
        # the folder exists now, but a collection is created only when something is written
        uris.open_store(f"qdrant:{tmp_path / 'made'}#a", create=False)


def test_verbose_shows_the_traceback(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    quiet = invoke("search", "qdrant:./nonexistent", "x", code=1)
    assert "Traceback" not in quiet.output
    verbose = invoke("-v", "search", "qdrant:./nonexistent", "x", code=1)
    assert "Traceback (most recent call last)" in verbose.stderr
    assert "StoreNotFoundError" in verbose.stderr
    assert verbose.stderr.rstrip().splitlines()[-1].startswith("Error: no store at ./nonexistent")


# --------------------------------------------------------------------------------------------
# 1b. the embedded default store: `search QUERY` reads where `index` writes; eval has its own
# --------------------------------------------------------------------------------------------

_DEFAULT_DOCS = {
    "comet": "Halley's comet returns to the inner solar system every 75 years.",
    "hangul": "Hangul is the alphabet of the Korean language, made in the 15th century.",
    "kimchi": "Kimchi is fermented cabbage with chili, garlic and fish sauce.",
    "volcano": "A volcano is an opening in the crust where molten rock reaches the surface.",
}


def test_search_without_uri_reads_the_default_store_index_writes(
    tmp_path, monkeypatch, m3_checkpoint
) -> None:
    monkeypatch.chdir(tmp_path)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text(
        "".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in _DEFAULT_DOCS.items())
    )
    # Another collection of the default place (the demo's, say) is not the default store, and
    # a search of the default store opens nothing there.
    invoke(
        "index",
        corpus,
        "--store",
        "qdrant-edge:./m3connect.edge#other",
        "--model",
        m3_checkpoint,
        "-q",
        code=0,
    )
    line = error_line(invoke("search", "comet", code=1))
    assert line.startswith("Error: nothing is indexed at ./m3connect.edge (the default store")
    assert not (tmp_path / "m3connect.edge" / "m3connect").exists()

    invoke("index", corpus, "--model", m3_checkpoint, "-q", code=0)  # no --store: the default
    assert (tmp_path / "m3connect.edge" / "m3connect").is_dir()
    for doc_id, text in _DEFAULT_DOCS.items():
        # The query is the document's text: its dense score is 1, the top hit.
        hits = json.loads(
            invoke("search", text, "--mode", "dense", "-k", "2", "--json", code=0).stdout
        )
        assert hits[0]["id"] == f"{doc_id}#0" and hits[0]["text"] == text
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    # The same store named explicitly: the same answer (URI QUERY works as before).
    args = ("hangul alphabet", "--rerank", "all", "--json")
    default = json.loads(invoke("search", *args, code=0).stdout)
    named = json.loads(invoke("search", uris.DEFAULT_STORE_URI, *args, code=0).stdout)
    assert default == named and len(default) == len(_DEFAULT_DOCS)


def test_search_without_uri_and_nothing_indexed_is_one_line_and_creates_nothing(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    line = error_line(invoke("search", "where is the comet?", code=1))
    assert line == (
        f"Error: nothing is indexed at ./m3connect.edge (the default store, "
        f"{uris.DEFAULT_STORE_URI}#m3connect): index your documents first with `m3connect index "
        f"SOURCE` (it writes there by default), or name a store: `m3connect search URI QUERY`"
    )
    assert list(tmp_path.iterdir()) == []  # no folder, no lock file
    # The help names the default store.
    assert uris.DEFAULT_STORE_URI in " ".join(invoke("search", "--help", code=0).output.split())


def test_search_arguments_are_uri_query_or_query(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke("search", code=2)
    assert "Missing argument '[URI] QUERY'" in result.output
    result = invoke("search", "qdrant:./a", "two", "words", code=2)
    assert "got 3 arguments: give QUERY, or URI QUERY" in result.output
    # A store URI alone: the query was forgotten (not a search for the text "milvus:./m3.db").
    result = invoke("search", "milvus:./m3.db", code=2)
    assert "'milvus:./m3.db' is a store URI and there is no QUERY" in result.output
    # One word that is not a store URI is a query (of the default store, not there here).
    line = error_line(invoke("search", "https://example.com", code=1))
    assert line.startswith("Error: nothing is indexed at ./m3connect.edge")
    assert list(tmp_path.iterdir()) == []


def test_eval_store_default_is_named_after_the_dataset() -> None:
    assert cli_jobs.eval_store_default(Path("data/scifact")) == (
        "qdrant-edge:./m3connect-eval.edge#scifact"
    )
    name = cli_jobs.eval_store_default(Path("/x/.my BEIR set (v2)"))
    assert name == "qdrant-edge:./m3connect-eval.edge#my_BEIR_set_v2"
    assert uris.parse_store_uri(name).collection == "my_BEIR_set_v2"
    assert cli_jobs.eval_store_default(Path("/x/???")).endswith("#eval")


def test_eval_indexes_into_its_own_default_store_and_resumes(
    tmp_path, monkeypatch, m3_encoder
) -> None:
    from test_evaluation import make_beir
    from test_indexing import CountingEncoder

    beir = make_beir(tmp_path / "sci fact")
    monkeypatch.chdir(tmp_path)
    counting = CountingEncoder(m3_encoder)
    monkeypatch.setattr(cli_jobs, "load_encoder", lambda *a, **k: counting)
    first = invoke("eval", beir, "--modes", "dense,all", "--json", code=0)
    report = json.loads(first.stdout)
    assert report["store"] == "qdrant-edge:./m3connect-eval.edge#sci_fact"
    assert "kept in qdrant-edge:./m3connect-eval.edge#sci_fact" in first.stderr
    shard = tmp_path / "m3connect-eval.edge" / "sci_fact"
    assert (shard / "edge_config.json").is_file()
    assert not (tmp_path / "m3connect.edge").exists()  # never the user's index store
    encoded = counting.encoded
    assert encoded >= report["chunks"] > 0

    second = json.loads(invoke("eval", beir, "--modes", "dense,all", "--json", code=0).stdout)
    assert counting.encoded == encoded  # resumed: no passage encoded again
    assert second["metrics"] == {
        m: {**v, "queries_per_s": second["metrics"][m]["queries_per_s"]}
        for m, v in report["metrics"].items()
    }
    assert (second["docs"], second["chunks"]) == (report["docs"], report["chunks"])
    # memory: stays available and leaves nothing on disk.
    before = sorted(p.name for p in tmp_path.iterdir())
    memory = json.loads(
        invoke("eval", beir, "--modes", "dense", "--store", "memory:", "--json", code=0).stdout
    )
    assert memory["metrics"]["dense"]["ndcg@10"] == pytest.approx(
        report["metrics"]["dense"]["ndcg@10"], abs=1e-6
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# --------------------------------------------------------------------------------------------
# 2. one Error: line for a store in use, a server not there, credentials refused, a model mismatch
# --------------------------------------------------------------------------------------------


def _hold(code: str) -> subprocess.Popen[str]:
    """A second process that opens a store, says "ready" and waits for its stdin to close."""
    process = subprocess.Popen(
        [sys.executable, "-c", code + "\nprint('ready', flush=True)\nimport sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def _release(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.close()
    process.wait(timeout=60)


@pytest.mark.slow
def test_a_store_in_use_by_another_process(indexed, tmp_path, m3_checkpoint) -> None:
    holder = _hold(
        f"from qdrant_client import QdrantClient; c = QdrantClient(path={str(indexed)!r})"
    )
    try:
        line = error_line(invoke("search", f"qdrant:{indexed}#docs", "fox", code=1))
        assert line == (
            f"Error: qdrant:{indexed}#docs is in use by another process: an embedded store "
            f"opens in one process at a time. Wait for that process to finish (or stop it), or "
            f"use a server for concurrent access (qdrant+http://..., milvus+http://...)."
        )
        corpus = write_corpus(tmp_path / "more.jsonl", 2)
        result = invoke(
            "index", corpus, "--store", f"qdrant:{indexed}#docs", "--model", m3_checkpoint,
            "--max-tokens", MAX_TOKENS, code=1,
        )  # fmt: skip
        assert error_line(result).startswith(
            f"Error: the job stopped: qdrant:{indexed}#docs is in use by another process"
        )
    finally:
        _release(holder)


@pytest.mark.slow
def test_a_milvus_lite_file_in_use_by_another_process(tmp_path, m3_checkpoint) -> None:
    path = tmp_path / "m3.db"
    holder = _hold(f"from pymilvus import MilvusClient; c = MilvusClient({str(path)!r})")
    try:
        corpus = write_corpus(tmp_path / "c.jsonl", 2)
        result = invoke(
            "index", corpus, "--store", f"milvus:{path}", "--model", m3_checkpoint, code=1
        )
        assert error_line(result).startswith(
            f"Error: the job stopped: milvus:{path}#m3connect is in use by another process"
        )
    finally:
        _release(holder)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_server(tmp_path) -> None:
    uri = f"qdrant+http://127.0.0.1:{_free_port()}/docs"
    line = error_line(invoke("search", uri, "x", code=1))
    assert line.startswith(f"Error: cannot reach the server of {uri} (")
    assert "Connection refused" in line
    assert line.endswith("is it running, and are the host and port right?")


class _Refuse(BaseHTTPRequestHandler):
    """A server that answers every request 401, as Qdrant and Elasticsearch do for a bad key."""

    def _answer(self) -> None:
        body = b'{"status": {"error": "Must provide an API key or an Authorization bearer token"}}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Elastic-Product", "Elasticsearch")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _answer  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def refusing_server():  # type: ignore[no-untyped-def]
    server = HTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_refused_credentials(refusing_server, monkeypatch) -> None:
    monkeypatch.setenv("QDRANT_API_KEY", "wrong")
    line = error_line(invoke("search", f"qdrant+http://{refusing_server}/docs", "x", code=1))
    assert line.startswith(
        f"Error: qdrant+http://{refusing_server}/docs refused the credentials (HTTP 401): set "
        f"QDRANT_API_KEY in the environment"
    )
    assert "wrong" not in line  # never the credential itself
    monkeypatch.setenv("ES_API_KEY", "wrong")
    line = error_line(invoke("search", f"es+http://{refusing_server}/docs", "x", code=1))
    assert "refused the credentials (HTTP 401): set ES_API_KEY / ES_USERNAME / ES_PASSWORD" in line


def test_milvus_failures_are_recognised() -> None:
    from pymilvus.exceptions import ConnectionConfigException, MilvusException

    store = "milvus+http://db:19530/docs"
    refused = MilvusException(code=1800, message="user hasn't authenticated")
    assert "refused the credentials: set MILVUS_TOKEN" in cli_errors.explain(refused, [store])
    down = MilvusException(
        code=2, message="Fail connecting to server on db:19530, server unavailable"
    )
    assert cli_errors.explain(down, [store]).startswith(f"cannot reach the server of {store}")
    locked = ConnectionConfigException(message="Open local milvus failed")
    assert "is in use by another process" in cli_errors.explain(locked, ["milvus:./m3.db"])
    assert cli_errors.explain(ValueError("something else"), [store]) is None


def test_another_model_is_one_line_naming_the_model(indexed, tmp_path) -> None:
    other = testing.build_random_checkpoint(tmp_path / "other", seed=1)
    line = error_line(invoke("search", f"qdrant:{indexed}#docs", "fox", "--model", other, code=1))
    assert line.startswith(f"Error: qdrant:{indexed}#docs was indexed with another model (")
    assert "pass the model the store was indexed with, --model " in line


def test_index_refuses_an_in_memory_store(tmp_path) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", 2)
    result = invoke("index", corpus, "--store", "memory:", "--model", "random", code=2)
    assert "memory: keeps nothing once the command ends" in result.stderr


def test_version() -> None:
    assert invoke("--version", code=0).stdout == f"m3connect, version {__version__}\n"


# --------------------------------------------------------------------------------------------
# 3. "random" everywhere, and named where a new user looks
# --------------------------------------------------------------------------------------------


def test_random_model_name_everywhere(tmp_path, monkeypatch, m3_checkpoint) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    encoder = M3Encoder.from_pretrained("random", device="cpu")
    folder = tmp_path / "cache" / "m3connect" / "random-bge-m3"
    assert (folder / "sparse_linear.pt").is_file()
    assert os.listdir(folder.parent) == ["random-bge-m3"]  # no partial folder left
    # The same bytes as the default random checkpoint: the fingerprints match.
    reference = M3Encoder.from_pretrained(m3_checkpoint, device="cpu").fingerprint
    assert encoder.fingerprint.heads_sha256 == reference.heads_sha256
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    M3Encoder.from_pretrained("random", device="cpu")  # built once
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert cli_jobs.RANDOM_MODEL == testing.RANDOM_MODEL == "random"


def test_help_and_offline_error_name_the_random_checkpoint(tmp_path, monkeypatch) -> None:
    text = invoke("--help", code=0).stdout
    assert "random" in text and "m3connect testing-checkpoint DIR" in text
    index_help = " ".join(invoke("index", "--help", code=0).stdout.split()).replace("- ", "-")
    assert "'random' (a small random checkpoint" in index_help
    assert "testing-checkpoint DIR" in index_help
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as info:
        M3Encoder.from_pretrained("BAAI/bge-m3")
    assert "model name 'random'" in str(info.value)
    assert "m3connect testing-checkpoint DIR" in str(info.value)


def test_demo_offline_error_says_make_demo(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    line = error_line(invoke("demo", code=1))
    assert "`make demo MODEL=./bge-m3`" in line and "`make demo MODEL=random`" in line


# --------------------------------------------------------------------------------------------
# 4, 6, 9. progress, ids, output details
# --------------------------------------------------------------------------------------------


def test_progress_bar_on_request_reaches_its_end_with_a_skipped_record(
    tmp_path, m3_checkpoint
) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", 10, bad_lines={4: "{broken"})
    base = ["index", corpus, "--model", m3_checkpoint, "--max-tokens", MAX_TOKENS]
    result = invoke(*base, "--store", f"qdrant:{tmp_path / 'a'}", "--progress", code=0)
    bar = result.stderr.replace("\r", "\n").splitlines()
    final = [line for line in bar if line.startswith("indexing")][-1]
    assert "100%" in final and "10/10" in final and "chunks/s" in final
    # Off a terminal (CliRunner is not one) there is no bar; --quiet drops the summary too.
    result = invoke(*base, "--store", f"qdrant:{tmp_path / 'b'}", code=0)
    assert "indexing" not in result.stderr and "done: 9 documents" in result.stderr
    result = invoke(*base, "--store", f"qdrant:{tmp_path / 'c'}", "--quiet", "--json", code=0)
    assert json.loads(result.stdout)["docs"] == 9
    assert [line for line in result.stderr.splitlines() if not line.startswith("WARNING")] == []


def test_index_numbers_records_without_id_by_line(tmp_path, m3_checkpoint, caplog) -> None:
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(
        '{"id": "a", "text": "first"}\n{"text": "second, no id"}\n{"text": "third"}\n'
    )
    uri = f"qdrant:{tmp_path / 's'}"
    result = invoke("index", corpus, "--store", uri, "--model", m3_checkpoint, "--json", code=0)
    summary = json.loads(result.stdout)
    assert (summary["docs"], summary["errors"]) == (3, 0)
    with uris.open_store(uri) as handle:
        assert [r.id for r in handle.store.get(["a#0", "2#0", "3#0"])] == ["a#0", "2#0", "3#0"]
    (warning,) = [r.getMessage() for r in caplog.records if "no id field" in r.getMessage()]
    assert "line 2 has no id field '_id' or 'id'" in warning and "--id-field" in warning


def test_summary_wording_and_where_the_time_went() -> None:
    summary = IndexSummary(
        stores=["x"], docs=1, indexed=1, chunks=1, tokens=1, seconds=6.0, open_seconds=4.0,
        encode_seconds=1.0,
    )  # fmt: skip
    text = summary.format()
    assert "done: 1 document in 6.0 s" in text
    assert "indexed  1 document (0 changed since stored): 1 chunk, 1 token encoded" in text
    assert "errors   0 bad records skipped" in text
    assert "open 4.0 s, encode 1.0 s, write 0.0 s, lookup 0.0 s, read+chunk 1.0 s" in text
    assert summary.to_dict()["open_seconds"] == 4.0


def test_a_job_counts_opening_the_stores_apart(tmp_path, m3_encoder) -> None:
    corpus = write_corpus(tmp_path / "c.jsonl", 3)
    summary = IndexJob(m3_encoder, [f"qdrant:{tmp_path / 's'}"], max_tokens=MAX_TOKENS).run(corpus)
    assert 0 < summary.open_seconds < summary.seconds


def test_search_table_names_its_scores_and_aligns_wide_characters() -> None:
    hits = [
        Hit("문서-1", 0.0325, {"dense": 0.91, "sparse": 0.12}, "서울은 대한민국의 수도이며 약 천만 명"),
        Hit("doc-2", 0.0161, {"dense": 0.5, "sparse": 0.0}, "Paris is the capital of France"),
        Hit("北京-3", 0.0159, {"dense": 0.4, "sparse": 0.3}, "北京是中国的首都，上海是中国最大的城市之一。"),
    ]  # fmt: skip
    table = format_hits(hits, SearchParams(mode="hybrid"), width=20).splitlines()
    assert table[0].split()[:6] == ["#", "id", "rrf", "|", "dense", "sparse"]
    assert table[-1].startswith("rrf: reciprocal rank fusion of dense+sparse (sum of 1/(60 + rank)")
    assert "dense, sparse: each representation's exact score" in table[-1]
    rows = table[2:-1]
    # Every column starts at the same display column, CJK or not.
    bars = {display_width(row[: row.index("|")]) for row in [table[0], *rows]}
    assert len(bars) == 1
    assert all(display_width(row[row.index("|") :]) <= display_width(table[0]) + 20 for row in rows)
    all_table = format_hits(hits, SearchParams(mode="hybrid", rerank="all"))
    assert all_table.splitlines()[0].split()[2] == "all"
    assert "the weighted sum of the exact scores" in all_table
    assert format_hits(hits, SearchParams(mode="dense")).splitlines()[0].split()[2] == "dense"
    assert display_width("서울") == 4 and display_width("abc") == 3


def test_folder_source_says_once_per_extension_what_it_skips(tmp_path, caplog) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("a.txt", "b.rst", "c.rst", "README", "d.md", ".hidden"):
        (folder / name).write_text("some text")
    source = open_source(folder)
    with caplog.at_level(logging.WARNING, logger="m3connect.sources"):
        assert source.estimate_total() == 2
        assert [r.id for r in source] == ["a.txt", "d.md"]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skipped) == 2, skipped
    assert skipped[0].startswith("skipping files without an extension") or skipped[1].startswith(
        "skipping files without an extension"
    )
    (rst,) = [m for m in skipped if m.startswith("skipping .rst files")]
    assert "(e.g. b.rst)" in rst and "reads .txt, .md, .markdown files only" in rst


def test_eval_progress(tmp_path, m3_checkpoint, monkeypatch) -> None:
    from test_evaluation import make_beir

    beir = make_beir(tmp_path / "beir")
    monkeypatch.chdir(tmp_path)  # the default store, ./m3connect-eval.edge, lands here
    result = invoke(
        "eval", beir, "--model", m3_checkpoint, "--modes", "dense", "--progress", code=0
    )
    assert "indexing" in result.stderr and "searching" in result.stderr
    quiet = invoke("eval", beir, "--model", m3_checkpoint, "--modes", "dense", code=0)
    assert "searching" not in quiet.stderr


# --------------------------------------------------------------------------------------------
# 7, 10. make demo installs once; nothing is left behind
# --------------------------------------------------------------------------------------------


def test_make_demo_installs_once(tmp_path) -> None:
    if subprocess.run(["make", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no make")
    command = ["make", "-n", "--no-print-directory", "demo", f"STAMPS={tmp_path}", "MODEL=random"]
    # Under `make test` the outer make's settings reach this one through the environment.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    first = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, check=True, env=env
    ).stdout
    assert "pip install" in first
    (tmp_path / "install").touch()  # what the first run leaves (newer than pyproject.toml)
    again = subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, check=True, env=env
    ).stdout
    assert "pip install" not in again
    assert again.strip().endswith('-m m3connect demo --model "random"')


def test_handles_left_open_are_closed_at_exit(tmp_path) -> None:
    handle = uris.open_store(f"qdrant:{tmp_path / 's'}")
    uris._close_open_handles()  # what atexit runs
    assert handle.closed
    from qdrant_client import QdrantClient

    QdrantClient(path=str(tmp_path / "s")).close()  # the folder's lock was released


@pytest.mark.slow
def test_a_store_left_open_exits_without_a_word(tmp_path) -> None:
    code = (
        "from m3connect.uris import open_store\n"
        f"h = open_store('qdrant:{tmp_path / 's2'}')\n"
        "h.store.count()\n"  # and never closed
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path)
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "TMPDIR": str(tmp_path),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "M3_MODEL": "random",
    }


@pytest.mark.slow
@pytest.mark.parametrize("example", ["qdrant_hybrid.py", "milvus_colbert.py"])
def test_examples_run_on_random_and_leave_nothing_behind(tmp_path, example) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / example)],
        capture_output=True,
        text=True,
        env={**_env(tmp_path), "TMPDIR": str(temp)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "Exception ignored" not in result.stderr and "meta_path" not in result.stderr
    assert not [p.name for p in temp.iterdir() if p.name.startswith("m3connect-")]
