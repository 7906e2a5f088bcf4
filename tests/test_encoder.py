"""M3Encoder against an independent computation of the BGE-M3 formulas.

The reference runs the transformers body on each text alone (no padding, no batching), takes
its last hidden states and applies the head weights, read from the head files with torch.load,
in float64 numpy: dense ``normalize(H[0])``, sparse ``max over positions of relu(w.H + b)``
without the ids 0-3, ColBERT ``normalize(W.H[1:] + b)``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from m3connect.batching import DEFAULT_BATCH_TOKENS, plan_batches
from m3connect.encoder import CheckpointError, M3Encoder
from m3connect.testing import build_random_checkpoint
from m3connect.types import M3Embedding, M3Output

ATOL = 1e-5
# The layout's special ids (<s>, <pad>, </s>, <unk>), written down independently of the encoder.
SPECIAL_IDS = {0, 1, 2, 3}


class Reference:
    """BGE-M3 outputs for one text, computed without the encoder's code path."""

    def __init__(self, encoder: M3Encoder, checkpoint: Path) -> None:
        self.encoder = encoder
        colbert = torch.load(checkpoint / "colbert_linear.pt", weights_only=True)
        sparse = torch.load(checkpoint / "sparse_linear.pt", weights_only=True)
        self.colbert_w = colbert["weight"].double().numpy()
        self.colbert_b = colbert["bias"].double().numpy()
        self.sparse_w = sparse["weight"].double().numpy()[0]
        self.sparse_b = float(sparse["bias"].double()[0])

    def ids(self, text: str, max_length: int = 8192) -> list[int]:
        return list(
            self.encoder.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        )

    def hidden(self, ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            out = self.encoder.model(input_ids=torch.tensor([ids]))
        return out.last_hidden_state[0].double().numpy()

    def token_weights(self, text: str, max_length: int = 8192) -> tuple[list[int], np.ndarray]:
        ids = self.ids(text, max_length)
        return ids, np.maximum(self.hidden(ids) @ self.sparse_w + self.sparse_b, 0.0)

    def __call__(self, text: str, max_length: int = 8192) -> M3Embedding:
        ids = self.ids(text, max_length)
        hidden = self.hidden(ids)
        dense = hidden[0] / np.linalg.norm(hidden[0])
        weights = np.maximum(hidden @ self.sparse_w + self.sparse_b, 0.0)
        sparse: dict[int, float] = {}
        for token, weight in zip(ids, weights, strict=True):
            if token in SPECIAL_IDS or weight <= 0:
                continue
            sparse[token] = max(sparse.get(token, 0.0), float(weight))
        colbert = hidden[1:] @ self.colbert_w.T + self.colbert_b
        colbert /= np.linalg.norm(colbert, axis=1, keepdims=True)
        return M3Embedding(dense=dense, sparse=sparse, colbert=colbert)


@pytest.fixture(scope="module")
def reference(m3_encoder: M3Encoder, m3_checkpoint: Path) -> Reference:
    return Reference(m3_encoder, m3_checkpoint)


def assert_sparse_close(
    actual: dict[int, float], expected: dict[int, float], atol: float = ATOL
) -> None:
    assert all(isinstance(k, int) and isinstance(v, float) for k, v in actual.items())
    assert all(v > 0 for v in actual.values())
    for key in set(actual) | set(expected):
        # A key present on one side only must have a weight within tolerance of 0.
        assert abs(actual.get(key, 0.0) - expected.get(key, 0.0)) <= atol, key


def assert_matches(actual: M3Embedding, expected: M3Embedding, atol: float = ATOL) -> None:
    assert actual.dense is not None and actual.dense.dtype == np.float32
    np.testing.assert_allclose(actual.dense, expected.dense, atol=atol, rtol=0)
    assert actual.sparse is not None
    assert_sparse_close(actual.sparse, expected.sparse, atol)
    assert actual.colbert is not None and actual.colbert.shape == expected.colbert.shape
    np.testing.assert_allclose(actual.colbert, expected.colbert, atol=atol, rtol=0)


PLAIN = "Dense retrieval encodes the query and the passage into one vector."
KOREAN_CJK = "서울의 사람들이 관련 문서를 찾습니다. 上海是中国的城市。東京の人々が住んでいます。"
MIXED = [
    "What is the capital of France?",
    "Long documents are split into chunks before they are indexed. " * 12,
    "",
    "서울은 대한민국의 수도입니다.",
    "Reciprocal rank fusion " * 30,
    "a",
    "Die Hauptstadt von Deutschland ist Berlin.",
    "The quick brown fox jumps over the lazy dog. " * 4,
]


def test_plain_text_matches_reference(m3_encoder: M3Encoder, reference: Reference) -> None:
    out = m3_encoder.encode([PLAIN])
    expected = reference(PLAIN)
    assert len(expected.sparse) >= 3  # the comparison covers real lexical weights
    assert_matches(out[0], expected)
    assert out.colbert[0].shape == (len(reference.ids(PLAIN)) - 1, m3_encoder.colbert_dim)
    np.testing.assert_allclose(np.linalg.norm(out.dense[0]), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out.colbert[0], axis=1), 1.0, atol=1e-6)


