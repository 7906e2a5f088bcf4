"""BGE-M3 in Qdrant: dense and sparse retrieval fused by Qdrant, ColBERT re-rank of the fused
candidates in the same query, and the paper's "All" score, on qdrant-client's local mode::

    python examples/qdrant_hybrid.py

``M3_MODEL`` names a checkpoint (``BAAI/bge-m3`` or a local folder); without it (or with
``M3_MODEL=random``) the example uses a tiny random checkpoint of the same layout, so it runs
anywhere (its rankings then mean nothing). ``QDRANT_URL`` (e.g. ``http://localhost:6333``) uses a Qdrant server instead of a
local folder: the code is the same.
"""

import atexit
import os
import tempfile
from pathlib import Path

from qdrant_client import QdrantClient

from m3connect import Field, M3Encoder, SearchParams
from m3connect.stores.qdrant import QdrantStore

encoder = M3Encoder.from_pretrained(os.environ.get("M3_MODEL") or "random")

workdir = tempfile.TemporaryDirectory(prefix="m3connect-qdrant-")  # removed at exit
url = os.environ.get("QDRANT_URL")
client = QdrantClient(url=url) if url else QdrantClient(path=str(Path(workdir.name) / "qdrant"))

# One collection, three native fields: a dense vector (Dot), a sparse vector (the learned
# lexical weights, no IDF) and a ColBERT multivector (MAX_SIM, no HNSW graph: it re-ranks).
# Reopening it with another model's encoder raises FingerprintMismatchError.
store = QdrantStore(client, "m3connect_example", encoder, close_client=True)
atexit.register(store.close)  # closed at exit even after an error (before the folder goes)

store.add_texts(
    [
        "BGE-M3 gives dense, sparse and multi-vector representations from one forward pass.",
        "Qdrant keeps learned sparse weights in a named sparse vector.",
        "ColBERT scores a passage by the best match of each query token: MaxSim.",
        "Reciprocal rank fusion combines rankings without looking at their scores.",
        "BGE-M3은 하나의 모델로 밀집, 희소, 다중 벡터 표현을 모두 만든다.",
    ],
    ids=["m3", "sparse", "colbert", "rrf", "m3-ko"],
    metadatas=[{"lang": "en"}, {"lang": "en"}, {"lang": "en"}, {"lang": "en"}, {"lang": "ko"}],
)

# Dense and sparse legs fused with RRF by Qdrant, then ColBERT re-ranks the 50 best: one
# query_points call. Every hit carries the exact score of each representation the search used
# (ColBERT as the mean over query tokens, as in the paper; Qdrant's MAX_SIM is the sum).
question = "How does one model make three kinds of vectors?"
params = SearchParams(mode="hybrid", fusion="rrf", rerank="colbert", candidates=50, k=3)
for hit in store.search(question, params):
    parts = ", ".join(f"{name} {value:.3f}" for name, value in hit.scores.items())
    print(f"{hit.score:.4f}  {hit.id:<8} ({parts})  {hit.text}")

# The paper's "All": re-rank by 0.4 dense + 0.2 sparse + 0.4 ColBERT, computed by Qdrant with a
# formula over the fused candidates.
for hit in store.search(question, mode="hybrid", rerank="all", weights=(0.4, 0.2, 0.4), k=2):
    print(f"{hit.score:.4f}  {hit.id}")

# ColBERT alone over the whole collection, English only (filters apply inside every leg).
for hit in store.search("late interaction", mode="colbert", filter=Field("lang") == "en", k=2):
    print(f"{hit.score:.4f}  {hit.id}")

store.delete(filter={})  # empty the collection (the fingerprint stays with it)
