"""Read the documents of an indexing job: JSONL, Parquet, CSV, or a folder of text files.

Every reader yields :class:`SourceRecord` s (id, text, metadata) with the place each came from
(file and line, or row), so that a bad record can be reported where it is. What a bad record
is: a line that is not valid JSON (or not a JSON object), a record without the text field, a text that is not a string or is empty, an id that is not a string or an integer, an
id seen before. A record without an id field gets its line (row) number as id, with a warning
that names ``--id-field`` (``id_field``). With ``on_error="skip"`` such a record is reported (a warning and
:attr:`Source.errors`) and the job goes on; with ``on_error="stop"`` it raises
:class:`SourceError` and the job stops there.

    source = open_source("corpus.jsonl", id_field="_id", text_field="text", on_error="stop")
    for record in source:
        ...  # record.id, record.text, record.metadata, record.line
"""

from __future__ import annotations

import csv
import datetime
import decimal
import gzip
import io
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from m3connect.types import DocId

__all__ = [
    "SourceError",
    "SourceRecord",
    "BadRecord",
    "Source",
    "open_source",
    "SOURCE_FORMATS",
    "LINE_ID",
]

logger = logging.getLogger(__name__)

OnError = Literal["skip", "stop"]
SOURCE_FORMATS = ("jsonl", "parquet", "csv", "folder")
#: ``id_field`` value that numbers the records by their line (or row) instead of a field.
LINE_ID = "@line"
#: Tried in this order when no ``id_field`` is given (``_id`` is BEIR's).
DEFAULT_ID_FIELDS = ("_id", "id")
TEXT_SUFFIXES = (".txt", ".md", ".markdown")

_FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
}


class SourceError(ValueError):
    """A bad record (with ``on_error="stop"``), or a source that cannot be read at all."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


@dataclass
class SourceRecord:
    """One document read from a source. ``line`` is the 1-based line of a JSONL or CSV file
    (where the record starts), the 1-based row of a Parquet file, or the 1-based position of
    a file in a folder's sorted listing."""

    id: DocId
    text: str
    metadata: dict[str, Any]
    line: int
    path: str

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class BadRecord:
    """A record that was skipped, and why."""

    path: str
    line: int
    reason: str
    unit: str = "line"

    def __str__(self) -> str:
        return f"{self.path} {self.unit} {self.line}: {self.reason}"


