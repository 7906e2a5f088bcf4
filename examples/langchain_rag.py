"""Retrieval-augmented generation with LangChain on BGE-M3 hybrid search (m3connect).

    pip install -e integrations/langchain
    python examples/langchain_rag.py                  # BAAI/bge-m3 (from the Hugging Face cache)
    python examples/langchain_rag.py ./bge-m3         # a local checkpoint folder
    python examples/langchain_rag.py random           # a tiny random checkpoint: runs, ranks nothing

``M3_MODEL`` may name the model instead of the argument. When BAAI/bge-m3 cannot be loaded, the
example says so and runs on a random checkpoint.
"""

import os
import sys

from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_m3connect import M3Embeddings, M3HybridRetriever, M3VectorStore

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
embeddings = M3Embeddings(encoder=encoder)

# Any m3connect store works here: QdrantStore, MilvusStore, ElasticsearchStore...
# One forward pass per text fills the dense, sparse and ColBERT fields.
vectorstore = M3VectorStore(InMemoryStore(encoder=encoder), embeddings)
vectorstore.add_texts(
    [
        "BGE-M3 gives dense, sparse and multi-vector representations from one forward pass.",
        "Its sparse head weighs each token; the lexical score sums the weights of shared tokens.",
        "ColBERT scores a passage by the best match of each query token, averaged: MaxSim.",
        "Reciprocal rank fusion combines rankings without looking at their scores.",
        "BGE-M3은 하나의 모델로 밀집, 희소, 다중 벡터 표현을 모두 만든다.",
    ],
    metadatas=[{"lang": "en"}] * 4 + [{"lang": "ko"}],
)

# The paper's hybrid search: dense + sparse candidates (RRF), re-ranked by
# 0.4 * dense + 0.2 * lexical + 0.4 * ColBERT. Scores land in each document's metadata.
retriever = M3HybridRetriever(vectorstore=vectorstore, k=2, rerank="all")
question = "How does one model produce three kinds of vectors?"
for doc in retriever.invoke(question):
    scores = ", ".join(f"{name} {value:.3f}" for name, value in doc.metadata["m3_scores"].items())
    print(f"{doc.metadata['m3_score']:.4f} ({scores})  {doc.page_content}")

prompt = ChatPromptTemplate.from_template(
    "Answer from the context only.\n\nContext:\n{context}\n\nQuestion: {question}"
)
llm = FakeListChatModel(responses=["(your chat model's answer)"])  # e.g. ChatOpenAI(...)
chain = (
    {
        "context": retriever | (lambda docs: "\n".join(d.page_content for d in docs)),
        "question": RunnablePassthrough(),
    }
    | prompt
    | llm
    | StrOutputParser()
)
print("\n" + chain.invoke(question))

# The same store as a plain LangChain vector store: any mode, fusion, re-rank and filter.
for doc, score in vectorstore.similarity_search_with_score(
    "lexical weights", k=2, mode="sparse", filter={"lang": "en"}
):
    print(f"{score:.4f}  {doc.page_content}")
