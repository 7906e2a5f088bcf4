"""The fingerprint covers the body weights (issue 15): a checkpoint with another body but the
same heads (what a dense-only fine-tune produces) is refused by every store."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from m3connect import fingerprint as fp_module
from m3connect.encoder import M3Encoder
from m3connect.fingerprint import FingerprintMismatchError, ModelFingerprint, weights_sha256
from m3connect.stores.memory import InMemoryStore
from m3connect.uris import drop_memory_store, open_store


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _perturb_body(folder: Path, name: str | None = None, scale: float = 1.01) -> str:
    """Rewrite ``model.safetensors`` with one tensor changed (the heads stay as they are)."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    name = name or sorted(k for k in tensors if k.endswith("weight") and "encoder.layer.1" in k)[0]
    tensors[name] = tensors[name] * scale
    save_file(tensors, str(path), metadata={"format": "pt"})
    return name


@pytest.fixture(scope="module")
def other_body(m3_checkpoint: Path, tmp_path_factory) -> Path:
    folder = _copy(m3_checkpoint, tmp_path_factory.mktemp("other-body") / "ckpt")
    _perturb_body(folder)
    return folder


@pytest.fixture(scope="module")
def other_encoder(other_body: Path) -> M3Encoder:
    return M3Encoder.from_pretrained(other_body, device="cpu")


def test_body_hash_tells_bodies_apart_and_not_copies(
    m3_checkpoint: Path, m3_encoder: M3Encoder, other_encoder: M3Encoder, tmp_path: Path
) -> None:
    mine, other = m3_encoder.fingerprint, other_encoder.fingerprint
    assert len(mine.body_sha256) == 64
    assert other.heads_sha256 == mine.heads_sha256  # the heads are the same files
    assert other.body_sha256 != mine.body_sha256
    copy = _copy(m3_checkpoint, tmp_path / "copy")
    assert weights_sha256([copy / "model.safetensors"]) == mine.body_sha256
    # Compute dtype does not change it (the files are hashed, not the loaded tensors).
    half = M3Encoder.from_pretrained(m3_checkpoint, dtype="bfloat16", device="cpu")
    assert half.fingerprint.body_sha256 == mine.body_sha256
    with pytest.raises(FingerprintMismatchError, match="body_sha256"):
        other.check_compatible(mine, "the collection")


