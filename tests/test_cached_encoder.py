"""CachedEncoder: one forward pass per text and settings, a bounded cache, checked settings."""

from __future__ import annotations

import numpy as np
import pytest

from m3connect.cached_encoder import CachedEncoder, check_encode_kwargs
from m3connect.encoder import M3Encoder
from m3connect.testing import SAMPLE_TEXTS, ForwardPassCounter

TEXTS = list(SAMPLE_TEXTS[:6])


def test_second_request_for_other_parts_needs_no_pass(m3_encoder: M3Encoder) -> None:
    cached = CachedEncoder(m3_encoder)
    cached.need("sparse")
    with ForwardPassCounter(m3_encoder) as passes:
        dense = cached.encode_documents(TEXTS, ("dense",))
        sparse = cached.encode_documents(TEXTS[::-1], ("sparse",))
        assert passes.texts == len(TEXTS)
        # ColBERT was not computed: asking for it encodes again, once per text.
        colbert = cached.encode_documents(TEXTS[:2], ("colbert",))
        assert passes.texts == len(TEXTS) + 2
    want = m3_encoder.encode(TEXTS)
    assert dense.sparse is None and dense.colbert is None
    np.testing.assert_allclose(dense.dense, want.dense, atol=1e-6)
    for got, expected in zip(sparse.sparse[::-1], want.sparse, strict=True):
        assert got == pytest.approx(expected, abs=1e-6)
    np.testing.assert_allclose(colbert.colbert[1], want.colbert[1], atol=1e-6)
    assert cached.hits == len(TEXTS) and cached.misses == len(TEXTS) + 2


def test_settings_that_change_the_vectors_are_part_of_the_key(m3_encoder: M3Encoder) -> None:
    cached = CachedEncoder(
        m3_encoder,
        encode_kwargs={"max_length": 6, "batch_tokens": 64},
        query_encode_kwargs={"max_length": 5},
    )
    with ForwardPassCounter(m3_encoder) as passes:
        doc = cached.encode_documents(TEXTS[:1])
        query = cached.encode_query(TEXTS[0])
        assert passes.texts == 2  # different max_length: different vectors
        assert cached.encode_query(TEXTS[0]).colbert.shape == query.colbert.shape
        assert passes.texts == 2
    assert doc.colbert[0].shape[0] == 5 and query.colbert.shape[0] == 4
    np.testing.assert_allclose(query.dense, m3_encoder.encode_query(TEXTS[0], max_length=5).dense)


def test_duplicates_in_one_batch_are_encoded_once(m3_encoder: M3Encoder) -> None:
    cached = CachedEncoder(m3_encoder)
    with ForwardPassCounter(m3_encoder) as passes:
        out = cached.encode_documents([TEXTS[0], TEXTS[1], TEXTS[0]])
        assert passes.texts == 2
    np.testing.assert_array_equal(out.dense[0], out.dense[2])
    assert len(cached.encode_documents([])) == 0


def test_cache_is_bounded_least_recently_used_first(m3_encoder: M3Encoder) -> None:
    cached = CachedEncoder(m3_encoder, max_entries=3)
    cached.encode_documents(TEXTS[:3])
    cached.encode_documents(TEXTS[:1])  # TEXTS[0] is now the most recent
    cached.encode_documents(TEXTS[3:4])  # evicts TEXTS[1], the least recent
    with ForwardPassCounter(m3_encoder) as passes:
        cached.encode_documents([TEXTS[0], TEXTS[2], TEXTS[3]])
        assert passes.texts == 0
        cached.encode_documents(TEXTS[1:2])
        assert passes.texts == 1
    small = CachedEncoder(m3_encoder, max_bytes=1)  # nothing fits: every request encodes
    small.encode_documents(TEXTS[:2])
    with ForwardPassCounter(m3_encoder) as passes:
        small.encode_documents(TEXTS[:2])
        assert passes.texts == 2
    off = CachedEncoder(m3_encoder, max_entries=0)
    off.encode_documents(TEXTS[:1])
    with ForwardPassCounter(m3_encoder) as passes:
        off.encode_documents(TEXTS[:1])
        assert passes.texts == 1


def test_settings_are_checked() -> None:
    assert check_encode_kwargs({"max_length": 8}, "encode_kwargs") == {"max_length": 8}
    with pytest.raises(TypeError, match="unknown encode_kwargs max_lenght"):
        check_encode_kwargs({"max_lenght": 8}, "encode_kwargs")
    with pytest.raises(TypeError, match="must not choose the representations"):
        check_encode_kwargs({"sparse": False}, "query_encode_kwargs")


def test_bad_input(m3_encoder: M3Encoder) -> None:
    cached = CachedEncoder(m3_encoder)
    with pytest.raises(TypeError, match="not one string"):
        cached.encode_documents("one text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nothing to compute"):
        cached.encode_documents(TEXTS, ())
    with pytest.raises(ValueError, match="unknown representation"):
        cached.need("bm25")
    with pytest.raises(TypeError, match="M3Encoder"):
        CachedEncoder("BAAI/bge-m3")  # type: ignore[arg-type]
