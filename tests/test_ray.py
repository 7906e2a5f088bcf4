"""``--ray``: the same job on Ray Data gives the same stored data as the single-process job.

The Ray run starts a local instance (``num_cpus=2``) and two encoder actors: about 20-40 s on a
2-core machine, most of it Ray and the actors starting (marked ``slow``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_indexing import MAX_TOKENS, CountingEncoder, all_ids, assert_same_content, write_corpus

from m3connect.indexing import IndexJob, RayEncodeWorker, RayOptions
from m3connect.stores.memory import InMemoryStore
from m3connect.uris import open_store

ray = pytest.importorskip(
    "ray", reason="Ray Data is an optional extra: pip install 'm3connect[ray]'"
)


@pytest.mark.slow
def test_ray_job_stores_the_same_data(m3_encoder, m3_checkpoint, tmp_path) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl", 30)
    single = InMemoryStore()
    IndexJob(m3_encoder, [single], max_tokens=MAX_TOKENS).run(corpus)

    # Embedded stores (one process per file): the actors encode, the driver writes.
    uris = [f"qdrant:{tmp_path / 'q'}", "memory:#ray-test"]
    options = RayOptions(concurrency=2, batch_size=16, init_kwargs={"num_cpus": 2})
    counting = CountingEncoder(m3_encoder)
    summary = IndexJob(
        counting, uris, max_tokens=MAX_TOKENS, ray=options, model=str(m3_checkpoint)
    ).run(corpus)
    assert counting.encoded == 0  # the driver encoded nothing
    assert (summary.docs, summary.indexed, summary.chunks) == (30, 30, single.count())
    assert not ray.is_initialized()  # the job started Ray and shut it down
    ids = all_ids(single)
    for uri in uris:
        with open_store(uri) as handle:
            assert handle.store.count() == single.count()
            assert all_ids(handle.store) == ids
            assert_same_content(single, handle.store, ids)

    # Resumable the same way, without starting Ray when nothing is left to encode.
    again = IndexJob(m3_encoder, uris[:1], max_tokens=MAX_TOKENS, ray=options).run(corpus)
    assert (again.skipped, again.indexed) == (30, 0)
    assert not ray.is_initialized()


def test_worker_writes_to_server_stores(m3_checkpoint, m3_encoder, tmp_path) -> None:
    """The actor class, run in this process: it encodes, writes to the stores it was given
    (here a shared in-memory store stands for a server) and returns the ids only."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", 6)
    single = InMemoryStore()
    job = IndexJob(m3_encoder, [single], max_tokens=MAX_TOKENS)
    job.run(corpus)
    ids = all_ids(single)
    records = single.get(ids)

    worker = RayEncodeWorker(
        model=str(m3_checkpoint),
        max_tokens=MAX_TOKENS,
        batch_tokens=None,
        store_uris=["memory:#ray-worker-test", ""],
        write_indices=[0],
        fingerprint_json=job.fingerprint.to_json(),
        return_vectors=False,
        num_threads=1,
    )
    batch = {
        "id": np.array(ids, dtype=object),
        "text": np.array([r.text for r in records], dtype=object),
        "metadata": np.array([json.dumps(r.metadata) for r in records], dtype=object),
        "mask": np.array([1] * len(ids)),  # store 0 needs every row
    }
    out = worker(batch)
    assert list(out) == ["id"] and list(out["id"]) == ids
    with open_store("memory:#ray-worker-test") as handle:
        assert handle.store.count() == len(ids)
        assert_same_content(single, handle.store, ids)

    with_vectors = RayEncodeWorker(
        str(m3_checkpoint), MAX_TOKENS, None, [""], [], job.fingerprint.to_json(), True
    )
    out = with_vectors(batch)
    assert len(out["vectors"]) == len(ids)
