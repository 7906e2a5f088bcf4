"""BGE-M3 hybrid retrieval in LlamaIndex (m3connect): chunk and encode once, retrieve two ways.

    pip install -e integrations/llamaindex/llama-index-embeddings-m3connect \
                -e integrations/llamaindex/llama-index-vector-stores-m3connect \
                -e integrations/llamaindex/llama-index-retrievers-m3connect
    python examples/llamaindex_retriever.py           # BAAI/bge-m3 (from the Hugging Face cache)
    python examples/llamaindex_retriever.py ./bge-m3  # a local checkpoint folder
    python examples/llamaindex_retriever.py random    # a tiny random checkpoint: runs, ranks nothing

``M3_MODEL`` may name the model instead of the argument. When BAAI/bge-m3 cannot be loaded, the
example says so and runs on a random checkpoint.
"""

import os
import sys

from llama_index.core import Document, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.vector_stores import MetadataFilter, MetadataFilters
from llama_index.embeddings.m3connect import M3ConnectEmbedding
from llama_index.retrievers.m3connect import M3HybridRetriever
from llama_index.vector_stores.m3connect import M3VectorStore

from m3connect import CheckpointError, InMemoryStore, M3Encoder


def load_encoder(name: str) -> M3Encoder:
    if name != "random":
        try:
            return M3Encoder.from_pretrained(name)
        except CheckpointError as exc:
            print(f"{name} is not available ({str(exc).splitlines()[0]})")
    print("using a random checkpoint: the pipeline runs the same, the rankings mean nothing\n")
    return M3Encoder.from_pretrained("random")  # built once in ~/.cache/m3connect


encoder = load_encoder(
    sys.argv[1] if len(sys.argv) > 1 else os.environ.get("M3_MODEL", "BAAI/bge-m3")
)

# Any m3connect store works here: QdrantStore, MilvusStore, ElasticsearchStore...
vector_store = M3VectorStore(InMemoryStore(encoder=encoder))
documents = [
    Document(
        text="BGE-M3 gives dense, sparse and multi-vector representations from one forward pass. "
        "Its sparse head weighs each token; the lexical score sums the weights of shared tokens.",
        metadata={"topic": "model"},
    ),
    Document(
        text="ColBERT scores a passage by the best match of each query token, averaged: MaxSim. "
        "Reciprocal rank fusion combines rankings without looking at their scores.",
        metadata={"topic": "search"},
    ),
]
# Chunk, then add: the vector store encodes each chunk once, for all three representations.
nodes = SentenceSplitter(chunk_size=64, chunk_overlap=0).get_nodes_from_documents(documents)
vector_store.add(nodes)

question = "How is a passage scored token by token?"

# 1. The paper's hybrid search: dense + sparse candidates, re-ranked with all three scores.
retriever = M3HybridRetriever(vector_store, similarity_top_k=2, rerank="all")
for hit in retriever.retrieve(question):
    scores = ", ".join(
        f"{name} {value:.3f}" for name, value in hit.node.metadata["m3_scores"].items()
    )
    print(f"{hit.score:.4f} ({scores})  {hit.node.get_content()}")

# 2. A VectorStoreIndex over the same store: LlamaIndex's query modes and metadata filters.
index = VectorStoreIndex.from_vector_store(
    vector_store, embed_model=M3ConnectEmbedding(encoder=encoder)
)
hybrid = index.as_retriever(
    vector_store_query_mode="hybrid",
    similarity_top_k=2,
    filters=MetadataFilters(filters=[MetadataFilter(key="topic", value="search")]),
)
print()
for hit in hybrid.retrieve(question):
    print(f"{hit.score:.4f}  [{hit.node.metadata['topic']}] {hit.node.get_content()}")

# 3. Deleting a source document removes all of its chunks.
vector_store.delete(documents[0].doc_id)
print(
    f"\n{vector_store.client.count()} of {len(nodes)} chunks left after deleting the first document"
)
