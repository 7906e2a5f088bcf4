"""BGE-M3 in Milvus: dense + sparse retrieval fused by the server, ColBERT re-rank and exact
ColBERT search, on a Milvus Lite file (no server needed)::

    python examples/milvus_colbert.py

``M3_MODEL`` names a checkpoint (``BAAI/bge-m3`` or a local folder); without it (or with
``M3_MODEL=random``) the example uses a tiny random checkpoint of the same layout, so it runs
anywhere (its rankings then mean nothing). ``MILVUS_URI`` (e.g. ``http://localhost:19530``) uses a Milvus server instead:
from 2.6.4 the ColBERT vectors go to an Array-of-Struct field with MAX_SIM, on Lite and older
servers to a companion collection of token rows. The code is the same.
"""

import atexit
import os
import tempfile
from pathlib import Path

from m3connect import Field, M3Encoder, SearchParams
from m3connect.stores.milvus import MilvusStore

encoder = M3Encoder.from_pretrained(os.environ.get("M3_MODEL") or "random")

workdir = tempfile.TemporaryDirectory(prefix="m3connect-milvus-")  # removed at exit
store = MilvusStore.from_uri(
    os.environ.get("MILVUS_URI", str(Path(workdir.name) / "m3.db")), "m3connect_example", encoder
)
atexit.register(store.close)  # closed at exit even after an error (before the folder goes)
print(f"Milvus {store.server_version}: ColBERT vectors in the {store.layout} layout")

store.add_texts(
    [
        "BGE-M3 gives dense, sparse and multi-vector representations from one forward pass.",
        "Milvus keeps learned sparse weights in a SPARSE_FLOAT_VECTOR field.",
        "ColBERT scores a passage by the best match of each query token: MaxSim.",
        "Reciprocal rank fusion combines rankings without looking at their scores.",
        "BGE-M3은 하나의 모델로 밀집, 희소, 다중 벡터 표현을 모두 만든다.",
    ],
    ids=["m3", "sparse", "colbert", "rrf", "m3-ko"],
    metadatas=[{"lang": "en"}, {"lang": "en"}, {"lang": "en"}, {"lang": "en"}, {"lang": "ko"}],
)

# Dense and sparse legs fused with RRF, then ColBERT re-ranks the 50 best. Every hit carries
# the exact score of each representation the search used.
params = SearchParams(mode="hybrid", fusion="rrf", rerank="colbert", candidates=50, k=3)
for hit in store.search("How does one model make three kinds of vectors?", params):
    parts = ", ".join(f"{name} {value:.3f}" for name, value in hit.scores.items())
    print(f"{hit.score:.4f}  {hit.id:<8} ({parts})  {hit.text}")

# ColBERT alone over the whole collection (exact MaxSim, mean over query tokens), English only.
for hit in store.search("late interaction", mode="colbert", filter=Field("lang") == "en", k=2):
    print(f"{hit.score:.4f}  {hit.id}")

store.delete(filter={})  # documents and their token rows go together
