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

import io
import json
import logging
import mmap
import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

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
        self._file = _open_for_writes(path)
        if whole != size:
            self._file.truncate(whole)
        #: Rows in the file (written and handed to the operating system).
        self.rows_written = whole // self.row_bytes
        #: Rows in the file or being written (the end of the last span given out).
        self._rows_reserved = self.rows_written
        self._maps: dict[int, np.ndarray] = {}
        # Reservations and (re)mappings from several threads (reads of mapped rows need no
        # lock); the writes themselves run on one background thread, in reservation order.
        self._lock = threading.RLock()
        self._writer: ThreadPoolExecutor | None = None
        self._writer_pid = 0

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
        spans, written = self.append_later(matrices)
        written.result()
        return spans

    def append_later(self, matrices: Sequence[np.ndarray]) -> tuple[list[list[int]], Future[None]]:
        """Give each matrix's rows a place at the end of the current file and start writing them
        on a background thread: their places now, and a future that is done when the bytes are
        in the operating system's hands (its ``result()`` raises if the write failed).

        A writer prepares the points that refer to these rows while they are written (the
        write syscall runs without the GIL), and waits for the future before it sends them:
        a point never refers to rows that are not in the file. Writes land in the order of
        their reservations; a failed one is cut back to the last whole row, and the writes
        reserved after it fail too (their places are no longer the end of the file)."""
        buffers = []
        for matrix in matrices:
            rows = np.ascontiguousarray(matrix, dtype=self.dtype)
            if rows.ndim != 2 or (len(rows) and rows.shape[1] != self.dim):
                raise ValueError(f"ColBERT rows of shape {rows.shape}, the file holds {self.dim}")
            buffers.append(rows)
        with self._lock:
            start = at = self._rows_reserved
            spans = []
            for rows in buffers:
                spans.append([self.generation, at, len(rows)])
                at += len(rows)
            self._rows_reserved = at
            written = self._background().submit(self._write, self.generation, start, at, buffers)
        return spans, written

    def _background(self) -> ThreadPoolExecutor:
        """The writer thread (made again in a forked child, where the parent's is gone)."""
        if self._writer is None or self._writer_pid != os.getpid():
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="m3connect-colbert-rows")
            self._writer_pid = os.getpid()
        return self._writer

    def _write(self, generation: int, start: int, end: int, buffers: list[np.ndarray]) -> None:
        """Write ``buffers`` as rows ``start`` to ``end`` (on the writer thread)."""
        if generation != self.generation or start != self.rows_written:
            raise OSError(
                f"ColBERT rows {start}-{end} of {self.folder} were not written: an earlier "
                "write to the file failed"
            )
        if start == end:
            return
        try:
            _write_all(self._file.fileno(), buffers, start * self.row_bytes)
        except BaseException:
            # A failed write (a full disk) may leave part of a row: cut the file back to its
            # last whole row, so that later rows stay where their spans say.
            with self._lock:
                try:
                    self._file.truncate(self.rows_written * self.row_bytes)
                finally:
                    self._rows_reserved = self.rows_written
            raise
        self.rows_written = end

    def sync(self) -> None:
        """Make the written rows durable (the end of a job, before the shard's own flush)."""
        self._drain()
        os.fsync(self._file.fileno())

    def _drain(self) -> None:
        """Wait for the writes reserved so far (whether or not they succeeded)."""
        with self._lock:
            writer = self._writer
        if writer is not None and self._writer_pid == os.getpid():
            writer.submit(lambda: None).result()

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
            # A private mapping: arrays over it are writeable, so torch takes them without a
            # warning about read-only memory (nothing writes to them; a write would stay in
            # this process and never reach the file).
            view = mmap.mmap(f.fileno(), size * self.row_bytes, access=mmap.ACCESS_COPY)
        # A plain array over the mapping (slicing an np.memmap costs ~10x more, and a scan
        # slices every document).
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
        self._drain()
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
        with self._lock:
            self._file.close()
            self._file = _open_for_writes(path)
            self.generation = new
            self.rows_written = self._rows_reserved = at
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
            open_file = os.fstat(self._file.fileno())
            on_disk = self._path(self.generation).stat()
        except (OSError, ValueError):
            return False
        return (open_file.st_dev, open_file.st_ino) == (on_disk.st_dev, on_disk.st_ino)

    def close(self) -> None:
        if self._file.closed:
            return
        self._drain()
        if self._writer is not None and self._writer_pid == os.getpid():
            self._writer.shutdown()
        self._writer = None
        self._maps.clear()
        self._file.close()


def _open_for_writes(path: Path) -> io.FileIO:
    """The file, created if missing, open for unbuffered writes at given offsets (not
    appends: a write goes where its rows' spans say)."""
    return io.FileIO(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644), "wb", closefd=True)


def _write_all(fd: int, buffers: Sequence[np.ndarray], offset: int) -> None:
    """Write ``buffers`` one after the other at ``offset``: one ``pwritev`` syscall for all of
    them (the GIL is released for its whole length), repeated after a partial write."""
    views = [memoryview(b).cast("B") for b in buffers if b.nbytes]
    while views:
        done = _pwritev(fd, views[:_IOV_MAX], offset)
        if done <= 0:
            raise OSError(f"writing ColBERT rows at byte {offset} wrote nothing")
        offset += done
        while views and done >= len(views[0]):
            done -= len(views[0])
            views.pop(0)
        if done:
            views[0] = views[0][done:]


def _pwritev_fallback(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """``os.pwritev`` where the platform has none (macOS, Windows): one buffer at a time."""
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, views[0])


_pwritev = getattr(os, "pwritev", _pwritev_fallback)

#: Buffers per pwritev call (the kernel's IOV_MAX).
_IOV_MAX = 1024
