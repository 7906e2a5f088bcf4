"""Scoring and fusion against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from m3connect import fusion
from m3connect.scoring import (
    colbert_scores,
    combine_scores,
    compute_score,
    dense_scores,
    lexical_score,
    lexical_scores,
)
from m3connect.types import M3Embedding, M3Output, sparse_from_string_keys, sparse_to_string_keys


def test_dense_is_the_dot_product():
    q = np.array([0.6, 0.8], dtype=np.float32)
    docs = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    np.testing.assert_allclose(dense_scores(q, docs), [0.6, 0.8, 1.0], rtol=1e-7)


def test_dense_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes"):
        dense_scores(np.ones(3), np.ones((2, 4)))


def test_lexical_sums_products_of_shared_tokens():
    q = {10: 0.5, 20: 0.25, 30: 1.0}
    p = {10: 0.2, 30: 0.3, 40: 9.0}
    # 0.5*0.2 + 1.0*0.3 = 0.4; token 20 and 40 are not shared
    assert lexical_score(q, p) == pytest.approx(0.4, abs=1e-15)
    np.testing.assert_allclose(lexical_scores(q, [p, {}, {20: 2.0}]), [0.4, 0.0, 0.5])


def test_colbert_is_the_mean_over_query_rows_of_the_best_match():
    q = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    d1 = np.array([[0.6, 0.8], [1.0, 0.0]], dtype=np.float32)  # best: 1.0 for q0, 0.8 for q1
    d2 = np.array([[0.0, -1.0]], dtype=np.float32)  # best: 0.0 for q0, -1.0 for q1
    d3 = np.zeros((0, 2), dtype=np.float32)
    np.testing.assert_allclose(colbert_scores(q, [d1, d2, d3]), [0.9, -0.5, 0.0], rtol=1e-7)


def test_colbert_blocks_give_the_same_answer(monkeypatch):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 8)).astype(np.float32)
    docs = [rng.normal(size=(int(n), 8)).astype(np.float16) for n in rng.integers(1, 30, size=50)]
    whole = colbert_scores(q, docs)
    monkeypatch.setattr("m3connect.scoring._COLBERT_BLOCK_ELEMENTS", 5 * 7)  # tiny blocks
    np.testing.assert_allclose(colbert_scores(q, docs), whole, rtol=1e-6)
    by_hand = [np.mean(np.max(q @ d.astype(np.float32).T, axis=1)) for d in docs]
    np.testing.assert_allclose(whole, by_hand, rtol=1e-5)


def _colbert_by_loop(query, docs):
    """The definition, one document at a time in float64."""
    q = np.asarray(query, dtype=np.float64)
    return [
        float(np.mean(np.max(q @ np.asarray(d, dtype=np.float64).T, axis=1))) if len(d) else 0.0
        for d in docs
    ]


@pytest.fixture(params=["torch", "numpy"])
def backend(request, monkeypatch):
    """The core's two ways to compute a block: torch (when importable) and numpy."""
    if request.param == "numpy":
        monkeypatch.setattr("m3connect.scoring._TORCH", False)
    else:
        pytest.importorskip("torch")
    return request.param


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_colbert_batched_equals_the_loop_on_ragged_documents(dtype, backend, monkeypatch):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(7, 16)).astype(np.float32)
    lengths = [1, 0, 5, 1, 40, 0, 3, 1, 17, 2]
    docs = [rng.normal(size=(n, 16)).astype(dtype) for n in lengths]
    expected = _colbert_by_loop(q, docs)
    assert expected[1] == 0.0 and expected[5] == 0.0
    np.testing.assert_allclose(colbert_scores(q, docs), expected, rtol=1e-5, atol=1e-6)
    # Blocks of 4 rows: documents split across blocks, one document longer than a block.
    monkeypatch.setattr("m3connect.scoring._COLBERT_BLOCK_ELEMENTS", 4 * 16)
    np.testing.assert_allclose(colbert_scores(q, docs), expected, rtol=1e-5, atol=1e-6)
    # Nothing of an input is changed, and a float16 query counts as its float32 values.
    np.testing.assert_allclose(
        colbert_scores(q.astype(np.float16), docs),
        _colbert_by_loop(q.astype(np.float16), docs),
        rtol=1e-5,
        atol=1e-6,
    )


