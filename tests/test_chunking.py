"""Chunking by tokens: exact substrings, the token limit, overlap, stable ids."""

from __future__ import annotations

import random
from itertools import pairwise

import pytest

from m3connect.chunking import Chunker, ChunkingError, chunk_id, parse_chunk_id
from m3connect.testing import SAMPLE_TEXTS

WORDS = " ".join(SAMPLE_TEXTS).split()


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 200)))
        if i % 4 == 0:
            text = "  " + text.replace(" ", "", 3) + "\n\n"  # long words, edge whitespace
        if i % 5 == 0:
            text = "x" * 300 + " " + text  # a word longer than a chunk
        texts.append(text)
    return texts


@pytest.mark.parametrize(
    ("max_tokens", "overlap"), [(12, 0), (16, 3), (40, 10), (64, 0), (8192, 0)]
)
def test_chunks_fit_and_are_exact_substrings(m3_encoder, max_tokens: int, overlap: int) -> None:
    chunker = Chunker(m3_encoder.tokenizer, max_tokens, overlap)
    texts = _texts(25)
    for doc_no, (text, chunks) in enumerate(
        zip(texts, chunker.chunk_many(range(25), texts), strict=True)
    ):
        counts = m3_encoder.count_tokens([c.text for c in chunks])
        assert all(n <= max_tokens for n in counts)
        assert counts == [c.n_tokens for c in chunks]
        assert [c.id for c in chunks] == [f"{doc_no}#{i}" for i in range(len(chunks))]
        assert all(c.chunk_count == len(chunks) and c.doc_id == doc_no for c in chunks)
        for chunk in chunks:
            assert text[chunk.start : chunk.end] == chunk.text
        assert chunks[0].start == 0 and chunks[-1].end == len(text)
        if overlap == 0:
            assert "".join(c.text for c in chunks) == text  # chunks tile the document
        for a, b in pairwise(chunks):
            assert a.start < b.start <= a.end


def test_one_chunk_is_the_whole_text_with_id_hash_zero(m3_encoder) -> None:
    chunker = Chunker(m3_encoder.tokenizer)
    (chunk,) = chunker.chunk("doc#with#hashes", "  a short text ")
    assert (chunk.id, chunk.text, chunk.chunk_no) == ("doc#with#hashes#0", "  a short text ", 0)
    assert parse_chunk_id(chunk.id) == ("doc#with#hashes", 0)
    meta = chunk.metadata({"lang": "en", "doc_id": "user's"}, "abc")
    assert meta == {
        "lang": "en",
        "doc_id": "doc#with#hashes",
        "chunk_no": 0,
        "chunk_count": 1,
        "char_start": 0,
        "char_end": 15,
        "doc_sha256": "abc",
    }


def test_overlap_shares_tokens(m3_encoder) -> None:
    text = " ".join(WORDS[:120])
    plain = Chunker(m3_encoder.tokenizer, 24, 0).chunk("d", text)
    overlapped = Chunker(m3_encoder.tokenizer, 24, 8).chunk("d", text)
    assert len(overlapped) > len(plain)
    for a, b in pairwise(overlapped):
        assert b.start < a.end  # they share text


def test_cuts_prefer_sentence_and_word_boundaries(m3_encoder) -> None:
    sentences = "The fox is quick. " * 30
    for chunk in Chunker(m3_encoder.tokenizer, 40).chunk("d", sentences)[:-1]:
        assert chunk.text.rstrip().endswith(".")


def test_stable(m3_encoder) -> None:
    chunker = Chunker(m3_encoder.tokenizer, 20, 4)
    texts = _texts(5, seed=3)
    assert chunker.chunk_many(range(5), texts) == chunker.chunk_many(range(5), texts)


def test_bad_settings(m3_encoder) -> None:
    with pytest.raises(ChunkingError, match="overlap"):
        Chunker(m3_encoder.tokenizer, 10, 8)
    with pytest.raises(ChunkingError, match="special tokens"):
        Chunker(m3_encoder.tokenizer, 2)
    with pytest.raises(ValueError):
        parse_chunk_id("no-number")
    assert chunk_id(5, 2) == "5#2"
