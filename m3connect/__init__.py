"""m3connect: BGE-M3's dense, sparse and ColBERT representations from one forward pass, in the
databases you already run.

The core imports no database client; the names below load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "M3Encoder": "m3connect.encoder",
    "CheckpointError": "m3connect.encoder",
    "M3Output": "m3connect.types",
    "M3Embedding": "m3connect.types",
    "ModelFingerprint": "m3connect.fingerprint",
    "FingerprintMismatchError": "m3connect.fingerprint",
    "Field": "m3connect.filters",
    "RawFilter": "m3connect.filters",
    "SearchParams": "m3connect.store",
    "Hit": "m3connect.store",
    "Record": "m3connect.store",
    "M3Store": "m3connect.store",
    "AsyncM3Store": "m3connect.store",
    "StoreError": "m3connect.store",
    "InMemoryStore": "m3connect.stores.memory",
}

__all__ = [
    "AsyncM3Store",
    "CheckpointError",
    "Field",
    "FingerprintMismatchError",
    "Hit",
    "InMemoryStore",
    "M3Embedding",
    "M3Encoder",
    "M3Output",
    "M3Store",
    "ModelFingerprint",
    "RawFilter",
    "Record",
    "SearchParams",
    "StoreError",
]

if TYPE_CHECKING:
    from m3connect.encoder import CheckpointError, M3Encoder
    from m3connect.filters import Field, RawFilter
    from m3connect.fingerprint import FingerprintMismatchError, ModelFingerprint
    from m3connect.store import AsyncM3Store, Hit, M3Store, Record, SearchParams, StoreError
    from m3connect.stores.memory import InMemoryStore
    from m3connect.types import M3Embedding, M3Output


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'm3connect' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
