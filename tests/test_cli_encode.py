"""`m3connect encode` and `m3connect testing-checkpoint` through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from m3connect import cli, encoder
from m3connect.encoder import M3Encoder
from m3connect.types import sparse_from_string_keys

RECORDS = [
    {"id": "doc-1", "text": "Dense retrieval encodes the query into one vector."},
    {"id": 7, "text": "서울은 대한민국의 수도입니다."},
    {"text": "A record without an id gets its line number."},
    {"id": "doc-4", "text": ""},
]


def write_jsonl(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args))


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "docs.jsonl", RECORDS)


def test_encode_jsonl_matches_the_encoder(
    docs: Path, tmp_path: Path, m3_checkpoint: Path, m3_encoder: M3Encoder, caplog
) -> None:
    out_path = tmp_path / "out" / "vectors.jsonl"
    result = run(
        "encode", str(docs), str(out_path), "--model", str(m3_checkpoint), "--max-length", "64",
        "--progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "encoding" in result.output  # the progress bar (stderr), asked for off a terminal
    # The record without an id is numbered by its line, with one warning that names the flag.
    (warning,) = [r.getMessage() for r in caplog.records if "no id field" in r.getMessage()]
    assert "line 3 has no id field 'id'" in warning and "--id-field" in warning
    lines = [json.loads(line) for line in out_path.read_text(encoding="utf-8").splitlines()]
    assert [line["id"] for line in lines] == ["doc-1", 7, 3, "doc-4"]
    expected = m3_encoder.encode([r["text"] for r in RECORDS], max_length=64)
    for line, row in zip(lines, expected, strict=True):
        np.testing.assert_array_equal(np.array(line["dense"], dtype=np.float32), row.dense)
        assert all(isinstance(k, str) for k in line["sparse"])
        assert sparse_from_string_keys(line["sparse"]) == pytest.approx(row.sparse, abs=1e-7)
        np.testing.assert_array_equal(np.array(line["colbert"], dtype=np.float32), row.colbert)
    assert not out_path.with_name("vectors.jsonl.partial").exists()


def test_encode_options_text_field_and_no_colbert(tmp_path: Path, m3_checkpoint: Path) -> None:
    docs = write_jsonl(
        tmp_path / "d.jsonl", [{"key": "a", "body": "hello world"}, {"key": "b", "body": "the dog"}]
    )
    out_path = tmp_path / "v.jsonl"
    result = run(
        "encode", str(docs), str(out_path), "--model", str(m3_checkpoint),
        "--text-field", "body", "--id-field", "key", "--no-colbert", "--no-progress",
        "--batch-tokens", "8", "--dtype", "float32",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "encoding" not in result.output
    lines = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["a", "b"]
    assert all(set(line) == {"id", "dense", "sparse"} for line in lines)
    assert all(len(line["dense"]) == 32 for line in lines)


def test_encode_npz(docs: Path, tmp_path: Path, m3_checkpoint: Path, m3_encoder: M3Encoder) -> None:
    out_path = tmp_path / "vectors.npz"
    result = run(
        "encode", str(docs), str(out_path), "--model", str(m3_checkpoint),
        "--colbert-dtype", "float16", "--chunk-size", "3", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = np.load(out_path)  # no allow_pickle needed
    assert data["ids"].tolist() == ["doc-1", "7", "3", "doc-4"]
    # --chunk-size 3 batches differently from one call: equal up to float32 rounding.
    expected = m3_encoder.encode([r["text"] for r in RECORDS])
    np.testing.assert_allclose(data["dense"], expected.dense, atol=1e-6, rtol=0)
    indptr, offsets = data["sparse_indptr"], data["colbert_offsets"]
    assert data["colbert_vectors"].dtype == np.float16
    for i, row in enumerate(expected):
        ids = data["sparse_token_ids"][indptr[i] : indptr[i + 1]].tolist()
        weights = data["sparse_weights"][indptr[i] : indptr[i + 1]].tolist()
        assert dict(zip(ids, weights, strict=True)) == pytest.approx(row.sparse, abs=1e-6)
        np.testing.assert_allclose(
            data["colbert_vectors"][offsets[i] : offsets[i + 1]], row.colbert, atol=1e-3, rtol=0
        )
    assert (
        json.loads(str(data["fingerprint"]))["heads_sha256"] == m3_encoder.fingerprint.heads_sha256
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"id": 1, "text": "ok"}\n{"id": 2, "text": broken}\n', "line 2: not valid JSON"),
        (
            '{"id": 1, "text": "ok"}\n\n{"id": 3, "body": "x"}\n',
            "line 3: no 'text' field (fields: body, id)",
        ),
        ('["a list"]\n', "line 1: expected a JSON object"),
        ('{"text": 5}\n', "field 'text' is a int, not a string"),
        ('{"text": "x", "id": [1]}\n', "id field 'id' must be a string or an integer"),
        ("\n\n", "holds no records"),
    ],
)
def test_bad_input_gives_a_clear_error(
    tmp_path: Path, m3_checkpoint: Path, content: str, message: str
) -> None:
    docs = tmp_path / "bad.jsonl"
    docs.write_text(content)
    result = run("encode", str(docs), str(tmp_path / "o.jsonl"), "--model", str(m3_checkpoint))
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # a click error, not a traceback
    assert message in result.output and str(docs) in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_usage_errors(docs: Path, tmp_path: Path, m3_checkpoint: Path) -> None:
    missing = run("encode", str(tmp_path / "nope.jsonl"), str(tmp_path / "o.jsonl"))
    assert missing.exit_code == 2 and "does not exist" in missing.output
    suffix = run("encode", str(docs), str(tmp_path / "o.csv"), "--model", str(m3_checkpoint))
    assert suffix.exit_code == 2 and "must end in .jsonl or .npz" in suffix.output
    nothing = run(
        "encode", str(docs), str(tmp_path / "o.jsonl"), "--no-dense", "--no-sparse", "--no-colbert"
    )
    assert nothing.exit_code == 2 and "nothing to compute" in nothing.output
    too_long = run(
        "encode",
        str(docs),
        str(tmp_path / "o.jsonl"),
        "--model",
        str(m3_checkpoint),
        "--max-length",
        "9000",
    )
    assert too_long.exit_code == 2 and "8192" in too_long.output


def test_bad_model_gives_a_clear_error(docs: Path, tmp_path: Path) -> None:
    result = run("encode", str(docs), str(tmp_path / "o.jsonl"), "--model", str(tmp_path))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "not a model checkpoint: no config.json" in result.output


def test_testing_checkpoint_command(tmp_path: Path, m3_checkpoint: Path) -> None:
    target = tmp_path / "tiny"
    result = run("testing-checkpoint", str(target))
    assert result.exit_code == 0, result.output
    assert f"--model {target}" in result.output
    # Same defaults, same bytes as the session fixture.
    for name in ("model.safetensors", "colbert_linear.pt", "sparse_linear.pt", "tokenizer.json"):
        assert (target / name).read_bytes() == (m3_checkpoint / name).read_bytes()
    again = run("testing-checkpoint", str(target))
    assert again.exit_code == 1 and "not empty" in again.output
    bigger = run(
        "testing-checkpoint",
        str(target),
        "--overwrite",
        "--hidden-size",
        "48",
        "--heads",
        "6",
        "--seed",
        "3",
    )
    assert bigger.exit_code == 0, bigger.output
    loaded = M3Encoder.from_pretrained(target)
    assert loaded.dense_dim == 48 and loaded.colbert_dim == 48
    bad = run("testing-checkpoint", str(tmp_path / "bad"), "--hidden-size", "30", "--heads", "4")
    assert bad.exit_code == 2 and "multiple of num_attention_heads" in bad.output


def test_help_and_defaults() -> None:
    assert cli.DEFAULT_MODEL == encoder.DEFAULT_MODEL
    result = run("--help")
    assert (
        result.exit_code == 0
        and "encode" in result.output
        and "testing-checkpoint" in result.output
    )
    encode_help = run("encode", "--help")
    assert "--text-field" in encode_help.output and "BAAI/bge-m3" in encode_help.output
