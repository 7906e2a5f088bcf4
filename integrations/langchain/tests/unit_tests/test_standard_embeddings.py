"""LangChain's standard unit tests for :class:`M3Embeddings` (random BGE-M3 checkpoint)."""

from __future__ import annotations

from typing import Any

from langchain_m3connect import M3Embeddings
from langchain_tests.unit_tests import EmbeddingsUnitTests

from tests.support import checkpoint_path


class TestM3EmbeddingsStandardUnit(EmbeddingsUnitTests):
    @property
    def embeddings_class(self) -> type[M3Embeddings]:
        return M3Embeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return {"model_name": checkpoint_path(), "model_kwargs": {"device": "cpu"}}
