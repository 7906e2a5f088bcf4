"""ColBERT rows beside an embedded shard, for scoring in BLAS.

qdrant-edge keeps each document's ColBERT matrix in its own storage and scores it with its own
MaxSim, several times slower than a float32 matrix product; its Python binding hands vectors
back as lists of Python floats (about 1 ms per row), so reading them to score here is slower
still. :class:`ColbertRowFile` keeps a second copy of the rows, in float32 (the store's float16
values are exact in it), in a plain append-only file that is memory-mapped for reading: a
re-rank multiplies its candidates' rows where they lie in the page cache
(:func:`m3connect.scoring.colbert_scores`), with no conversion or copy.

The shard stays the source of truth. Each point's payload holds its rows' place in the file,
``[generation, first row, row count]`` (:data:`ROWS_KEY`). Rows are written and handed to the
operating system *before* the point that refers to them, so a process killed at any moment
leaves at most unreferenced rows at the end of the file; a point whose rows cannot be read
(a file lost, or cut short by a power failure) is scored from the engine's own copy instead.

Replaced and deleted documents leave their rows behind; :meth:`ColbertRowFile.compact` copies
the live rows into a new generation file when the dead ones outweigh them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

logger = logging.getLogger(__name__)

#: The payload key of a point's rows: ``[generation, first row, row count]``.
ROWS_KEY = "colbert_rows"

_FORMAT_FILE = "format.json"
_FORMAT_VERSION = 1


class ColbertRowFile:
    """The ColBERT rows of one shard: ``rows-<generation>.bin`` files of ``[rows, dim]`` values
    in ``dtype``, in ``folder``. Appends go to the newest generation."""

    def __init__(self, folder: Path, dim: int, dtype: np.dtype | str) -> None:
        self.folder = Path(folder)
        self.dim = int(dim)
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.dim * self.dtype.itemsize
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_format()
        generations = self.generations()
        self.generation = max(generations) if generations else 0
        path = self._path(self.generation)
        # A write killed part way leaves a torn last row; no point refers to it (the point is
        # written after its rows), so it is cut off.
        size = path.stat().st_size if path.exists() else 0
        whole = size - size % self.row_bytes
        self._append: BinaryIO = open(path, "ab")  # noqa: SIM115 - kept open for appends
        if whole != size:
            self._append.truncate(whole)
        self.rows_written = whole // self.row_bytes
        self._maps: dict[int, np.ndarray] = {}
        # Appends and (re)mappings from several threads of one store (reads of mapped rows
        # need no lock).
        self._lock = threading.RLock()

    # --- the folder ---------------------------------------------------------------------------

    @classmethod
    def open_existing(cls, folder: Path, dim: int) -> ColbertRowFile | None:
        """The row file in ``folder`` if it exists and holds rows of dimension ``dim``, else
        ``None`` (a shard written before row files, or by another layout: the engine scores
        it). The rows keep the dtype they were written in (the engine's storage dtype)."""
        try:
            found = json.loads((Path(folder) / _FORMAT_FILE).read_text())
            dtype = np.dtype(found["dtype"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if found != cls._format(dim, dtype):
            logger.warning(
                "ignoring the ColBERT row file in %s: it holds %s, this store needs dimension %d",
                folder,
                found,
                dim,
            )
            return None
        return cls(folder, dim, dtype)

    @staticmethod
    def _format(dim: int, dtype: np.dtype | str) -> dict[str, object]:
        return {"version": _FORMAT_VERSION, "dim": int(dim), "dtype": np.dtype(dtype).name}

    def _write_format(self) -> None:
        path = self.folder / _FORMAT_FILE
        if not path.exists():
            path.write_text(json.dumps(self._format(self.dim, self.dtype)))

    def _path(self, generation: int) -> Path:
        return self.folder / f"rows-{generation}.bin"

    def generations(self) -> list[int]:
        found = []
        for path in self.folder.glob("rows-*.bin"):
            try:
                found.append(int(path.stem.split("-", 1)[1]))
            except ValueError:
                continue
        return sorted(found)

    # --- writing ------------------------------------------------------------------------------

    def append(self, matrices: Sequence[np.ndarray]) -> list[list[int]]:
        """Write each matrix's rows at the end of the current file; their places
        (``[generation, first row, row count]``). The bytes reach the operating system before
        this returns (a killed process keeps them), and the disk with :meth:`sync`."""
        with self._lock:
            return self._append_locked(matrices)

    def _append_locked(self, matrices: Sequence[np.ndarray]) -> list[list[int]]:
        spans = []
        for matrix in matrices:
            rows = np.ascontiguousarray(matrix, dtype=self.dtype)
            if rows.ndim != 2 or (len(rows) and rows.shape[1] != self.dim):
                raise ValueError(f"ColBERT rows of shape {rows.shape}, the file holds {self.dim}")
            try:
                self._append.write(rows.data)
                self._append.flush()
            except BaseException:
                # A failed write (a full disk) may leave part of a row: cut the file back to
                # its last whole row, so that later rows stay where their spans say.
                self._append = _reopened_at(self._append, self.rows_written * self.row_bytes)
                raise
            spans.append([self.generation, self.rows_written, len(rows)])
            self.rows_written += len(rows)
        return spans

    def sync(self) -> None:
        """Make the written rows durable (the end of a job, before the shard's own flush)."""
        with self._lock:
            self._append.flush()
            os.fsync(self._append.fileno())

    # --- reading ------------------------------------------------------------------------------

    def rows(self, span: object) -> np.ndarray | None:
        """The rows at ``span`` (a view of the mapped file), or ``None`` where the span is not
        a place in this file (a missing generation, a file cut short, a malformed value)."""
        try:
            generation, start, count = span  # type: ignore[misc]
            end = start + count
            mapped = self._maps.get(generation)
            if mapped is not None and 0 <= start <= end <= len(mapped):
                return mapped[start:end]  # the common case, cheap: a scan asks once per document
            if not (type(generation) is int and type(start) is int and type(count) is int):
                return None
        except (TypeError, ValueError):
            return None
        if start < 0 or count < 0:
            return None
        mapped = self._mapped(generation, end)
        if mapped is None:
            return None
        return mapped[start:end]

    def _mapped(self, generation: int, rows: int) -> np.ndarray | None:
        """The file of ``generation`` mapped with at least ``rows`` rows (remapped as it grows)."""
        with self._lock:
            return self._mapped_locked(generation, rows)

    def _mapped_locked(self, generation: int, rows: int) -> np.ndarray | None:
        mapped = self._maps.get(generation)
        if mapped is not None and len(mapped) >= rows:
            return mapped
        if generation == self.generation:
            self._append.flush()
        path = self._path(generation)
        try:
            size = path.stat().st_size // self.row_bytes
        except OSError:
            return None
        if size < rows:
            return None
        if size == 0:
            return np.empty((0, self.dim), dtype=self.dtype)
        with open(path, "rb") as f:
            view = mmap.mmap(f.fileno(), size * self.row_bytes, access=mmap.ACCESS_READ)
        # A plain read-only array over the mapping (slicing an np.memmap costs ~10x more, and a
        # scan slices every document).
        mapped = np.frombuffer(view, dtype=self.dtype).reshape(size, self.dim)
        self._maps[generation] = mapped
        return mapped

    # --- compaction ---------------------------------------------------------------------------

    def dead_rows(self, live_rows: int) -> int:
        """Rows in the files that no point refers to, given how many rows points refer to."""
        total = 0
        for generation in self.generations():
            total += self._path(generation).stat().st_size // self.row_bytes
        return max(0, total - live_rows)

    def compact(self, spans: Sequence[object]) -> list[list[int] | None]:
        """Copy the rows at ``spans`` (the live ones, ideally in file order) into a new
        generation file, made durable; their new places (``None`` where a span was not
        readable). The caller points the shard at them, then calls :meth:`retire`."""
        new = self.generation + 1
        path = self._path(new)
        placed: list[list[int] | None] = []
        at = 0
        with open(path, "wb") as out:
            for span in spans:
                rows = self.rows(span)
                if rows is None:
                    placed.append(None)
                    continue
                out.write(np.ascontiguousarray(rows).data)
                placed.append([new, at, len(rows)])
                at += len(rows)
            out.flush()
            os.fsync(out.fileno())
        self._append.close()
        self._append = open(path, "ab")  # noqa: SIM115 - kept open for appends
        self.generation = new
        self.rows_written = at
        return placed

    def retire(self, keep: Iterable[int]) -> None:
        """Delete the generation files not in ``keep`` (the current one always stays)."""
        keep = set(keep) | {self.generation}
        for generation in self.generations():
            if generation not in keep:
                self._maps.pop(generation, None)
                self._path(generation).unlink(missing_ok=True)

    def is_current(self) -> bool:
        """Whether this object still writes to the folder's current file (not one that was
        deleted, as when the shard was dropped)."""
        try:
            open_file = os.fstat(self._append.fileno())
            on_disk = self._path(self.generation).stat()
        except (OSError, ValueError):
            return False
        return (open_file.st_dev, open_file.st_ino) == (on_disk.st_dev, on_disk.st_ino)

    def close(self) -> None:
        self._maps.clear()
        if not self._append.closed:
            self._append.close()


def _reopened_at(handle: BinaryIO, size: int) -> BinaryIO:
    """``handle``'s file cut to ``size`` bytes, open again for appends (the old handle may hold
    unwritten bytes in its buffer: they are dropped, not written later)."""
    path = handle.name
    with contextlib.suppress(OSError):  # its buffer could not be written either
        handle.close()
    with open(path, "r+b") as f:
        f.truncate(size)
    return open(path, "ab")  # noqa: SIM115 - kept open for appends