@pytest.mark.parametrize("window", [0, 3, fp_module.SAMPLES_PER_TENSOR - 1])
def test_one_changed_element_in_a_sampled_window_is_seen(tmp_path: Path, window: int) -> None:
    """A large tensor is sampled in evenly spaced windows (first and last included); a
    fine-tune changes every element, so any window sees it. Here one element changes, inside
    window ``window`` only."""
    n = 300_000  # 1.2 MB of float32: sampled, not read whole
    big = torch.arange(n, dtype=torch.float32)
    save_file({"w": big, "b": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    before = weights_sha256([tmp_path / "model.safetensors"])
    size, sample = 4 * n, fp_module.SAMPLE_BYTES
    start = int(window * (size - sample) / (fp_module.SAMPLES_PER_TENSOR - 1))
    changed = big.clone()
    changed[(start + sample // 2) // 4] += 1.0
    save_file({"w": changed, "b": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    assert weights_sha256([tmp_path / "model.safetensors"]) != before


def test_the_hash_is_cached_per_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(4)}, str(path))
    calls: list[Path] = []
    real = fp_module._safetensors_sample_sha256
    monkeypatch.setattr(
        fp_module, "_safetensors_sample_sha256", lambda p: calls.append(p) or real(p)
    )
    first = weights_sha256([path])
    assert weights_sha256([path]) == first and len(calls) == 1
    # A rewritten file (new size or modification time) is hashed again.
    save_file({"w": torch.zeros(4)}, str(path))
    os.utime(path, ns=(1, 1))
    assert weights_sha256([path]) != first and len(calls) == 2


def test_sharded_and_bin_checkpoints_are_hashed(tmp_path: Path) -> None:
    from m3connect.encoder import _body_files

    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.ones(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps(
            {
                "weight_map": {
                    "a": "model-00001-of-00002.safetensors",
                    "b": "model-00002-of-00002.safetensors",
                }
            }
        )
    )
    files = _body_files(tmp_path)
    assert [f.name for f in files] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    sharded = weights_sha256(files)
    save_file({"b": torch.zeros(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    assert weights_sha256(files) != sharded
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save({"a": torch.ones(2)}, legacy / "pytorch_model.bin")
    assert len(weights_sha256(_body_files(legacy))) == 64


def test_a_fingerprint_stored_before_the_body_hash_stays_readable(
    m3_encoder: M3Encoder, caplog: pytest.LogCaptureFixture
) -> None:
    """Decision: a stored fingerprint without ``body_sha256`` (an older collection) is read as
    "body unknown" and matched on the rest, with a warning; never silently upgraded."""
    new = m3_encoder.fingerprint
    old_json = json.dumps({k: v for k, v in new.to_dict().items() if k != "body_sha256"})
    stored = ModelFingerprint.from_json(old_json)
    assert stored.body_sha256 == ""
    caplog.set_level(logging.WARNING)
    new.check_compatible(stored, "collection 'old'")
    assert "no hash of the model body" in caplog.text
    # Other heads are still refused.
    other_heads = ModelFingerprint.from_dict({**stored.to_dict(), "heads_sha256": "0" * 64})
    with pytest.raises(FingerprintMismatchError):
        new.check_compatible(other_heads, "collection 'old'")


# --- every store refuses the other body -----------------------------------------------------------


def _fill_and_reopen(open_with, m3_encoder: M3Encoder, other_encoder: M3Encoder) -> None:
    store = open_with(m3_encoder)
    store.add_texts(["a first passage", "a second passage"], ids=["a", "b"])
    with pytest.raises(FingerprintMismatchError, match="body_sha256"):
        reopened = open_with(other_encoder)
        reopened.add_texts(["mixed in"], ids=["c"])  # stores that attach on first use
    again = open_with(m3_encoder)
    assert [r.id for r in again.get(["a", "b", "c"])] == ["a", "b"]


def test_memory_store_refuses_another_body(m3_encoder, other_encoder) -> None:
    name = "body-check"
    try:

        def open_with(encoder):
            return open_store(
                f"memory:#{name}", fingerprint=encoder.fingerprint, encoder=encoder
            ).store

        _fill_and_reopen(open_with, m3_encoder, other_encoder)
        with pytest.raises(FingerprintMismatchError):
            InMemoryStore(other_encoder, fingerprint=m3_encoder.fingerprint)
    finally:
        drop_memory_store(name)


def test_qdrant_local_refuses_another_body(m3_encoder, other_encoder) -> None:
    qdrant_client = pytest.importorskip("qdrant_client")
    from m3connect.stores.qdrant import QdrantStore

    client = qdrant_client.QdrantClient(":memory:")
    try:
        _fill_and_reopen(lambda e: QdrantStore(client, "body", e), m3_encoder, other_encoder)
    finally:
        client.close()


def test_qdrant_edge_refuses_another_body(m3_encoder, other_encoder, tmp_path) -> None:
    pytest.importorskip("qdrant_edge")
    from m3connect.stores.qdrant import QdrantEdgeStore

    opened: list = []

    def open_with(encoder):
        for store in opened:
            store.close()
        opened.clear()
        opened.append(QdrantEdgeStore(tmp_path / "edge", encoder=encoder))
        return opened[-1]

    try:
        _fill_and_reopen(open_with, m3_encoder, other_encoder)
    finally:
        for store in opened:
            store.close()


def test_milvus_lite_refuses_another_body(m3_encoder, other_encoder, tmp_path) -> None:
    pymilvus = pytest.importorskip("pymilvus")
    from m3connect.stores.milvus import MilvusStore

    client = pymilvus.MilvusClient(str(tmp_path / "body.db"))
    try:
        _fill_and_reopen(lambda e: MilvusStore(client, "body", e), m3_encoder, other_encoder)
    finally:
        client.close()


def test_elasticsearch_refuses_another_body(m3_encoder, other_encoder) -> None:
    pytest.importorskip("elasticsearch")
    from es_fake import FakeElasticsearch

    from m3connect.stores.elasticsearch import ElasticsearchStore

    client = FakeElasticsearch().client()
    _fill_and_reopen(lambda e: ElasticsearchStore(client, "body", e), m3_encoder, other_encoder)
