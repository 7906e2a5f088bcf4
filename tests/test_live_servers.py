"""Live tests against real servers (``make test-live`` starts them with docker-compose.yml):
``QDRANT_URL``, ``MILVUS_URI``, ``ES_URL``. Each test is skipped when its variable is not set.

The Milvus and Elasticsearch adapters have their own live contract tests in their modules; here
are the Qdrant server's, and the command line end to end (index, then search) on each server.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from click.testing import CliRunner
from store_contract import FINGERPRINT, assert_answers_like_the_reference
from test_indexing import MAX_TOKENS, write_corpus

from m3connect.cli import main
from m3connect.indexing import drop_collection
from m3connect.store import SearchParams

pytestmark = pytest.mark.live

QDRANT_URL = os.environ.get("QDRANT_URL")
MILVUS_URI = os.environ.get("MILVUS_URI")
ES_URL = os.environ.get("ES_URL")


@pytest.mark.skipif(not QDRANT_URL, reason="set QDRANT_URL to test against a Qdrant server")
def test_qdrant_server_answers_like_the_reference() -> None:
    from qdrant_client import QdrantClient

    from m3connect.stores.qdrant import QdrantStore

    client = QdrantClient(url=QDRANT_URL, api_key=os.environ.get("QDRANT_API_KEY") or None)
    name = f"m3connect_live_{uuid.uuid4().hex[:8]}"
    try:
        store = QdrantStore(client, name, fingerprint=FINGERPRINT)
        assert_answers_like_the_reference(
            store,
            [
                SearchParams(mode="dense", k=5),
                SearchParams(mode="sparse", k=5),
                SearchParams(mode="colbert", k=5),
                SearchParams(mode="hybrid", k=5),  # RrfQuery(k): Qdrant >= 1.16
                SearchParams(mode="hybrid", k=5, rrf_k=12.5),  # weighted RRF: >= 1.17
                SearchParams(mode="hybrid", fusion="weighted", k=5),  # FormulaQuery: >= 1.14
                SearchParams(mode="hybrid", rerank="all", k=5, filter={"lang": "ko"}),
            ],
        )
    finally:
        if client.collection_exists(name):
            client.delete_collection(name)
        client.close()


def _server_uris() -> list[str]:
    name = f"m3connect_live_cli_{uuid.uuid4().hex[:8]}"
    uris = []
    if QDRANT_URL:
        uris.append(f"qdrant+{QDRANT_URL.rstrip('/')}/{name}")
    if MILVUS_URI:
        uris.append(f"milvus+{MILVUS_URI.rstrip('/')}/{name}")
    if ES_URL and "@" not in ES_URL:
        uris.append(f"es+{ES_URL.rstrip('/')}/{name.replace('_', '-')}")
    return uris


@pytest.mark.skipif(not _server_uris(), reason="set QDRANT_URL, MILVUS_URI or ES_URL")
def test_command_line_index_then_search_on_servers(tmp_path, m3_checkpoint) -> None:
    uris = _server_uris()
    corpus = write_corpus(tmp_path / "c.jsonl", 12)
    runner = CliRunner()
    stores = [arg for uri in uris for arg in ("--store", uri)]
    try:
        result = runner.invoke(
            main,
            ["index", str(corpus), *stores, "--model", str(m3_checkpoint), "--max-tokens",
             str(MAX_TOKENS), "--json"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["docs"] == 12
        rankings = []
        for uri in uris:
            result = runner.invoke(main, ["search", uri, "capital of France", "--json"])
            assert result.exit_code == 0, result.output
            rankings.append([hit["id"] for hit in json.loads(result.stdout)])
        assert all(r == rankings[0] for r in rankings), dict(zip(uris, rankings))
        # A typo in the collection is an error, and creates nothing.
        typo = uris[0] + "-typo"
        result = runner.invoke(main, ["search", typo, "x"])
        assert result.exit_code == 1 and "no collection" in result.stderr
    finally:
        for uri in uris:
            drop_collection(uri)
