"""Session fixtures shared by the whole test suite.

``m3_checkpoint`` is a small random checkpoint with exactly the BAAI/bge-m3 file layout (built
once per session, about a second); ``m3_encoder`` is an :class:`M3Encoder` loaded from it.
Other test modules reuse both names.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from m3connect.encoder import M3Encoder
from m3connect.testing import build_random_checkpoint


@pytest.fixture(scope="session")
def m3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Path of a random BGE-M3-layout checkpoint (hidden 32, 2 layers)."""
    return build_random_checkpoint(tmp_path_factory.mktemp("checkpoint") / "bge-m3-random")


@pytest.fixture(scope="session")
def m3_encoder(m3_checkpoint: Path) -> M3Encoder:
    """An :class:`M3Encoder` on CPU, float32, loaded from :func:`m3_checkpoint`."""
    return M3Encoder.from_pretrained(m3_checkpoint, device="cpu")