def test_repeated_tokens_keep_their_max_weight(m3_encoder: M3Encoder, reference: Reference) -> None:
    text = "the dog and the cat and the bird and the fox and the dog"
    ids, weights = reference.token_weights(text)
    by_id: dict[int, list[float]] = {}
    for token, weight in zip(ids, weights, strict=True):
        if token not in SPECIAL_IDS and weight > 0:
            by_id.setdefault(token, []).append(float(weight))
    repeated = {t: ws for t, ws in by_id.items() if len(ws) > 1 and max(ws) - min(ws) > 1e-3}
    assert repeated, "the text must repeat a token with different positive weights"
    out = m3_encoder.encode(text)
    for token, ws in repeated.items():
        assert out.sparse[0][token] == pytest.approx(max(ws), abs=ATOL)
    assert_matches(out[0], reference(text))


def test_korean_and_cjk(m3_encoder: M3Encoder, reference: Reference) -> None:
    ids = reference.ids(KOREAN_CJK)
    assert 3 not in ids  # the vocabulary covers these characters
    expected = reference(KOREAN_CJK)
    assert expected.sparse
    assert_matches(m3_encoder.encode([KOREAN_CJK])[0], expected)


def test_emoji_and_unknown_symbols_drop_unk(m3_encoder: M3Encoder, reference: Reference) -> None:
    text = "search 😀 engine ☃ 🚀🚀 index"
    ids, weights = reference.token_weights(text)
    unk = m3_encoder.tokenizer.unk_token_id
    assert unk == 3 and ids.count(unk) >= 3
    out = m3_encoder.encode(text)
    assert unk not in out.sparse[0]
    # <unk> positions still produce ColBERT rows: only CLS and padding are left out.
    assert out.colbert[0].shape[0] == len(ids) - 1
    assert_matches(out[0], reference(text))


def test_empty_string(m3_encoder: M3Encoder, reference: Reference) -> None:
    assert reference.ids("") == [0, 2]
    out = m3_encoder.encode(["", PLAIN, ""])
    for row in (0, 2):
        assert out.sparse[row] == {}
        assert out.colbert[row].shape == (1, m3_encoder.colbert_dim)
        assert_matches(out[row], reference(""))


def test_truncation_matches_the_tokenizer(m3_encoder: M3Encoder, reference: Reference) -> None:
    text = "Long documents of thousands of tokens are split into chunks. " * 5
    full = m3_encoder.count_tokens(text)[0]
    assert full > 40
    truncated = reference.ids(text, max_length=16)
    assert len(truncated) == 16 and truncated[0] == 0 and truncated[-1] == 2
    out = m3_encoder.encode(text, max_length=16)
    assert out.colbert[0].shape == (15, m3_encoder.colbert_dim)
    assert_matches(out[0], reference(text, max_length=16))
    assert m3_encoder.tokenize(text, max_length=16) == [truncated]
    assert m3_encoder.count_tokens([text, ""], max_length=16) == [16, 2]


def test_batched_equals_one_by_one(m3_encoder: M3Encoder) -> None:
    one_by_one = [m3_encoder.encode(text)[0] for text in MIXED]
    # A budget that forces several batches, and one that takes everything at once.
    for batch_tokens in (128, 100_000):
        out = m3_encoder.encode(MIXED, batch_tokens=batch_tokens)
        assert len(out) == len(MIXED)
        for row, single in zip(out, one_by_one, strict=True):
            np.testing.assert_allclose(row.dense, single.dense, atol=ATOL, rtol=0)
            assert_sparse_close(row.sparse, single.sparse)
            np.testing.assert_allclose(row.colbert, single.colbert, atol=ATOL, rtol=0)


