"""Which model (and which settings) produced the vectors in a collection.

A store keeps the fingerprint of the vectors it holds, beside the collection or index, and
refuses to mix vectors of two models: a mismatch is a :class:`FingerprintMismatchError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class FingerprintMismatchError(ValueError):
    """The collection holds vectors of another model or other settings."""


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the vectors: checkpoint, dimensions, a hash of the heads, a hash of the body
    weights (:func:`weights_sha256`), and any settings that change what is stored (``extra``,
    e.g. chunking settings of an indexing job).

    An empty hash means "unknown" and is matched on the rest: vectors written by hand have
    none, and collections written before the body hash existed (m3connect < 0.2) have no
    ``body_sha256``. Such a collection stays readable and writable with the same heads and
    dimensions, but a different body cannot be told from its own (a warning says so)."""

    model: str
    dense_dim: int
    colbert_dim: int
    heads_sha256: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    body_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["extra"] = dict(self.extra)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelFingerprint:
        return cls(
            model=str(data["model"]),
            dense_dim=int(data["dense_dim"]),
            colbert_dim=int(data["colbert_dim"]),
            heads_sha256=str(data.get("heads_sha256", "")),
            extra=dict(data.get("extra") or {}),
            body_sha256=str(data.get("body_sha256", "")),
        )

    @classmethod
    def from_json(cls, text: str) -> ModelFingerprint:
        return cls.from_dict(json.loads(text))

    def with_extra(self, **extra: Any) -> ModelFingerprint:
        return ModelFingerprint(
            self.model,
            self.dense_dim,
            self.colbert_dim,
            self.heads_sha256,
            {**self.extra, **extra},
            self.body_sha256,
        )

    @property
    def digest(self) -> str:
        """A short stable hash of the whole fingerprint."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def check_compatible(self, stored: ModelFingerprint, where: str) -> None:
        """Raise :class:`FingerprintMismatchError` unless ``stored`` describes the same vectors.

        The model name may differ (a hub id and a local copy of it); the dimensions, heads and
        settings may not.
        """
        mine, theirs = self.to_dict(), stored.to_dict()
        mine.pop("model")
        theirs.pop("model")
        for key in ("heads_sha256", "body_sha256"):
            # A fingerprint without a hash (vectors written by hand, or a collection written
            # before that hash existed) is matched on the rest.
            if mine.get(key, "") == "" or theirs.get(key, "") == "":
                mine.pop(key, None)
                theirs.pop(key, None)
        if self.body_sha256 and not stored.body_sha256 and stored.heads_sha256:
            logger.warning(
                "%s has no hash of the model body (written before m3connect hashed it): only "
                "the heads and dimensions are checked; re-index to have the body checked too",
                where,
            )
        if mine != theirs:
            differing = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise FingerprintMismatchError(
                f"{where} holds vectors of another model or other settings "
                f"(differs in {', '.join(differing)}): stored {stored.to_json()}, "
                f"this encoder {self.to_json()}. Use a new collection, or the same model and settings."
            )


# --- the body weights' hash ---------------------------------------------------------------------

#: Bytes hashed per sample window, and windows per tensor (evenly spaced, first and last
#: included): a fine-tune that changes a tensor changes (nearly) all of its elements, so a few
#: windows of every tensor tell two bodies apart while reading megabytes, not gigabytes.
SAMPLE_BYTES = 4096
SAMPLES_PER_TENSOR = 8
_HEADER_MAX = 100 << 20  # a safetensors header larger than this is not one
_CACHE: dict[tuple[str, int, int], str] = {}
_CACHE_LOCK = threading.Lock()


def weights_sha256(files: Iterable[str | os.PathLike[str]]) -> str:
    """A sha256 identifying the weights in ``files`` (a checkpoint's body: ``model.safetensors``,
    its shards, or ``pytorch_model.bin``), cheap to compute and cached per file by path, size
    and modification time.

    For a ``.safetensors`` file: its whole header (every tensor's name, dtype, shape and
    offsets) and :data:`SAMPLES_PER_TENSOR` windows of :data:`SAMPLE_BYTES` bytes of each
    tensor's data (all of a small tensor). Other files are hashed whole. The file names take
    part (shards in order of name); the folder does not, so a copy hashes the same."""
    digest = hashlib.sha256()
    for path in sorted((Path(f) for f in files), key=lambda p: p.name):
        digest.update(f"{path.name}\n".encode())
        digest.update(_file_sha256(path).encode())
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _CACHE_LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    if path.suffix == ".safetensors":
        value = _safetensors_sample_sha256(path)
    else:
        with path.open("rb") as handle:
            value = _read_all_sha256(handle)
    with _CACHE_LOCK:
        _CACHE[key] = value
    return value


def _read_all_sha256(handle: Any) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: handle.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _safetensors_sample_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", head)
        if length > _HEADER_MAX:
            raise ValueError(f"{path} is not a safetensors file (header of {length} bytes)")
        header_bytes = handle.read(length)
        header = json.loads(header_bytes)
        digest.update(header_bytes)
        base = 8 + length
        for name in sorted(k for k in header if k != "__metadata__"):
            start, stop = (int(x) for x in header[name]["data_offsets"])
            size = stop - start
            if size <= SAMPLE_BYTES * SAMPLES_PER_TENSOR:
                windows = [(start, size)]
            else:
                step = (size - SAMPLE_BYTES) / (SAMPLES_PER_TENSOR - 1)
                windows = [(start + int(i * step), SAMPLE_BYTES) for i in range(SAMPLES_PER_TENSOR)]
            for offset, count in windows:
                handle.seek(base + offset)
                digest.update(handle.read(count))
    return digest.hexdigest()