def test_colbert_one_row_documents_and_edge_cases(backend):
    rng = np.random.default_rng(4)
    q = rng.normal(size=(3, 8)).astype(np.float32)
    single = [rng.normal(size=(1, 8)).astype(np.float16) for _ in range(30)]
    # One row: the score is the mean of the query rows' dot products with it.
    np.testing.assert_allclose(
        colbert_scores(q, single),
        [float(np.mean(q.astype(np.float64) @ d[0].astype(np.float64))) for d in single],
        rtol=1e-5,
        atol=1e-6,
    )
    assert colbert_scores(q, []).shape == (0,)
    np.testing.assert_array_equal(colbert_scores(np.zeros((0, 8)), single[:2]), [0.0, 0.0])
    np.testing.assert_array_equal(colbert_scores(q, [np.zeros((0, 8))] * 3), [0.0] * 3)
    # Plain lists are documents too, and a wrong width is named.
    assert colbert_scores(q, [single[0].tolist()])[0] == pytest.approx(
        colbert_scores(q, [single[0]])[0], rel=1e-6
    )
    with pytest.raises(ValueError, match="shapes do not match"):
        colbert_scores(q, [single[0], np.ones((2, 9))])


def test_colbert_float32_contiguous_and_strided_documents(backend):
    """A float32 document is used in place; views and non-contiguous rows give the same."""
    rng = np.random.default_rng(5)
    q = rng.normal(size=(4, 12)).astype(np.float32)
    big = rng.normal(size=(50, 24)).astype(np.float32)
    docs = [big[:10, :12], big[10:30, 12:], big[::7, :12], np.asfortranarray(big[30:50, :12])]
    expected = _colbert_by_loop(q, docs)
    for subset in (docs, docs[:1], docs[1:2], docs[2:3], docs[3:]):
        np.testing.assert_allclose(
            colbert_scores(q, subset), _colbert_by_loop(q, subset), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(colbert_scores(q, docs), expected, rtol=1e-5, atol=1e-6)
    # Read-only, byte-swapped and reversed rows too.
    frozen = big[:10, :12].copy()
    frozen.flags.writeable = False
    odd = [
        frozen,
        big[10:20, :12].astype(">f4"),
        big[20:30, :12][::-1],
        big[30:31, :12].astype(np.float64),
    ]
    np.testing.assert_allclose(
        colbert_scores(q, odd), _colbert_by_loop(q, odd), rtol=1e-5, atol=1e-6
    )


def test_combined_score_divides_by_the_sum_of_weights():
    assert float(combine_scores(0.5, 0.25, 0.75, (0.4, 0.2, 0.4))) == pytest.approx(
        (0.4 * 0.5 + 0.2 * 0.25 + 0.4 * 0.75) / 1.0
    )
    assert float(combine_scores(0.5, 0.25, 0.75, (1, 0.3, 1))) == pytest.approx(
        (0.5 + 0.3 * 0.25 + 0.75) / 2.3
    )
    assert float(combine_scores(0.5, None, None, (1, 0, 0))) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no sparse"):
        combine_scores(0.5, None, 0.1, (1, 1, 1))


def test_compute_score_matches_the_parts():
    q = M3Embedding(
        dense=np.array([1.0, 0.0], dtype=np.float32),
        sparse={1: 0.5},
        colbert=np.array([[1.0, 0.0]], dtype=np.float32),
    )
    docs = M3Output(
        dense=np.array([[0.6, 0.8]], dtype=np.float32),
        sparse=[{1: 0.4, 2: 0.1}],
        colbert=[np.array([[0.0, 1.0], [0.8, 0.6]], dtype=np.float32)],
    )
    scores = compute_score(q, docs)
    assert scores["dense"][0] == pytest.approx(0.6)
    assert scores["sparse"][0] == pytest.approx(0.2)
    assert scores["colbert"][0] == pytest.approx(0.8)
    assert scores["all"][0] == pytest.approx(0.4 * 0.6 + 0.2 * 0.2 + 0.4 * 0.8)


def test_rrf_by_hand():
    dense = [("a", 0.9), ("b", 0.8), ("c", 0.7)]
    sparse = [("c", 3.0), ("a", 2.0)]
    fused = dict(fusion.rrf([dense, sparse], k=60))
    assert fused["a"] == pytest.approx(1 / 61 + 1 / 62)
    assert fused["b"] == pytest.approx(1 / 62)
    assert fused["c"] == pytest.approx(1 / 63 + 1 / 61)
    assert [key for key, _ in fusion.rrf([dense, sparse], k=60)] == ["a", "c", "b"]
    # plain id lists work too, and weights multiply each list's contribution
    weighted = dict(fusion.rrf([["a", "b"], ["b"]], k=1, weights=[2.0, 1.0]))
    assert weighted == pytest.approx({"a": 2 / 2, "b": 2 / 3 + 1 / 2})


def test_rrf_ties_keep_first_seen_order():
    assert [k for k, _ in fusion.rrf([["x"], ["y"]])] == ["x", "y"]


def test_dbsf_by_hand():
    scores = [0.9, 0.5, 0.1]
    mean = 0.5
    std = math.sqrt(((0.4) ** 2 + 0 + (0.4) ** 2) / 2)  # sample standard deviation
    low = mean - 3 * std
    expected = [(s - low) / (6 * std) for s in scores]
    assert fusion.dbsf_normalize(scores) == pytest.approx(expected)
    assert fusion.dbsf_normalize([3.0]) == [0.5]
    assert fusion.dbsf_normalize([2.0, 2.0]) == [0.5, 0.5]
    fused = dict(fusion.dbsf([[("a", 0.9), ("b", 0.5), ("c", 0.1)], [("b", 7.0)]]))
    assert fused == pytest.approx({"a": expected[0], "b": expected[1] + 0.5, "c": expected[2]})


def test_weighted_fusion_needs_every_score():
    fused = fusion.weighted([{"a": 0.5, "b": 0.1}, {"a": 2.0, "b": 4.0}], [1.0, 0.3])
    assert [key for key, _ in fused] == ["b", "a"]
    assert [score for _, score in fused] == pytest.approx([(0.1 + 1.2) / 1.3, (0.5 + 0.6) / 1.3])
    with pytest.raises(ValueError, match="no score"):
        fusion.weighted([{"a": 0.5}, {"b": 1.0}], [1.0, 1.0])
    with pytest.raises(ValueError):
        fusion.weighted([{"a": 0.5}], [0.0])


def test_sparse_string_keys_roundtrip():
    weights = {250001: 0.25, 6: 0.5}
    assert sparse_to_string_keys(weights) == {"250001": 0.25, "6": 0.5}
    assert sparse_from_string_keys(sparse_to_string_keys(weights)) == weights
    with pytest.raises(ValueError, match="integers"):
        sparse_from_string_keys({"hello": 1.0})


def test_m3output_rows_and_slices():
    out = M3Output(
        dense=np.eye(3, dtype=np.float32),
        sparse=[{1: 1.0}, {2: 1.0}, {}],
        colbert=[np.ones((1, 3)), np.ones((2, 3)), np.ones((3, 3))],
    )
    assert len(out) == 3 and out.parts == ("dense", "sparse", "colbert")
    assert out[1].sparse == {2: 1.0} and out[1].colbert.shape == (2, 3)
    tail = out[1:]
    assert len(tail) == 2 and tail.sparse == [{2: 1.0}, {}]
    picked = out[[2, 0]]
    np.testing.assert_array_equal(picked.dense, np.eye(3, dtype=np.float32)[[2, 0]])
    assert len(M3Output.concat([out, tail])) == 5
    with pytest.raises(ValueError, match="different lengths"):
        M3Output(dense=np.eye(2), sparse=[{}])


def test_colbert_workers_give_the_loops_answer_and_restore_blas_threads(monkeypatch):
    """Many small blocks scored by the worker threads (and from several callers at once):
    the loop's answer each time, and numpy's BLAS gets its thread count back."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    def blas_threads():
        return sorted(
            (i["internal_api"], i["num_threads"])
            for i in threadpool_info()
            if i["user_api"] == "blas"
        )

    rng = np.random.default_rng(8)
    q = rng.normal(size=(6, 16)).astype(np.float32)
    docs = [rng.normal(size=(int(n), 16)).astype(np.float16) for n in rng.integers(0, 9, size=300)]
    expected = _colbert_by_loop(q, docs)
    before = blas_threads()
    monkeypatch.setattr("m3connect.scoring._COLBERT_BLOCK_ELEMENTS", 8 * 16)
    monkeypatch.setattr("m3connect.scoring._COLBERT_TASK_ELEMENTS", 24 * 16)
    monkeypatch.setattr("m3connect.scoring._WORKERS", 3)
    with ThreadPoolExecutor(4) as callers:
        answers = list(callers.map(lambda _: colbert_scores(q, docs), range(8)))
    for answer in answers:
        np.testing.assert_allclose(answer, expected, rtol=1e-5, atol=1e-6)
    assert blas_threads() == before


@pytest.fixture(params=["torch product", "numpy product", "pieces"])
def float16_packing(request, monkeypatch):
    """The ways a worker scores float16 rows with torch: whole documents converted where torch
    runs one-threaded in the worker (the usual case), multiplied by torch or, where torch's MKL
    is multi-threaded in the worker, by numpy; pieces under torch's grain size otherwise."""
    pytest.importorskip("torch")
    if request.param == "torch product":
        monkeypatch.setattr("m3connect.scoring._torch_multiplies_here", lambda torch: True)
    elif request.param == "numpy product":
        monkeypatch.setattr("m3connect.scoring._torch_multiplies_here", lambda torch: False)
    else:
        monkeypatch.setattr("m3connect.scoring._serial_torch", lambda: None)
    return request.param


def test_colbert_mixed_float16_documents_give_the_loops_answer(float16_packing, monkeypatch):
    """float16 (contiguous, strided, byte-swapped, read-only), short float32 and list documents
    packed into the same blocks: the loop's answer, and no warning about read-only arrays."""
    import warnings

    rng = np.random.default_rng(11)
    q = rng.normal(size=(6, 16)).astype(np.float32)
    read_only = rng.normal(size=(9, 16)).astype(np.float16)
    read_only.flags.writeable = False
    docs = [
        rng.normal(size=(5, 16)).astype(np.float16),
        rng.normal(size=(3, 16)).astype(np.float32),
        rng.normal(size=(12, 32)).astype(np.float16)[::2, ::2],  # strided
        rng.normal(size=(4, 16)).astype(">f2"),  # byte-swapped
        np.zeros((0, 16), dtype=np.float16),
        read_only,
        rng.normal(size=(2, 16)).astype(np.float16).tolist(),
        rng.normal(size=(70, 16)).astype(np.float16),  # longer than a block
    ]
    expected = _colbert_by_loop(q, docs)
    monkeypatch.setattr("m3connect.scoring._COLBERT_BLOCK_ELEMENTS", 24 * 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = colbert_scores(q, docs)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert got[4] == 0.0
    assert not read_only.flags.writeable


@pytest.mark.parametrize("product", ["torch", "numpy"])
def test_colbert_float32_documents_multiplied_in_place_give_the_loops_answer(product, monkeypatch):
    """float32 documents long enough to be multiplied where they lie (writeable, read-only,
    memory-mapped) give the loop's answer, whether the worker multiplies with torch's BLAS or
    with numpy's."""
    torch = pytest.importorskip("torch")
    from m3connect import scoring

    calls = []
    real_mm = torch.mm

    def counting_mm(a, b):  # type: ignore[no-untyped-def]
        calls.append(a.shape)
        return real_mm(a, b)

    monkeypatch.setattr(torch, "mm", counting_mm)
    monkeypatch.setattr(scoring, "_torch_multiplies_here", lambda torch: product == "torch")
    monkeypatch.setattr(scoring, "_COLBERT_BLOCK_ELEMENTS", 40 * 16)
    monkeypatch.setattr(scoring, "_COLBERT_TASK_ELEMENTS", 40 * 16)
    monkeypatch.setattr(scoring, "_WORKERS", 2)
    rng = np.random.default_rng(14)
    q = rng.normal(size=(6, 16)).astype(np.float32)
    read_only = rng.normal(size=(33, 16)).astype(np.float32)
    read_only.flags.writeable = False
    docs = [rng.normal(size=(int(n), 16)).astype(np.float32) for n in (32, 40, 64, 90)]
    docs.append(read_only)
    expected = _colbert_by_loop(q, docs)
    np.testing.assert_allclose(colbert_scores(q, docs), expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == (len(docs) if product == "torch" else 0)


def test_colbert_float16_runs_torch_one_threaded_in_the_workers_only():
    """A float16 call (even a single block) is scored by the worker threads, where torch runs
    one-threaded; the caller's torch keeps its thread count."""
    torch = pytest.importorskip("torch")
    from m3connect import scoring

    before = torch.get_num_threads()
    rng = np.random.default_rng(12)
    q = rng.normal(size=(4, 8)).astype(np.float32)
    docs = [rng.normal(size=(3, 8)).astype(np.float16) for _ in range(2)]
    np.testing.assert_allclose(
        colbert_scores(q, docs), _colbert_by_loop(q, docs), rtol=1e-5, atol=1e-6
    )
    assert torch.get_num_threads() == before
    seen = set(
        scoring._pool().map(
            lambda _: (torch.get_num_threads(), scoring._serial_torch() is torch), range(16)
        )
    )
    assert seen == {(1, True)}
    assert scoring._serial_torch() is None  # not a worker: the caller's torch is left alone


@pytest.mark.parametrize("setting", ["legacy medium", "mkldnn matmul bf16"])
def test_colbert_float16_stays_float32_when_torch_allows_lower_precision_matmuls(setting):
    """A process that lets torch multiply float32 in bf16 (training scripts do) still gets
    float32 ColBERT scores: the workers' product falls back to numpy then."""
    torch = pytest.importorskip("torch")
    from m3connect import scoring

    rng = np.random.default_rng(13)
    q = rng.normal(size=(32, 256)).astype(np.float32)
    docs = [rng.normal(size=(64, 256)).astype(np.float16) for _ in range(6)]
    expected = _colbert_by_loop(q, docs)
    matmul = torch.backends.mkldnn.matmul
    try:
        if setting == "legacy medium":
            torch.set_float32_matmul_precision("medium")
        else:
            matmul.fp32_precision = "bf16"
        assert not scoring._torch_matmul_is_float32()
        np.testing.assert_allclose(colbert_scores(q, docs), expected, rtol=1e-5, atol=1e-5)
    finally:
        if setting == "legacy medium":
            torch.set_float32_matmul_precision("highest")
        else:
            matmul.fp32_precision = "none"
    assert scoring._torch_matmul_is_float32()