def test_order_is_preserved_with_mixed_lengths(m3_encoder: M3Encoder, reference: Reference) -> None:
    texts = [MIXED[i] for i in (4, 5, 1, 2, 7, 0, 3, 6)]
    lengths = m3_encoder.count_tokens(texts)
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True)
    out = m3_encoder.encode(texts, batch_tokens=96, max_batch_size=3)
    assert [c.shape[0] for c in out.colbert] == [n - 1 for n in lengths]
    for row, text in zip(out, texts, strict=True):
        assert_matches(row, reference(text))


def test_skipped_parts_are_none(m3_encoder: M3Encoder) -> None:
    full = m3_encoder.encode(MIXED[:4])
    only_sparse = m3_encoder.encode(MIXED[:4], dense=False, colbert=False)
    assert only_sparse.dense is None and only_sparse.colbert is None
    assert only_sparse.parts == ("sparse",)
    assert only_sparse.sparse == full.sparse
    dense_colbert = m3_encoder.encode(MIXED[:4], sparse=False)
    assert dense_colbert.sparse is None
    np.testing.assert_array_equal(dense_colbert.dense, full.dense)
    with pytest.raises(ValueError, match="nothing to compute"):
        m3_encoder.encode(MIXED, dense=False, sparse=False, colbert=False)


def test_single_string_and_empty_list(m3_encoder: M3Encoder) -> None:
    out = m3_encoder.encode(PLAIN)
    assert isinstance(out, M3Output) and len(out) == 1
    empty = m3_encoder.encode([])
    assert len(empty) == 0 and empty.dense.shape == (0, m3_encoder.dense_dim)
    assert empty.sparse == [] and empty.colbert == []
    query = m3_encoder.encode_query(PLAIN)
    assert isinstance(query, M3Embedding)
    np.testing.assert_allclose(query.dense, out.dense[0], atol=ATOL, rtol=0)
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        m3_encoder.encode(["ok", None])  # type: ignore[list-item]


def test_encode_queries_truncate_at_512(m3_encoder: M3Encoder) -> None:
    long_query = "retrieval " * 600
    assert m3_encoder.count_tokens(long_query)[0] > 512
    assert m3_encoder.encode_queries([long_query]).colbert[0].shape[0] == 511
    assert m3_encoder.encode([long_query]).colbert[0].shape[0] > 511
    with pytest.raises(ValueError, match="max_length"):
        m3_encoder.encode(PLAIN, max_length=m3_encoder.max_length + 1)
    assert m3_encoder.max_length == 8192


@pytest.mark.slow
def test_colbert_float16(m3_encoder: M3Encoder) -> None:
    full = m3_encoder.encode(MIXED)
    half = m3_encoder.encode(MIXED, colbert_dtype="float16")
    assert half.dense.dtype == np.float32
    for a, b in zip(full.colbert, half.colbert, strict=True):
        assert b.dtype == np.float16 and b.shape == a.shape
        np.testing.assert_allclose(b.astype(np.float32), a, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="colbert_dtype"):
        m3_encoder.encode(PLAIN, colbert_dtype="int8")


@pytest.mark.slow
def test_bfloat16_compute_is_close(m3_checkpoint: Path, m3_encoder: M3Encoder) -> None:
    bf16 = M3Encoder.from_pretrained(m3_checkpoint, device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16 and m3_encoder.dtype == torch.float32
    texts = MIXED[:4] + [PLAIN]
    low, full = bf16.encode(texts), m3_encoder.encode(texts)
    assert low.dense.dtype == np.float32 and low.colbert[0].dtype == np.float32
    assert np.all(np.sum(low.dense * full.dense, axis=1) > 0.98)
    for a, b in zip(low.colbert, full.colbert, strict=True):
        assert np.all(np.sum(a * b, axis=1) > 0.95)
    # Same token ids; weights move a little, tokens near zero may flip.
    for a, b in zip(low.sparse, full.sparse, strict=True):
        for token in set(a) & set(b):
            assert abs(a[token] - b[token]) < 0.15


def test_sparse_tokens_roundtrip(m3_encoder: M3Encoder) -> None:
    weights = m3_encoder.encode(PLAIN).sparse[0]
    as_tokens = m3_encoder.sparse_to_tokens(weights)
    assert len(as_tokens) == len(weights)
    assert set(as_tokens) == set(m3_encoder.convert_ids_to_tokens(weights))
    assert m3_encoder.tokens_to_sparse(as_tokens) == weights
    assert m3_encoder.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "<pad>", "</s>", "<unk>"]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        m3_encoder.tokens_to_sparse({"▁not-a-real-piece-xyz": 1.0})