@dataclass
class Source:
    """A configured reader; iterate it for :class:`SourceRecord` s.

    ``id_field``: the field holding the document id (``None``: ``_id``, else ``id``;
    ``"@line"``: the line or row number). ``text_field``: the document text.
    ``title_field``: optional; a non-empty title is put before the text (``title + "\\n" +
    text``), as BEIR does. ``metadata_fields``: the fields kept as metadata (``None``: every
    other field; a field ``metadata`` holding an object is merged in). For a folder the id is
    the file's path relative to the folder and the metadata ``{"path": ...}``.
    """

    path: Path
    format: str
    id_field: str | None = None
    text_field: str = "text"
    title_field: str | None = None
    metadata_fields: Sequence[str] | None = None
    on_error: OnError = "skip"
    csv_delimiter: str | None = None
    encoding: str = "utf-8"
    #: The bad records skipped so far (``on_error="skip"``).
    errors: list[BadRecord] = field(default_factory=list, init=False)
    #: Records read successfully so far.
    read: int = field(default=0, init=False)
    #: Records that had no id field and were numbered by their line (row) instead.
    numbered: int = field(default=0, init=False)
    _files: list[Path] | None = field(default=None, init=False, repr=False)
    _skipped_suffixes: set[str] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.on_error not in ("skip", "stop"):
            raise ValueError(f"on_error must be 'skip' or 'stop', got {self.on_error!r}")
        if self.format not in SOURCE_FORMATS:
            raise ValueError(f"format must be one of {SOURCE_FORMATS}, got {self.format!r}")

    # --- public ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[SourceRecord]:
        self.errors, self.read, self.numbered = [], 0, 0  # a new pass reports afresh
        seen: dict[tuple[type, DocId], int] = {}
        readers = {
            "jsonl": self._read_jsonl,
            "parquet": self._read_parquet,
            "csv": self._read_csv,
            "folder": self._read_folder,
        }
        for item in readers[self.format]():
            line, payload = item
            if isinstance(payload, str):  # an error message
                self._bad(line, payload)
                continue
            record = self._record(line, payload)
            if record is None:
                continue
            key = (type(record.id), record.id)
            first = seen.get(key)
            if first is not None:
                self._bad(line, f"id {record.id!r} occurs again (first at {self._unit} {first})")
                continue
            seen[key] = line
            self.read += 1
            yield record

    def estimate_total(self) -> int | None:
        """How many records the source holds (cheap: a line count, Parquet metadata, a file
        listing), for a progress bar; ``None`` if unknown."""
        try:
            if self.format == "parquet":
                import pyarrow.parquet as pq

                return int(pq.ParquetFile(self.path).metadata.num_rows)
            if self.format == "folder":
                return sum(1 for _ in self._folder_files())
            with self._open_binary() as handle:
                lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
            if self.format == "csv":
                return max(0, lines - 1)
            return lines
        except Exception:  # only a progress hint
            return None

    @property
    def _unit(self) -> str:
        return {"parquet": "row", "folder": "file"}.get(self.format, "line")

    # --- records --------------------------------------------------------------------------

    def _bad(self, line: int, reason: str) -> None:
        bad = BadRecord(self._display_path(line), line, reason, self._unit)
        if self.on_error == "stop":
            raise SourceError(
                f"bad record at {bad}. Fix it, or pass on_error='skip' (--on-error skip) to "
                f"report and skip bad records",
                path=str(self.path),
                line=line,
            )
        self.errors.append(bad)
        logger.warning("skipping bad record at %s", bad)

    def _numbered(self, line: int, names: Sequence[str]) -> None:
        self.numbered += 1
        if self.numbered == 1:  # once per pass: a file without ids would warn on every line
            fields = " or ".join(repr(n) for n in names)
            logger.warning(
                "%s %s %d has no id field %s: records without one get their %s number as id "
                "(name the id field with --id-field, id_field=...; --id-field @line numbers "
                "every record)",
                self._display_path(line),
                self._unit,
                line,
                fields,
                self._unit,
            )

    def _display_path(self, line: int) -> str:
        if self.format == "folder" and self._files is not None and 0 < line <= len(self._files):
            return str(self._files[line - 1])
        return str(self.path)

    def _record(self, line: int, data: Mapping[str, Any]) -> SourceRecord | None:
        # id
        id_name: str | None = None
        if self.id_field == LINE_ID:
            doc_id: Any = line
        else:
            names = (self.id_field,) if self.id_field else DEFAULT_ID_FIELDS
            present = [name for name in names if name in data]
            if present:
                id_name = present[0]
                doc_id = data[id_name]
            else:
                doc_id = line
                self._numbered(line, names)
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            self._bad(
                line, f"id {doc_id!r} is a {type(doc_id).__name__}: ids are strings or integers"
            )
            return None
        if isinstance(doc_id, str) and not doc_id.strip():
            self._bad(line, "empty id")
            return None
        if isinstance(doc_id, int) and not -(2**63) <= doc_id < 2**63:
            self._bad(line, f"id {doc_id} does not fit in 64 bits")
            return None
        # text
        if self.text_field not in data:
            self._bad(line, f"no text field {self.text_field!r}")
            return None
        text = data[self.text_field]
        if not isinstance(text, str):
            self._bad(
                line, f"text field {self.text_field!r} is a {type(text).__name__}, not a string"
            )
            return None
        if self.title_field:
            title = data.get(self.title_field)
            if title is not None and not isinstance(title, str):
                self._bad(
                    line,
                    f"title field {self.title_field!r} is a {type(title).__name__}, not a string",
                )
                return None
            if title and title.strip():
                text = f"{title}\n{text}" if text.strip() else title
        if not text.strip():
            self._bad(line, "empty text")
            return None
        # metadata
        skip = {self.text_field}
        if id_name is not None:
            skip.add(id_name)
        if self.metadata_fields is not None:
            metadata = {name: data[name] for name in self.metadata_fields if name in data}
        else:
            metadata = {k: v for k, v in data.items() if k not in skip and k != "metadata"}
            nested = data.get("metadata")
            if isinstance(nested, Mapping):
                for key, value in nested.items():
                    metadata.setdefault(str(key), value)
            elif nested is not None:
                metadata["metadata"] = nested
        return SourceRecord(doc_id, text, _jsonable(metadata), line, str(self.path))

    # --- readers: yield (line, dict) or (line, error message) -------------------------------

    def _open_binary(self) -> io.BufferedIOBase:
        if self.path.suffix == ".gz":
            return gzip.open(self.path, "rb")  # type: ignore[return-value]
        return open(self.path, "rb")  # noqa: SIM115 - closed by the caller

    def _read_jsonl(self) -> Iterator[tuple[int, Any]]:
        with self._open_binary() as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode(self.encoding)
                except UnicodeDecodeError as exc:
                    yield line_no, f"not valid {self.encoding} ({exc.reason} at byte {exc.start})"
                    continue
                if line_no == 1:
                    line = line.lstrip("\ufeff")
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as exc:
                    yield line_no, f"invalid JSON ({exc.msg} at column {exc.colno})"
                    continue
                if not isinstance(data, dict):
                    yield line_no, f"a JSON {type(data).__name__}, not an object"
                    continue
                yield line_no, data

    def _read_csv(self) -> Iterator[tuple[int, Any]]:
        delimiter = self.csv_delimiter
        if delimiter is None:
            delimiter = "\t" if self.path.name.endswith((".tsv", ".tsv.gz")) else ","
        with self._open_binary() as binary:
            handle = io.TextIOWrapper(binary, encoding=self.encoding, newline="")
            reader = csv.reader(handle, delimiter=delimiter)
            try:
                header = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                raise SourceError(
                    f"{self.path}: cannot read the CSV header: {exc}", path=str(self.path)
                ) from None
            if header:
                header[0] = header[0].lstrip("\ufeff")
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except (csv.Error, UnicodeDecodeError) as exc:
                    yield start, f"malformed CSV ({exc})"
                    continue
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    yield start, f"{len(row)} fields, the header has {len(header)}"
                    continue
                yield start, dict(zip(header, row, strict=True))

    def _read_parquet(self) -> Iterator[tuple[int, Any]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise SourceError(
                "reading Parquet needs pyarrow: pip install 'm3connect[parquet]'",
                path=str(self.path),
            ) from None
        try:
            parquet = pq.ParquetFile(self.path)
        except Exception as exc:
            raise SourceError(
                f"{self.path} is not a readable Parquet file: {exc}", path=str(self.path)
            ) from None
        row = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for data in batch.to_pylist():
                row += 1
                yield row, data

    def _folder_files(self) -> Iterator[Path]:
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.startswith("."):  # hidden files, like hidden folders
                    continue
                if name.lower().endswith(TEXT_SUFFIXES):
                    yield Path(root) / name
                else:
                    self._skipped(Path(root) / name)

    def _skipped(self, path: Path) -> None:
        """Say once per extension which files a folder source leaves out, and why."""
        suffix = path.suffix.lower()
        if suffix in self._skipped_suffixes:
            return
        self._skipped_suffixes.add(suffix)
        what = f"{suffix} files" if suffix else "files without an extension"
        logger.warning(
            "skipping %s in %s (e.g. %s): a folder source reads %s files only; convert them, "
            "or index a JSONL, CSV or Parquet file",
            what,
            self.path,
            path.relative_to(self.path).as_posix(),
            ", ".join(TEXT_SUFFIXES),
        )

    def _read_folder(self) -> Iterator[tuple[int, Any]]:
        self._files = []
        for number, path in enumerate(self._folder_files(), start=1):
            relative = path.relative_to(self.path).as_posix()
            self._files.append(path)
            try:
                text = path.read_text(encoding=self.encoding)
            except UnicodeDecodeError as exc:
                yield number, f"not valid {self.encoding} ({exc.reason} at byte {exc.start})"
                continue
            except OSError as exc:
                yield number, f"cannot be read ({exc})"
                continue
            yield number, {"id": relative, "text": text.lstrip("\ufeff"), "path": relative}


def open_source(
    path: str | os.PathLike[str],
    *,
    format: str | None = None,
    id_field: str | None = None,
    text_field: str = "text",
    title_field: str | None = None,
    metadata_fields: Sequence[str] | None = None,
    on_error: OnError = "skip",
    csv_delimiter: str | None = None,
    encoding: str = "utf-8",
) -> Source:
    """A :class:`Source` for ``path``: the format from ``format`` or the file name
    (``.jsonl``/``.ndjson``/``.json`` lines, ``.parquet``, ``.csv``/``.tsv``, optionally
    ``.gz``; a folder means its ``.txt``/``.md`` files, recursively, in sorted order)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise SourceError(f"no such file or folder: {str(path)!r}", path=str(path))
    if format is None:
        if p.is_dir():
            format = "folder"
        else:
            suffixes = [s.lower() for s in p.suffixes]
            if suffixes and suffixes[-1] == ".gz":
                suffixes = suffixes[:-1]
            format = _FORMAT_BY_SUFFIX.get(suffixes[-1] if suffixes else "")
            if format is None:
                raise SourceError(
                    f"cannot tell the format of {str(path)!r} from its name: use .jsonl, "
                    f".parquet, .csv/.tsv or a folder of .txt/.md files, or give the format",
                    path=str(path),
                )
    elif format not in SOURCE_FORMATS:
        raise SourceError(f"unknown source format {format!r}; one of {', '.join(SOURCE_FORMATS)}")
    if format == "folder" and not p.is_dir():
        raise SourceError(f"{str(path)!r} is not a folder", path=str(path))
    if format != "folder" and p.is_dir():
        raise SourceError(f"{str(path)!r} is a folder, not a {format} file", path=str(path))
    return Source(
        p,
        format,
        id_field=id_field,
        text_field=text_field,
        title_field=title_field,
        metadata_fields=metadata_fields,
        on_error=on_error,
        csv_delimiter=csv_delimiter,
        encoding=encoding,
    )


def _jsonable(value: Any) -> Any:
    """Metadata as plain JSON values (Parquet gives datetimes, decimals, bytes), which every
    database stores; a non-finite float becomes ``None``."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return str(value)
