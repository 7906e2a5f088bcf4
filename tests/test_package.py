"""The package as users meet it: what importing it costs, and its command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

DATABASE_CLIENTS = ("qdrant_client", "qdrant_edge", "pymilvus", "elasticsearch", "ray")


@pytest.mark.slow
def test_the_core_imports_no_database_client():
    code = (
        "import sys, json\n"
        "import m3connect, m3connect.store, m3connect.search, m3connect.stores, m3connect.encoder\n"
        "from m3connect import InMemoryStore, SearchParams, M3Encoder\n"
        "import m3connect.cli, m3connect.indexing, m3connect.uris\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    loaded = set(json.loads(subprocess.check_output([sys.executable, "-c", code], text=True)))
    assert loaded.isdisjoint(DATABASE_CLIENTS), loaded & set(DATABASE_CLIENTS)


def test_adapters_load_on_first_use():
    from m3connect import stores

    assert stores.QdrantStore.__module__ == "m3connect.stores.qdrant"
    assert stores.MilvusStore.__module__ == "m3connect.stores.milvus"
    assert stores.ElasticsearchStore.__module__ == "m3connect.stores.elasticsearch"
