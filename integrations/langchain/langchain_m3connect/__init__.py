"""LangChain integration of m3connect: BGE-M3 dense, sparse and ColBERT retrieval in the
databases you already run (in-memory, Qdrant, Milvus, Elasticsearch)."""

from importlib import metadata

from langchain_m3connect.embeddings import M3Embeddings
from langchain_m3connect.retrievers import M3HybridRetriever
from langchain_m3connect.vectorstores import SCORE_KEY, SCORES_KEY, M3VectorStore

try:
    __version__ = metadata.version("langchain-m3connect")
except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = ""

__all__ = [
    "M3Embeddings",
    "M3HybridRetriever",
    "M3VectorStore",
    "SCORE_KEY",
    "SCORES_KEY",
    "__version__",
]
