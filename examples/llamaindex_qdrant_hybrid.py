"""BGE-M3 dense + sparse vectors inside LlamaIndex's own QdrantVectorStore (enable_hybrid).

    pip install -e integrations/llamaindex/llama-index-embeddings-m3connect llama-index-vector-stores-qdrant
    python examples/llamaindex_qdrant_hybrid.py          # BAAI/bge-m3 (Hugging Face cache)
    python examples/llamaindex_qdrant_hybrid.py random   # a tiny random checkpoint: runs, ranks nothing

Each node goes through the model once: LlamaIndex embeds it with the embed model, then the
Qdrant store asks for its sparse weights, which the sparse function finds in the embed model's
cache.
"""

import sys

from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.embeddings.m3connect import M3ConnectEmbedding, M3QdrantSparse
from llama_index.vector_stores.qdrant import QdrantVectorStore
from qdrant_client import QdrantClient

from m3connect import CheckpointError, M3Encoder


def load_encoder(name: str) -> M3Encoder:
    if name != "random":
        try:
            return M3Encoder.from_pretrained(name)
        except CheckpointError as exc:
            print(f"{name} is not available ({str(exc).splitlines()[0]})")
    print("using a random checkpoint: the pipeline runs the same, the rankings mean nothing\n")
    return M3Encoder.from_pretrained("random")  # built once in ~/.cache/m3connect


embed_model = M3ConnectEmbedding(
    encoder=load_encoder(sys.argv[1] if len(sys.argv) > 1 else "BAAI/bge-m3")
)
sparse = M3QdrantSparse(embed_model)  # shares embed_model's settings and cache
vector_store = QdrantVectorStore(
    "bge-m3",
    client=QdrantClient(":memory:"),  # or QdrantClient(url="http://localhost:6333")
    enable_hybrid=True,
    sparse_doc_fn=sparse.sparse_doc_fn,
    sparse_query_fn=sparse.sparse_query_fn,
)
index = VectorStoreIndex.from_documents(
    [
        Document(text="BGE-M3 gives dense, sparse and multi-vector representations at once."),
        Document(text="Its sparse head weighs each token; shared tokens' weights are summed."),
        Document(text="Reciprocal rank fusion combines rankings without looking at scores."),
        Document(text="Paris is the capital and largest city of France."),
    ],
    storage_context=StorageContext.from_defaults(vector_store=vector_store),
    embed_model=embed_model,
)
retriever = index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=2, sparse_top_k=4)
for hit in retriever.retrieve("how are lexical weights scored?"):
    print(f"{hit.score:.3f}  {hit.node.get_content()}")
