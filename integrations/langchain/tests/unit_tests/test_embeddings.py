"""M3Embeddings: dense vectors for LangChain, all three representations for stores."""

from __future__ import annotations

import numpy as np
import pytest
from langchain_m3connect import M3Embeddings

from m3connect.encoder import M3Encoder
from tests.support import TEXTS, checkpoint_path


def test_dense_vectors_are_the_encoders(embeddings: M3Embeddings, encoder: M3Encoder) -> None:
    vectors = embeddings.embed_documents(TEXTS[:3])
    expected = encoder.encode(TEXTS[:3]).dense
    assert np.allclose(np.array(vectors), expected, atol=1e-6)
    assert all(isinstance(x, float) for x in vectors[0])
    query = embeddings.embed_query("late interaction")
    assert np.allclose(query, encoder.encode_query("late interaction").dense, atol=1e-6)
    assert embeddings.embed_documents([]) == []


def test_all_three_representations(embeddings: M3Embeddings, encoder: M3Encoder) -> None:
    out = embeddings.embed_documents_m3(TEXTS[:2])
    expected = encoder.encode(TEXTS[:2])
    assert out.parts == ("dense", "sparse", "colbert")
    assert np.allclose(out.dense, expected.dense)
    # (Served from the session's cache, encoded in another batch: floats may differ by 1e-7.)
    for got_w, want_w in zip(out.sparse, expected.sparse, strict=True):
        assert got_w == pytest.approx(want_w, abs=1e-6)
    for got, want in zip(out.colbert, expected.colbert, strict=True):
        assert np.allclose(got, want, atol=1e-6)
    query = embeddings.embed_query_m3("what is fusion?")
    assert query.dense is not None and query.sparse is not None and query.colbert is not None


async def test_async_matches_sync(embeddings: M3Embeddings) -> None:
    assert np.allclose(
        await embeddings.aembed_documents(TEXTS[:2]), embeddings.embed_documents(TEXTS[:2])
    )
    assert np.allclose(await embeddings.aembed_query("seoul"), embeddings.embed_query("seoul"))
    out = await embeddings.aembed_documents_m3(TEXTS[:2])
    assert out.sparse == embeddings.embed_documents_m3(TEXTS[:2]).sparse
    query = await embeddings.aembed_query_m3("seoul")
    assert query.sparse == embeddings.embed_query_m3("seoul").sparse


def test_built_from_a_path_or_an_encoder(encoder: M3Encoder) -> None:
    loaded = M3Embeddings(model_name=checkpoint_path(), model_kwargs={"device": "cpu"})
    assert loaded.m3_encoder.fingerprint == encoder.fingerprint
    assert M3Embeddings(encoder=encoder).model_name == encoder.name
    with pytest.raises(ValueError):
        M3Embeddings(encoder=encoder, no_such_option=1)


def test_encode_kwargs_are_passed(encoder: M3Encoder) -> None:
    short = M3Embeddings(encoder=encoder, encode_kwargs={"max_length": 4})
    out = short.embed_documents_m3([TEXTS[0]])
    assert out.colbert[0].shape[0] == 3  # 4 tokens with <s> and </s>; ColBERT drops <s>
