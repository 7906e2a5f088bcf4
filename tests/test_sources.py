"""Sources: JSONL, CSV, Parquet and folders; bad records with their line numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m3connect.sources import SourceError, open_source


def _jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text(
        "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
        encoding="utf-8",
    )
    return path


def test_jsonl_records_with_line_numbers(tmp_path) -> None:
    path = _jsonl(
        tmp_path / "c.jsonl",
        [
            {"_id": "a", "title": "T", "text": "alpha", "lang": "en", "metadata": {"year": 2020}},
            "",
            {"id": 7, "text": "beta"},
        ],
    )
    records = list(open_source(path))
    assert [(r.id, r.text, r.line) for r in records] == [("a", "alpha", 1), (7, "beta", 3)]
    assert records[0].metadata == {"title": "T", "lang": "en", "year": 2020}
    assert records[0].where == f"{path}:1"


def test_title_and_field_options(tmp_path) -> None:
    path = _jsonl(
        tmp_path / "c.jsonl", [{"key": "k1", "body": "text", "head": "Title", "x": 1, "y": 2}]
    )
    source = open_source(
        path, id_field="key", text_field="body", title_field="head", metadata_fields=["x"]
    )
    (record,) = list(source)
    assert (record.id, record.text, record.metadata) == ("k1", "Title\ntext", {"x": 1})
    (by_line,) = list(open_source(path, id_field="@line", text_field="body"))
    assert by_line.id == 1


BAD_LINES = [
    {"_id": "ok1", "text": "fine"},
    "{not json",
    {"_id": "no-text"},
    {"_id": "num", "text": 42},
    {"_id": "empty", "text": "   "},
    [1, 2],
    {"text": "no id"},
    {"_id": 1.5, "text": "float id"},
    {"_id": "ok1", "text": "duplicate"},
    {"_id": "ok2", "text": "fine too"},
]


def test_bad_records_are_skipped_and_reported(tmp_path, caplog) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    source = open_source(path, on_error="skip")
    # Line 7 has no id: it is numbered by its line (with a warning naming --id-field), not lost.
    assert [r.id for r in source] == ["ok1", 7, "ok2"]
    assert source.numbered == 1
    numbered = [r.getMessage() for r in caplog.records if "no id field" in r.getMessage()]
    assert len(numbered) == 1
    assert "line 7 has no id field '_id' or 'id'" in numbered[0]
    assert "--id-field" in numbered[0]
    reasons = {bad.line: bad.reason for bad in source.errors}
    assert sorted(reasons) == [2, 3, 4, 5, 6, 8, 9]
    assert "invalid JSON" in reasons[2]
    assert "no text field" in reasons[3]
    assert "int, not a string" in reasons[4]
    assert "empty text" in reasons[5]
    assert "not an object" in reasons[6]
    assert "float" in reasons[8]
    assert "occurs again (first at line 1)" in reasons[9]
    assert str(source.errors[0]) == f"{path} line 2: {reasons[2]}"


def test_bad_record_stops_the_job_with_its_line(tmp_path) -> None:
    path = _jsonl(tmp_path / "bad.jsonl", BAD_LINES)
    source = open_source(path, on_error="stop")
    read = []
    with pytest.raises(SourceError, match=r"bad\.jsonl line 2: invalid JSON") as info:
        for record in source:
            read.append(record.id)
    assert read == ["ok1"]
    assert info.value.line == 2


def test_csv(tmp_path) -> None:
    path = tmp_path / "c.csv"
    path.write_text(
        'id,text,lang\n1,"multi\nline text",en\n2,second,de\n3,too,many,fields\n', encoding="utf-8"
    )
    source = open_source(path)
    records = list(source)
    assert [(r.id, r.text, r.line, r.metadata) for r in records] == [
        ("1", "multi\nline text", 2, {"lang": "en"}),
        ("2", "second", 4, {"lang": "de"}),
    ]
    assert [(b.line, "4 fields" in b.reason) for b in source.errors] == [(5, True)]
    tsv = tmp_path / "c.tsv"
    tsv.write_text("id\ttext\nx\thello\n", encoding="utf-8")
    assert [r.text for r in open_source(tsv)] == ["hello"]


def test_parquet(tmp_path) -> None:
    pa = pytest.importorskip("pyarrow")
    import datetime

    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": ["a", "b", "c"],
            "text": ["first", None, "third"],
            "when": [datetime.date(2024, 1, 2)] * 3,
            "score": [1.5, 2.5, float("nan")],
        }
    )
    path = tmp_path / "c.parquet"
    pq.write_table(table, path)
    source = open_source(path)
    records = list(source)
    assert [(r.id, r.line) for r in records] == [("a", 1), ("c", 3)]
    assert records[0].metadata == {"when": "2024-01-02", "score": 1.5}
    assert records[1].metadata["score"] is None
    assert [(b.line, b.unit) for b in source.errors] == [(2, "row")]
    assert "row 2" in str(source.errors[0])
    assert source.estimate_total() == 3


def test_folder(tmp_path) -> None:
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.md").write_text("# B\nbee", encoding="utf-8")
    (tmp_path / "docs" / "sub" / "a.txt").write_text("ay", encoding="utf-8")
    (tmp_path / "docs" / "skip.bin").write_bytes(b"\x00")
    (tmp_path / "docs" / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    source = open_source(tmp_path / "docs")
    records = list(source)
    assert [(r.id, r.text, r.metadata) for r in records] == [
        ("b.md", "# B\nbee", {"path": "b.md"}),
        ("sub/a.txt", "ay", {"path": "sub/a.txt"}),
    ]
    assert len(source.errors) == 1 and "bad.txt" in str(source.errors[0])


def test_unknown_format_and_missing_file(tmp_path) -> None:
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(SourceError, match="cannot tell the format"):
        open_source(tmp_path / "x.xml")
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "missing.jsonl")


def test_estimate_total(tmp_path) -> None:
    path = _jsonl(tmp_path / "c.jsonl", [{"id": i, "text": "t"} for i in range(5)])
    assert open_source(path).estimate_total() == 5
