"""Hybrid BGE-M3 search in Elasticsearch: kNN + sparse_vector fused, re-ranked with ColBERT.

Start a cluster (docs/elasticsearch.md has the docker command), then::

    ES_URL=http://localhost:9200 python examples/elasticsearch_hybrid.py

``ES_API_KEY`` (or ``user:password@`` in ``ES_URL``) for a secured cluster. ``M3_MODEL`` names a
checkpoint (``BAAI/bge-m3`` or a local folder); without it (or with ``M3_MODEL=random``) the
example uses a tiny random checkpoint of the same layout (its rankings then mean nothing).
"""

import os

from elasticsearch import Elasticsearch

from m3connect import Field, M3Encoder, SearchParams
from m3connect.stores.elasticsearch import ElasticsearchStore

client = Elasticsearch(
    os.environ.get("ES_URL", "http://localhost:9200"), api_key=os.environ.get("ES_API_KEY")
)
encoder = M3Encoder.from_pretrained(os.environ.get("M3_MODEL") or "random")

# One index, three native fields: dense_vector, sparse_vector and (Enterprise/trial licence)
# rank_vectors -- or, on the basic licence, compact ColBERT rows scored in the client.
store = ElasticsearchStore(client, index="m3connect-example", encoder=encoder)
print(f"licence features: {store.effective_licence}")

store.add_texts(
    [
        "BGE-M3 gives dense, sparse and multi-vector representations from one forward pass.",
        "Elasticsearch stores learned sparse weights in a sparse_vector field.",
        "ColBERT scores a passage by the best match of each query token: MaxSim.",
        "Reciprocal rank fusion combines rankings without looking at their scores.",
        "BGE-M3은 하나의 모델로 밀집, 희소, 다중 벡터 표현을 모두 만든다.",
    ],
    ids=["m3", "sparse", "colbert", "rrf", "m3-ko"],
    metadatas=[{"lang": "en"}, {"lang": "en"}, {"lang": "en"}, {"lang": "en"}, {"lang": "ko"}],
)

# Dense and sparse legs, RRF (in the server on Enterprise), then ColBERT re-ranks the top 50.
params = SearchParams(mode="hybrid", fusion="rrf", rerank="colbert", candidates=50, k=3)
for hit in store.search("How does one model make three kinds of vectors?", params):
    parts = ", ".join(f"{name} {value:.3f}" for name, value in hit.scores.items())
    print(f"{hit.score:.4f}  {hit.id:<8} ({parts})  {hit.text}")

# The same search, English documents only; weighted fusion of exact scores instead of RRF.
for hit in store.search(
    "sparse lexical weights",
    mode="hybrid",
    fusion="weighted",
    weights=(0.4, 0.2, 0.4),
    filter=Field("lang") == "en",
    k=2,
):
    print(f"{hit.score:.4f}  {hit.id}")

client.indices.delete(index="m3connect-example")
client.close()
