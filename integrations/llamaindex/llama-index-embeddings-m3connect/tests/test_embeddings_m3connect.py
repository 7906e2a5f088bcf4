"""M3ConnectEmbedding: BGE-M3 dense vectors for LlamaIndex, all three representations on request."""

from __future__ import annotations

import numpy as np
import pytest
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.embeddings.m3connect import M3ConnectEmbedding

from m3connect.encoder import M3Encoder
from tests.conftest import TEXTS


@pytest.fixture(scope="module")
def embed_model(encoder: M3Encoder) -> M3ConnectEmbedding:
    return M3ConnectEmbedding(encoder=encoder)


def test_class(embed_model: M3ConnectEmbedding, encoder: M3Encoder) -> None:
    assert isinstance(embed_model, BaseEmbedding)
    assert M3ConnectEmbedding.class_name() == "M3ConnectEmbedding"
    assert embed_model.model_name == encoder.name
    assert embed_model.encoder is encoder


def test_dense_vectors_are_the_encoders(
    embed_model: M3ConnectEmbedding, encoder: M3Encoder
) -> None:
    vectors = embed_model.get_text_embedding_batch(TEXTS)
    assert np.allclose(np.array(vectors), encoder.encode(TEXTS).dense, atol=1e-6)
    assert np.allclose(embed_model.get_text_embedding(TEXTS[0]), vectors[0], atol=1e-6)
    query = embed_model.get_query_embedding("late interaction")
    assert np.allclose(query, encoder.encode_query("late interaction").dense, atol=1e-6)
    assert all(isinstance(x, float) for x in query)
    assert embed_model._get_text_embeddings([]) == []


def test_all_three_representations(embed_model: M3ConnectEmbedding, encoder: M3Encoder) -> None:
    out = embed_model.get_m3_text_embeddings(TEXTS[:2])
    expected = encoder.encode(TEXTS[:2])
    assert out.parts == ("dense", "sparse", "colbert")
    assert out.sparse == expected.sparse
    assert all(np.allclose(a, b) for a, b in zip(out.colbert, expected.colbert, strict=True))
    query = embed_model.get_m3_query_embedding("fusion")
    assert query.sparse == encoder.encode_query("fusion").sparse


async def test_async_matches_sync(embed_model: M3ConnectEmbedding) -> None:
    assert np.allclose(
        await embed_model.aget_text_embedding_batch(TEXTS[:3]),
        embed_model.get_text_embedding_batch(TEXTS[:3]),
    )
    assert np.allclose(
        await embed_model.aget_query_embedding("seoul"), embed_model.get_query_embedding("seoul")
    )
    out = await embed_model.aget_m3_text_embeddings(TEXTS[:2])
    assert out.sparse == embed_model.get_m3_text_embeddings(TEXTS[:2]).sparse
    query = await embed_model.aget_m3_query_embedding("seoul")
    assert query.sparse == embed_model.get_m3_query_embedding("seoul").sparse


def test_loads_a_checkpoint_and_passes_encode_kwargs(
    checkpoint_path: str, encoder: M3Encoder
) -> None:
    loaded = M3ConnectEmbedding(
        checkpoint_path, model_kwargs={"device": "cpu"}, encode_kwargs={"max_length": 4}
    )
    assert loaded.encoder.fingerprint == encoder.fingerprint
    assert loaded.model_name == checkpoint_path
    assert loaded.get_m3_text_embeddings([TEXTS[0]]).colbert[0].shape[0] == 3


def test_old_name_is_a_deprecated_alias() -> None:
    import llama_index.embeddings.m3connect as package

    with pytest.warns(DeprecationWarning, match="M3ConnectEmbedding"):
        assert package.M3Embedding is M3ConnectEmbedding


def test_encode_settings_are_checked_before_loading() -> None:
    with pytest.raises(TypeError, match="max_lenght"):
        M3ConnectEmbedding("no/such-model", encode_kwargs={"max_lenght": 8})
    with pytest.raises(TypeError, match="must not choose"):
        M3ConnectEmbedding("no/such-model", encode_kwargs={"colbert": False})


def test_one_pass_per_text_for_dense_then_all_three(encoder: M3Encoder) -> None:
    from m3connect.testing import ForwardPassCounter

    embed_model = M3ConnectEmbedding(encoder=encoder, encode_kwargs={"max_length": 8})
    embed_model.cached_encoder.need("sparse", "colbert")
    with ForwardPassCounter(encoder) as passes:
        dense = embed_model.get_text_embedding_batch(TEXTS)
        everything = embed_model.get_m3_text_embeddings(TEXTS)
        assert passes.texts == len(TEXTS)
    expected = encoder.encode(TEXTS, max_length=8)
    assert np.allclose(np.array(dense), expected.dense, atol=1e-6)
    assert everything.sparse == expected.sparse
    assert [c.shape for c in everything.colbert] == [c.shape for c in expected.colbert]
    assert all(c.shape[0] <= 7 for c in everything.colbert)
