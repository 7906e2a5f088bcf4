"""Store adapters: one module per database, each importing its client only when used, so the
core stays importable without any of them.

``from m3connect.stores import QdrantStore`` works as well as importing the module itself.
"""

from __future__ import annotations

import importlib
from typing import Any

from m3connect.stores.memory import InMemoryStore

_ADAPTERS = {
    "QdrantStore": "m3connect.stores.qdrant",
    "AsyncQdrantStore": "m3connect.stores.qdrant",
    "QdrantEdgeStore": "m3connect.stores.qdrant",
    "MilvusStore": "m3connect.stores.milvus",
    "AsyncMilvusStore": "m3connect.stores.milvus",
    "ElasticsearchStore": "m3connect.stores.elasticsearch",
    "AsyncElasticsearchStore": "m3connect.stores.elasticsearch",
}

__all__ = ["InMemoryStore", *_ADAPTERS]


def __getattr__(name: str) -> Any:
    module = _ADAPTERS.get(name)
    if module is None:
        raise AttributeError(f"module 'm3connect.stores' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
