"""Split long documents into chunks of at most ``max_tokens`` tokens, by the model's tokenizer.

A chunk is an exact substring of its document, cut where the tokenizer puts a token boundary,
so the encoder sees exactly the tokens counted here (``<s>`` and ``</s>`` included in
``max_tokens``). Cuts prefer the end of a sentence, then the start of a word, within the last
quarter of a chunk; a word is cut only when it is longer than that. Without overlap the chunks
tile the document: their concatenation is the text.

Chunk ids are stable: ``"{doc_id}#{chunk_no}"``, numbered from 0, **always** (a document of
one chunk is ``"{doc_id}#0"``). So the stored id of a piece of text never depends on how long
the rest of its document is, every stored id parses the same way (:func:`parse_chunk_id`
splits at the last ``#``, so a ``#`` inside a document id is fine), and a job that resumes
asks for the same ids it wrote. The document id, the chunk number and the character span
are in each chunk's metadata (:data:`DOC_ID_KEY`, ...).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from m3connect.types import DocId

__all__ = [
    "Chunk",
    "Chunker",
    "ChunkingError",
    "chunk_id",
    "parse_chunk_id",
    "text_digest",
    "DOC_ID_KEY",
    "CHUNK_NO_KEY",
    "CHUNK_COUNT_KEY",
    "CHAR_START_KEY",
    "CHAR_END_KEY",
    "DOC_HASH_KEY",
    "RESERVED_KEYS",
    "DEFAULT_MAX_TOKENS",
]

#: The positions of BGE-M3: 8192 tokens, ``<s>`` and ``</s>`` included.
DEFAULT_MAX_TOKENS = 8192

# Metadata keys every chunk carries.
DOC_ID_KEY = "doc_id"
CHUNK_NO_KEY = "chunk_no"
CHUNK_COUNT_KEY = "chunk_count"
CHAR_START_KEY = "char_start"
CHAR_END_KEY = "char_end"
#: A short hash of the whole document text: a resumed job re-indexes a document that changed.
DOC_HASH_KEY = "doc_sha256"
RESERVED_KEYS = (
    DOC_ID_KEY,
    CHUNK_NO_KEY,
    CHUNK_COUNT_KEY,
    CHAR_START_KEY,
    CHAR_END_KEY,
    DOC_HASH_KEY,
)

_SENTENCE_END = frozenset(".!?;。！？；\n")
# Cuts are looked for in the last quarter of a chunk.
_CUT_WINDOW = 4


class ChunkingError(ValueError):
    """Bad chunking settings."""


def chunk_id(doc_id: DocId, chunk_no: int) -> str:
    """The stored id of chunk ``chunk_no`` of document ``doc_id``."""
    return f"{doc_id}#{chunk_no}"


def parse_chunk_id(value: str) -> tuple[str, int]:
    """``"a#b#3"`` -> ``("a#b", 3)``; the document id comes back as a string."""
    doc, sep, number = str(value).rpartition("#")
    if not sep or not number.isdigit():
        raise ValueError(f"{value!r} is not a chunk id (doc_id#chunk_no)")
    return doc, int(number)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:16]


@dataclass
class Chunk:
    """One chunk: ``text == document[start:end]``; ``n_tokens`` counts ``<s>``/``</s>``."""

    id: str
    doc_id: DocId
    chunk_no: int
    chunk_count: int
    text: str
    start: int
    end: int
    n_tokens: int

    def metadata(
        self, doc_metadata: dict[str, Any] | None = None, doc_hash: str | None = None
    ) -> dict[str, Any]:
        """The document's metadata plus this chunk's keys (which win over a same-named
        document field)."""
        meta = dict(doc_metadata or {})
        meta.update(
            {
                DOC_ID_KEY: self.doc_id,
                CHUNK_NO_KEY: self.chunk_no,
                CHUNK_COUNT_KEY: self.chunk_count,
                CHAR_START_KEY: self.start,
                CHAR_END_KEY: self.end,
            }
        )
        if doc_hash is not None:
            meta[DOC_HASH_KEY] = doc_hash
        return meta


class Chunker:
    """Cut texts into chunks of at most ``max_tokens`` tokens (specials included) with
    ``overlap`` tokens shared by consecutive chunks.

    ``tokenizer`` is the encoder's (a transformers fast tokenizer, or a ``tokenizers.Tokenizer``).
    """

    def __init__(
        self, tokenizer: Any, max_tokens: int = DEFAULT_MAX_TOKENS, overlap: int = 0
    ) -> None:
        self._backend = _backend(tokenizer)
        self.special_tokens = _special_count(tokenizer, self._backend)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            raise ChunkingError(f"max_tokens must be an integer, got {max_tokens!r}")
        if not isinstance(overlap, int) or isinstance(overlap, bool) or overlap < 0:
            raise ChunkingError(f"overlap must be an integer >= 0, got {overlap!r}")
        if max_tokens <= self.special_tokens:
            raise ChunkingError(
                f"max_tokens ({max_tokens}) must be larger than the {self.special_tokens} special tokens"
            )
        self.max_tokens = max_tokens
        self.overlap = overlap
        if overlap >= self.budget:
            raise ChunkingError(
                f"overlap ({overlap}) must be smaller than the {self.budget} text tokens a chunk "
                f"holds (max_tokens {max_tokens} minus {self.special_tokens} special tokens)"
            )

    @property
    def budget(self) -> int:
        """Text tokens per chunk: ``max_tokens`` minus ``<s>`` and ``</s>``."""
        return self.max_tokens - self.special_tokens

    @property
    def settings(self) -> dict[str, Any]:
        """What goes into the store's fingerprint: a change re-chunks every document."""
        return {"unit": "tokens", "max_tokens": self.max_tokens, "overlap": self.overlap}

    # --- chunking -------------------------------------------------------------------------

    def chunk(self, doc_id: DocId, text: str) -> list[Chunk]:
        return self.chunk_many([doc_id], [text])[0]

    def chunk_many(self, doc_ids: Sequence[DocId], texts: Sequence[str]) -> list[list[Chunk]]:
        """Chunks of each text (one tokenizer call for the batch)."""
        self._reset_backend()
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=False)
        out: list[list[Chunk]] = []
        for doc_id, text, encoding in zip(doc_ids, texts, encodings, strict=True):
            offsets = encoding.offsets
            if len(offsets) <= self.budget:
                out.append(
                    [
                        Chunk(
                            chunk_id(doc_id, 0),
                            doc_id,
                            0,
                            1,
                            text,
                            0,
                            len(text),
                            len(offsets) + self.special_tokens,
                        )
                    ]
                )
                continue
            spans = self._spans(text, offsets)
            out.append(
                [
                    Chunk(chunk_id(doc_id, i), doc_id, i, len(spans), text[s:e], s, e, n)
                    for i, (s, e, n) in enumerate(spans)
                ]
            )
        return out

    def _spans(self, text: str, offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int, int]]:
        """``(char_start, char_end, n_tokens)`` per chunk.

        Cut by the document's token positions; each chunk is then tokenized on its own (what
        the encoder will see) and, in the rare case where that gives more tokens than the
        budget (a cut inside a word can tokenize differently on its own), it is shortened
        before the next chunk is placed, so no text falls between two chunks.
        """
        n = len(offsets)

        # The character where token k starts (a cut before token k); token 0 takes the
        # document's start and the end is the document's end, so the chunks tile the text.
        def cut_char(k: int) -> int:
            if k <= 0:
                return 0
            if k >= n:
                return len(text)
            return offsets[k][0]

        def quality(k: int) -> int:
            c = cut_char(k)
            if c <= 0 or c >= len(text) or c <= cut_char(k - 1):
                return 0  # a token sharing its start with the previous one (e.g. a lone "▁")
            if not text[c - 1].isspace():
                return 1  # inside a word
            j = c - 1
            while j >= 0 and text[j].isspace() and text[j] != "\n":
                j -= 1
            return 3 if j >= 0 and text[j] in _SENTENCE_END else 2

        def best_cut(low: int, high: int) -> int:
            """The best cut position in ``[low, high]``, the latest among equals."""
            best, best_q = high, -1
            for k in range(high, low - 1, -1):
                q = quality(k)
                if q > best_q:
                    best, best_q = k, q
                    if q == 3:
                        break
            return best

        def own_count(s: int, e: int) -> int:
            return len(self._backend.encode(text[s:e], add_special_tokens=False).offsets)

        spans: list[tuple[int, int, int]] = []
        start = 0
        while True:
            limit = start + self.budget
            if limit >= n:
                end = n
            else:
                window = max(1, self.budget // _CUT_WINDOW)
                end = best_cut(max(start + 1, limit - window), limit)
            count = own_count(cut_char(start), cut_char(end))
            while count > self.budget and end > start + 1:
                # Give back the excess, and look for a good cut again below it.
                limit = max(start + 1, end - (count - self.budget))
                window = max(1, (limit - start) // _CUT_WINDOW)
                end = best_cut(max(start + 1, limit - window), limit)
                count = own_count(cut_char(start), cut_char(end))
            spans.append((cut_char(start), cut_char(end), count + self.special_tokens))
            if end >= n:
                return spans
            next_start = end - self.overlap
            if self.overlap:
                # Start the overlap at a word start when one is near.
                low = max(start + 1, next_start - max(1, self.overlap // _CUT_WINDOW))
                candidates = [k for k in range(next_start, low - 1, -1) if quality(k) >= 2]
                next_start = candidates[0] if candidates else next_start
            start = max(start + 1, next_start)

    def _reset_backend(self) -> None:
        # transformers sets truncation/padding on the shared backend tokenizer per call and
        # leaves it set; chunking must see every token.
        if self._backend.truncation is not None:
            self._backend.no_truncation()
        if self._backend.padding is not None:
            self._backend.no_padding()


def _backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        backend is None
        and hasattr(tokenizer, "encode_batch")
        and hasattr(tokenizer, "no_truncation")
    ):
        backend = tokenizer  # a tokenizers.Tokenizer
    if backend is None:
        raise ChunkingError(
            f"chunking needs a fast tokenizer with character offsets, got {type(tokenizer).__name__}"
        )
    return backend


def _special_count(tokenizer: Any, backend: Any) -> int:
    counter = getattr(tokenizer, "num_special_tokens_to_add", None)
    if callable(counter):
        return int(counter(pair=False))
    return len(backend.encode("", add_special_tokens=True).ids)
