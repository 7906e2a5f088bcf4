"""Which model (and which settings) produced the vectors in a collection.

A store keeps the fingerprint of the vectors it holds, beside the collection or index, and
refuses to mix vectors of two models: a mismatch is a :class:`FingerprintMismatchError`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


class FingerprintMismatchError(ValueError):
    """The collection holds vectors of another model or other settings."""


@dataclass(frozen=True)
class ModelFingerprint:
    """Identity of the vectors: checkpoint, dimensions, a hash of the heads, and any settings
    that change what is stored (``extra``, e.g. chunking settings of an indexing job)."""

    model: str
    dense_dim: int
    colbert_dim: int
    heads_sha256: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

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
        )

    @classmethod
    def from_json(cls, text: str) -> ModelFingerprint:
        return cls.from_dict(json.loads(text))

    def with_extra(self, **extra: Any) -> ModelFingerprint:
        return ModelFingerprint(
            self.model, self.dense_dim, self.colbert_dim, self.heads_sha256, {**self.extra, **extra}
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
        if self.heads_sha256 == "" or stored.heads_sha256 == "":
            # A fingerprint without a heads hash (vectors written by hand) is matched on the rest.
            mine.pop("heads_sha256")
            theirs.pop("heads_sha256")
        if mine != theirs:
            differing = sorted(k for k in mine if mine[k] != theirs.get(k))
            raise FingerprintMismatchError(
                f"{where} holds vectors of another model or other settings "
                f"(differs in {', '.join(differing)}): stored {stored.to_json()}, "
                f"this encoder {self.to_json()}. Use a new collection, or the same model and settings."
            )
