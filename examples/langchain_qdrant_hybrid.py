"""BGE-M3 dense + sparse vectors inside langchain-qdrant's own QdrantVectorStore (hybrid search).

    pip install -e "integrations/langchain[qdrant]"
    python examples/langchain_qdrant_hybrid.py          # BAAI/bge-m3 (from the Hugging Face cache)
    python examples/langchain_qdrant_hybrid.py random   # a tiny random checkpoint: runs, ranks nothing

Each text goes through the model once: Qdrant asks for the dense vectors, then the sparse
weights of the same texts, and the sparse embeddings find them in the dense one's cache.
"""

import sys

from langchain_m3connect import M3Embeddings
from langchain_m3connect.qdrant import M3QdrantSparseEmbeddings
from langchain_qdrant import QdrantVectorStore, RetrievalMode

from m3connect import CheckpointError, M3Encoder


def load_encoder(name: str) -> M3Encoder:
    if name != "random":
        try:
            return M3Encoder.from_pretrained(name)
        except CheckpointError as exc:
            print(f"{name} is not available ({str(exc).splitlines()[0]})")
    print("using a random checkpoint: the pipeline runs the same, the rankings mean nothing\n")
    return M3Encoder.from_pretrained("random")  # built once in ~/.cache/m3connect


dense = M3Embeddings(encoder=load_encoder(sys.argv[1] if len(sys.argv) > 1 else "BAAI/bge-m3"))
store = QdrantVectorStore.from_texts(
    [
        "BGE-M3 gives dense, sparse and multi-vector representations from one forward pass.",
        "Its sparse head weighs each token; the lexical score sums the weights of shared tokens.",
        "Reciprocal rank fusion combines rankings without looking at their scores.",
        "Paris is the capital and largest city of France.",
    ],
    dense,
    sparse_embedding=M3QdrantSparseEmbeddings(dense),  # shares dense's settings and cache
    retrieval_mode=RetrievalMode.HYBRID,  # dense + sparse prefetch, fused by Qdrant (RRF)
    location=":memory:",  # or url="http://localhost:6333"
    collection_name="bge-m3",
)
for doc, score in store.similarity_search_with_score("how are lexical weights scored?", k=2):
    print(f"{score:.3f}  {doc.page_content}")
