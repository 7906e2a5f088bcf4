"""BGE-M3 dense + sparse vectors inside langchain-milvus's own Milvus store (hybrid search).

    pip install -e "integrations/langchain[milvus]"
    python examples/langchain_milvus_hybrid.py          # BAAI/bge-m3 (from the Hugging Face cache)
    python examples/langchain_milvus_hybrid.py random   # a tiny random checkpoint: runs, ranks nothing

Each text goes through the model once: Milvus asks for the dense vectors, then the sparse
weights of the same texts, and the sparse embedding finds them in the dense one's cache.
"""

import sys
import tempfile
from pathlib import Path

from langchain_m3connect import M3Embeddings
from langchain_m3connect.milvus import M3MilvusSparseEmbedding
from langchain_milvus import Milvus

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
with tempfile.TemporaryDirectory() as folder:
    store = Milvus.from_texts(
        [
            "BGE-M3 gives dense, sparse and multi-vector representations from one forward pass.",
            "Its sparse head weighs each token; the lexical score sums the weights of shared tokens.",
            "Reciprocal rank fusion combines rankings without looking at their scores.",
            "Paris is the capital and largest city of France.",
        ],
        [dense, M3MilvusSparseEmbedding(dense)],  # the sparse one shares dense's cache
        vector_field=["dense", "sparse"],
        index_params=[
            {"index_type": "FLAT", "metric_type": "IP", "params": {}},  # BGE-M3: dot product
            {"index_type": "SPARSE_INVERTED_INDEX", "metric_type": "IP", "params": {}},
        ],
        connection_args={"uri": str(Path(folder) / "milvus.db")},  # Milvus Lite; or a server
        collection_name="bge_m3",
    )
    results = store.similarity_search_with_score(
        "how are lexical weights scored?",
        k=2,
        param=[{"metric_type": "IP", "params": {}}] * 2,  # exact sparse search (Milvus Lite)
        ranker_type="rrf",
        ranker_params={"k": 60},
    )
    for doc, score in results:
        print(f"{score:.4f}  {doc.page_content}")
    store.client.close()
