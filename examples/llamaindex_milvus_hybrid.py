"""BGE-M3 dense + sparse vectors inside LlamaIndex's own MilvusVectorStore (enable_sparse).

    pip install -e "integrations/llamaindex/llama-index-embeddings-m3connect[milvus]"
    python examples/llamaindex_milvus_hybrid.py          # BAAI/bge-m3 (Hugging Face cache)
    python examples/llamaindex_milvus_hybrid.py random   # a tiny random checkpoint: runs, ranks nothing

Each node goes through the model once when its embedded text is its plain text (LlamaIndex's
Milvus store asks for the sparse weights of ``node.text``), each query once.
"""

import sys
import tempfile
from pathlib import Path

from llama_index.core import Document, StorageContext, VectorStoreIndex
from llama_index.embeddings.m3connect import M3ConnectEmbedding
from llama_index.embeddings.m3connect.milvus import M3MilvusSparseEmbeddingFunction
from llama_index.vector_stores.milvus import MilvusVectorStore

from m3connect import CheckpointError, M3Encoder


def load_encoder(name: str) -> M3Encoder:
    if name != "random":
        try:
            return M3Encoder.from_pretrained(name)
        except CheckpointError as exc:
            print(f"{name} is not available ({str(exc).splitlines()[0]})")
    print("using a random checkpoint: the pipeline runs the same, the rankings mean nothing\n")
    return M3Encoder.from_pretrained("random")  # built once in ~/.cache/m3connect


encoder = load_encoder(sys.argv[1] if len(sys.argv) > 1 else "BAAI/bge-m3")
embed_model = M3ConnectEmbedding(encoder=encoder)
with tempfile.TemporaryDirectory() as folder:
    vector_store = MilvusVectorStore(
        uri=str(Path(folder) / "milvus.db"),  # Milvus Lite; or "http://localhost:19530"
        dim=encoder.dense_dim,
        similarity_metric="IP",  # BGE-M3's dense score is the dot product
        enable_sparse=True,
        sparse_embedding_function=M3MilvusSparseEmbeddingFunction(embed_model),
        hybrid_ranker="RRFRanker",
        hybrid_ranker_params={"k": 60},
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
    retriever = index.as_retriever(vector_store_query_mode="hybrid", similarity_top_k=2)
    for hit in retriever.retrieve("how are lexical weights scored?"):
        print(f"{hit.score:.4f}  {hit.node.get_content()}")
    vector_store.client.close()
