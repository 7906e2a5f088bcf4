"""Milvus Lite crash leftovers (issue 15): a process SIGKILLed at any write step of an add
(collection creation included) leaves nothing that the next attach does not repair: no
orphaned token generation, no missing index, no document half written; the rerun completes.

Each kill runs in a subprocess of its own, on a .db of its own (embedded stores are
single-process); the checks run here once the killed process is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from store_contract import FINGERPRINT, synthetic_corpus, synthetic_embeddings

pymilvus = pytest.importorskip("pymilvus")
from pymilvus import MilvusClient  # noqa: E402

from m3connect.stores.milvus import COMPANION_SUFFIX, PROP_PENDING_PREFIX, MilvusStore  # noqa: E402

# About 25 processes, one Milvus Lite start each: CI runs them, make test-fast leaves them out.
pytestmark = pytest.mark.slow

NAME = "kill"
BATCH = 4
WRITES = (
    "create_collection",
    "create_index",
    "insert",
    "upsert",
    "delete",
    "alter_collection_properties",
    "drop_collection_properties",
)

CHILD = textwrap.dedent(
    """
    import os, signal, sys
    db, mode, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from pymilvus import MilvusClient
    from store_contract import FINGERPRINT
    from m3connect.stores.milvus import MilvusStore
    from test_milvus_crash import BATCH, NAME, WRITES, first_batch, second_batch

    client = MilvusClient(db)
    made = [0]

    class Killing:
        def __getattr__(self, name):
            value = getattr(client, name)
            if name not in WRITES:
                return value

            def call(*args, **kwargs):
                made[0] += 1
                if made[0] == step:
                    os.kill(os.getpid(), signal.SIGKILL)
                return value(*args, **kwargs)

            return call

    if mode == "replace":  # an earlier, complete add; the kill hits the second one
        MilvusStore(client, NAME, fingerprint=FINGERPRINT, batch_size=BATCH).add(*first_batch())
        store = MilvusStore(Killing(), NAME, fingerprint=FINGERPRINT, batch_size=BATCH)
        store.add(*second_batch())
    else:
        store = MilvusStore(Killing(), NAME, fingerprint=FINGERPRINT, batch_size=BATCH)
        store.add(*first_batch())
    print("COMPLETED", made[0])
    """
)


def first_batch():
    ids, embeddings, texts, metadatas = synthetic_corpus(24)
    return ids[:12], embeddings[:12], texts[:12], metadatas[:12]


def second_batch():
    """8 documents of the first batch replaced, 8 new ones."""
    ids, _, _, _ = synthetic_corpus(24)
    return ids[4:20], synthetic_embeddings(16, seed=21), [f"new {i}" for i in range(16)], None


def _run_child(db: Path, mode: str, step: int) -> subprocess.CompletedProcess:
    tests = Path(__file__).parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", CHILD, str(db), mode, str(step)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def _check_repaired_then_resume(db: Path, mode: str) -> None:
    client = MilvusClient(str(db))
    try:
        store = MilvusStore(client, NAME, fingerprint=FINGERPRINT, batch_size=BATCH)  # repairs
        if client.has_collection(NAME):
            _check_consistent(client, store)
            # Documents are wholly old or wholly new, never mixed.
            first_ids, first_emb, first_texts, _ = first_batch()
            second_ids, _, second_texts, _ = second_batch()
            for record in store.get(list(dict.fromkeys(first_ids + second_ids)), with_vectors=True):
                allowed = set()
                if record.id in first_ids:
                    allowed.add(first_texts[first_ids.index(record.id)])
                if record.id in second_ids:
                    allowed.add(second_texts[second_ids.index(record.id)])
                assert record.text in allowed, (record.id, record.text)
            if mode == "replace":
                assert {r.id for r in store.get(first_ids)} == set(first_ids)
        # The rerun (a job resuming) completes, and leaves a consistent store.
        if mode == "replace":  # the first add completed before the kill
            store.add(*second_batch())
            expected = 20
        else:
            store.add(*first_batch())
            expected = 12
        assert store.count() == expected
        _check_consistent(client, store)
        query = (synthetic_embeddings(16, seed=21) if mode == "replace" else first_batch()[1])[3]
        assert store.search(query, mode="colbert", k=1)[0].id == (
            second_batch()[0][3] if mode == "replace" else first_batch()[0][3]
        )
    finally:
        client.close()


def _check_consistent(client: MilvusClient, store: MilvusStore) -> None:
    companion = NAME + COMPANION_SUFFIX
    properties = client.describe_collection(NAME).get("properties") or {}
    assert not [k for k in properties if k.startswith(PROP_PENDING_PREFIX)], properties
    assert {"dense", "sparse"} <= set(client.list_indexes(NAME))
    assert "vec" in set(client.list_indexes(companion))
    docs = client.query(NAME, filter='pk != ""', output_fields=["pk", "colbert_gen", "colbert_len"])
    tokens = client.query(companion, filter="pos >= 0", output_fields=["doc", "gen"], limit=16384)
    per_doc = Counter((t["doc"], t["gen"]) for t in tokens)
    # Every token row belongs to its document's current generation, and all of them are there.
    assert sum(per_doc.values()) == sum(d["colbert_len"] for d in docs)
    for d in docs:
        assert per_doc[(d["pk"], d["colbert_gen"])] == d["colbert_len"], d


@pytest.mark.parametrize("mode", ["create", "replace"])
def test_a_kill_at_any_write_step_is_repaired_on_attach(tmp_path: Path, mode: str) -> None:
    step = 0
    while True:
        step += 1
        assert step < 60, "the add never completed"
        db = tmp_path / f"{mode}-{step}.db"
        proc = _run_child(db, mode, step)
        if proc.returncode == 0:
            assert "COMPLETED" in proc.stdout, proc.stdout
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
        _check_repaired_then_resume(db, mode)
    # The create mode covers both collections' creation and indexes; both cover every write.
    assert step > (10 if mode == "create" else 8)