def test_properties_and_fingerprint(m3_checkpoint: Path, m3_encoder: M3Encoder) -> None:
    assert m3_encoder.dense_dim == 32 and m3_encoder.colbert_dim == 32
    assert m3_encoder.device == torch.device("cpu")
    assert m3_encoder.special_token_ids == SPECIAL_IDS
    fp = m3_encoder.fingerprint
    assert (fp.model, fp.dense_dim, fp.colbert_dim) == (str(m3_checkpoint), 32, 32)
    assert len(fp.heads_sha256) == 64
    # Compute dtype does not change the fingerprint; different heads do.
    assert (
        M3Encoder.from_pretrained(m3_checkpoint, dtype="bfloat16").fingerprint.heads_sha256
        == fp.heads_sha256
    )
    other = build_random_checkpoint(m3_checkpoint.parent / "seed1", seed=1)
    assert M3Encoder.from_pretrained(other).fingerprint.heads_sha256 != fp.heads_sha256


def test_out_of_memory_splits_the_batch(
    m3_encoder: M3Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [f"document {i} is about retrieval, ranking and fusion" for i in range(8)]
    assert len(plan_batches(m3_encoder.count_tokens(texts), DEFAULT_BATCH_TOKENS)) == 1
    expected = m3_encoder.encode(texts)
    real = m3_encoder._hidden_states
    sizes: list[int] = []

    def flaky(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        sizes.append(input_ids.shape[0])
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(input_ids, attention_mask)

    monkeypatch.setattr(m3_encoder, "_hidden_states", flaky)
    out = m3_encoder.encode(texts)
    assert sizes[0] == len(texts) and sizes[-1] <= 2
    assert sum(s for s in sizes if s <= 2) == len(texts)  # each text ran exactly once
    for a, b in zip(out, expected, strict=True):
        np.testing.assert_allclose(a.dense, b.dense, atol=ATOL, rtol=0)
        assert_sparse_close(a.sparse, b.sparse)
        np.testing.assert_allclose(a.colbert, b.colbert, atol=ATOL, rtol=0)

    def always(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
        )

    monkeypatch.setattr(m3_encoder, "_hidden_states", always)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        m3_encoder.encode(["a single text that never fits"])


# -- loading errors -----------------------------------------------------------------------


@pytest.fixture
def checkpoint_copy(m3_checkpoint: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(m3_checkpoint, tmp_path / "copy"))


@pytest.mark.parametrize("missing", ["colbert_linear.pt", "sparse_linear.pt"])
def test_missing_head_file_is_an_error(checkpoint_copy: Path, missing: str) -> None:
    (checkpoint_copy / missing).unlink()
    with pytest.raises(CheckpointError, match=missing) as info:
        M3Encoder.from_pretrained(checkpoint_copy)
    assert "random" in str(info.value)


def test_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a model checkpoint: no config.json"):
        M3Encoder.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="no folder"):
        M3Encoder.from_pretrained(tmp_path / "does-not-exist")


def test_checkpoint_without_weights_or_with_wrong_head(checkpoint_copy: Path) -> None:
    shape_bad = checkpoint_copy / "sparse_linear.pt"
    torch.save({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, shape_bad)
    with pytest.raises(CheckpointError, match="not the sparse head"):
        M3Encoder.from_pretrained(checkpoint_copy)
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model weights"):
        M3Encoder.from_pretrained(checkpoint_copy)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (self.marker,))


def test_head_files_are_loaded_with_weights_only(checkpoint_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save(
        {"weight": torch.zeros(1, 32), "bias": _Exploit(marker)},
        checkpoint_copy / "sparse_linear.pt",
    )
    with pytest.raises(CheckpointError, match="weights_only"):
        M3Encoder.from_pretrained(checkpoint_copy)
    assert not marker.exists()


@pytest.mark.slow
def test_offline_hub_id_fails_with_advice(tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        from m3connect.encoder import CheckpointError, M3Encoder
        try:
            M3Encoder.from_pretrained("m3connect-tests/no-such-model")
        except CheckpointError as exc:
            print(exc)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    message = done.stdout
    # Offline mode never touches the network (no retry warnings from huggingface_hub).
    assert "Retrying" not in done.stderr
    assert "m3connect-tests/no-such-model" in message
    assert "local folder" in message
    assert (
        "huggingface-cli download m3connect-tests/no-such-model --local-dir ./no-such-model"
        in message
    )
    assert "HF_HUB_OFFLINE" in message


def test_unreachable_hub_fails_fast_without_retries(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import m3connect.encoder as encoder_module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    calls: list[str] = []

    def unreachable(repo_id: str, revision: str | None, token: object) -> list[str]:
        calls.append(repo_id)
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(encoder_module, "_list_hub_files", unreachable)
    monkeypatch.setattr(encoder_module, "_hub_unreachable", lambda: None)  # the probe passes
    with pytest.raises(CheckpointError, match="not reachable") as info:
        M3Encoder.from_pretrained("m3connect-tests/no-such-model", cache_dir=tmp_path)
    assert calls == ["m3connect-tests/no-such-model"]  # one attempt, no retries
    assert "local folder" in str(info.value)
    # local_files_only skips the network altogether.
    with pytest.raises(CheckpointError, match="offline"):
        M3Encoder.from_pretrained(
            "m3connect-tests/no-such-model", cache_dir=tmp_path, local_files_only=True
        )
    assert len(calls) == 1


def test_hub_that_refuses_connections_is_known_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """One TCP attempt tells an offline machine the answer; the hub API (which retries with
    back-off for half a minute) is never called."""
    import m3connect.encoder as encoder_module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")  # discard port

    def never(*args: object) -> list[str]:
        raise AssertionError("the hub API must not be tried")

    monkeypatch.setattr(encoder_module, "_list_hub_files", never)
    with pytest.raises(CheckpointError, match="not reachable") as info:
        M3Encoder.from_pretrained("m3connect-tests/no-such-model", cache_dir=tmp_path)
    assert "--local-dir ./no-such-model" in str(info.value)


def test_hub_download_fetches_one_weights_format(
    monkeypatch: pytest.MonkeyPatch, m3_checkpoint: Path
) -> None:
    """The online path, with the hub simulated: list the repo, refuse a repo without heads
    before downloading anything, and download config, tokenizer, heads and one weights format."""
    import huggingface_hub

    import m3connect.encoder as encoder_module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    hub_files = [
        "config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json",
        "tokenizer_config.json", "sentencepiece.bpe.model", "colbert_linear.pt",
        "sparse_linear.pt", "onnx/model.onnx", "imgs/bm25.jpg",
    ]  # fmt: skip
    downloads: list[list[str]] = []

    def fake_snapshot(repo_id: str, **kwargs: object) -> str:
        assert kwargs.get("local_files_only") is not True
        downloads.append(list(kwargs["allow_patterns"]))  # type: ignore[arg-type]
        return str(m3_checkpoint)

    monkeypatch.setattr(encoder_module, "_list_hub_files", lambda *a: list(hub_files))
    monkeypatch.setattr(encoder_module, "_hub_unreachable", lambda: None)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    encoder = M3Encoder.from_pretrained("BAAI/bge-m3")
    assert encoder.name == "BAAI/bge-m3" and encoder.fingerprint.model == "BAAI/bge-m3"
    patterns = downloads[0]
    assert "model.safetensors" in patterns and "pytorch_model.bin" not in patterns
    assert {"config.json", "colbert_linear.pt", "sparse_linear.pt", "tokenizer.json"} <= set(
        patterns
    )
    assert not any(p.startswith(("onnx", "imgs")) for p in patterns)

    hub_files.remove("sparse_linear.pt")
    with pytest.raises(CheckpointError, match="has no sparse_linear.pt"):
        M3Encoder.from_pretrained("BAAI/bge-m3")
    assert len(downloads) == 1  # refused before downloading 2 GB
