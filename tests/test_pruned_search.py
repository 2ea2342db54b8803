"""search(method='pruned') (MaxScore over two weight tiers, retrieval/kernel.py) returns exactly what the
exhaustive kernel returns: the same documents in the same order with the same float32 score bits and hit
counts, on SPLADE-like data and on adversarial cases, and it really skips work."""

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from retrieval import build_index, search, trec_tie_ranks
from retrieval import kernel as K

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_retrieval import VOCAB, synthetic_vectors, term_distribution  # noqa: E402


def assert_same(exhaustive, pruned):
    np.testing.assert_array_equal(exhaustive.num_hits, pruned.num_hits)
    np.testing.assert_array_equal(exhaustive.doc_index, pruned.doc_index)
    np.testing.assert_array_equal(exhaustive.scores.view(np.int32), pruned.scores.view(np.int32))


@pytest.fixture
def aggressive(monkeypatch):
    """Prune as far as the bounds allow in every block: non-essential parts up to theta itself, no
    fallback to exhaustive blocks however many look-ups it takes."""
    monkeypatch.setattr(K, "NE_FRACTION", 1.0)
    monkeypatch.setattr(K, "LOOKUP_COST", 0)
    monkeypatch.setattr(K, "PRUNE_MAX_K", 10**9)


@pytest.fixture(scope="module")
def zipf():
    p = term_distribution(40.0)
    docs = synthetic_vectors(30_000, 100, 150, p, seed=11)
    queries = synthetic_vectors(24, 20, 40, p, seed=12)
    index = build_index(docs)
    ranks = np.random.default_rng(0).permutation(docs.shape[0]).astype(np.int32)
    return docs, queries, index, ranks


@pytest.mark.parametrize("aggressive_pruning", [False, True])
@pytest.mark.parametrize("k", [1, 10, 1000])
@pytest.mark.parametrize("block_docs", [None, 3000])
def test_pruned_equals_exhaustive_on_zipf_vectors(zipf, k, block_docs, aggressive_pruning, monkeypatch):
    docs, queries, index, ranks = zipf
    if aggressive_pruning:
        monkeypatch.setattr(K, "NE_FRACTION", 1.0)
        monkeypatch.setattr(K, "LOOKUP_COST", 0)
        monkeypatch.setattr(K, "PRUNE_MAX_K", 10**9)
    exclude = np.full(queries.shape[0], -1, dtype=np.int64)
    exclude[::3] = search(index, queries[::3], k=1, method="kernel").doc_index[:, 0]  # each one's best hit
    common = dict(k=k, tie_ranks=ranks, exclude=exclude, block_docs=block_docs)
    exhaustive = search(index, queries, method="kernel", **common)
    pruned = search(index, queries, method="pruned", **common)
    assert_same(exhaustive, pruned)
    assert not (pruned.doc_index[::3] == exclude[::3, None]).any()
    if aggressive_pruning:  # the comparison is not vacuous: pruning took place
        assert pruned.stats[:, 1].sum() > 0  # non-essential look-ups
        assert pruned.stats[:, 0].sum() < 0.9 * index.posting_lengths()[queries.indices].sum()


def test_pruning_skips_work_on_a_zipf_workload(zipf, monkeypatch):
    """Top-10 with non-essential parts up to half of theta adds well under all the postings of the query
    terms and looks few up: a method that secretly ran the exhaustive kernel would add every one of them.
    The defaults prune less (they stop where the look-ups cost more than they spare) but do try."""
    docs, queries, index, ranks = zipf
    total = index.posting_lengths()[queries.indices].sum()
    exhaustive = search(index, queries, k=10, tie_ranks=ranks, method="kernel")
    pruned = search(index, queries, k=10, tie_ranks=ranks, method="pruned")
    assert_same(exhaustive, pruned)
    assert 0 < pruned.stats[:, 1].sum() and pruned.stats[:, 0].sum() < total
    monkeypatch.setattr(K, "NE_FRACTION", 0.5)
    monkeypatch.setattr(K, "LOOKUP_COST", 0)
    monkeypatch.setattr(K, "PRUNE_MAX_K", 10**9)
    pruned = search(index, queries, k=10, tie_ranks=ranks, method="pruned")
    assert_same(exhaustive, pruned)
    added, lookups, candidates, rescored = pruned.stats.sum(axis=0)
    assert added < 0.85 * total
    assert lookups < 0.05 * total
    assert rescored <= candidates < lookups


def quantized(rows, vocab, density, seed, levels=4):
    """Weights in few levels (multiples of 1/levels): many documents score exactly alike."""
    matrix = sp.random(rows, vocab, density=density, format="csr", random_state=seed, dtype=np.float32)
    matrix.data = (np.ceil(matrix.data * levels) / levels).astype(np.float32)
    return matrix


@pytest.mark.parametrize("k", [1, 7, 100, 5000])
@pytest.mark.parametrize("block_docs", [None, 700, 64])
@pytest.mark.parametrize("fallback", [False, True])
def test_pruned_equals_exhaustive_with_ties_duplicates_and_odd_queries(k, block_docs, fallback, monkeypatch):
    """fallback: the first pruned block gives up at once, the rest of each query is scanned exhaustively
    within the pruned kernel (its own scan, against the bar); else every block prunes as far as it can."""
    monkeypatch.setattr(K, "NE_FRACTION", 1.0)
    monkeypatch.setattr(K, "LOOKUP_COST", 10**9 if fallback else 0)
    monkeypatch.setattr(K, "PRUNE_MAX_K", 10**9)
    base = quantized(2000, 300, 0.05, seed=3)
    # Head terms in most documents (long lists: a high tier), each document twice: every score is tied.
    head = sp.csr_matrix((np.random.default_rng(4).random((2000, 300)) < 0.6) * 0.5, dtype=np.float32)
    docs = sp.vstack([base + head, base + head], format="csr")
    docs = sp.hstack([docs, sp.csr_matrix((docs.shape[0], 2), dtype=np.float32)], format="csr")  # 2 empty terms
    queries = quantized(30, 302, 0.08, seed=5, levels=2)
    queries = sp.lil_matrix(queries)
    queries[0, :] = 0  # no term at all
    queries[1, :] = 0
    queries[1, 300] = 1.0  # only a term absent from the index
    queries[2, 301] = 2.0  # a term absent from the index among others
    queries = sp.csr_matrix(queries)
    queries.eliminate_zeros()
    index = build_index(docs)
    assert index.high_tier[1][-1] > 0  # some lists have a high tier
    ids = [f"d{(i * 7919) % 4001:05d}" for i in range(docs.shape[0])]
    ranks = trec_tie_ranks(ids)
    exclude = np.full(queries.shape[0], -1, dtype=np.int64)
    exclude[3::2] = search(index, queries[3::2], k=1, method="dense").doc_index[:, 0]
    common = dict(k=k, tie_ranks=ranks, exclude=exclude, block_docs=block_docs)
    exhaustive = search(index, queries, method="kernel", **common)
    pruned = search(index, queries, method="pruned", **common)
    assert_same(exhaustive, pruned)
    assert_same(search(index, queries, method="dense", **common), pruned)
    assert pruned.num_hits[0] == pruned.num_hits[1] == 0
    assert (pruned.doc_index[0] == -1).all()
    if k < docs.shape[0]:  # look-ups happened: the ties went through the pruned path
        assert pruned.stats[:, 1].sum() > 0
    else:  # never k hits, theta stays 0: nothing to prune
        assert pruned.stats[:, 1].sum() == 0
    if k == 7:  # many documents share the k-th score: the tie rank decides, pruning must keep them all
        kth = pruned.scores[3:, k - 1]
        assert sum((exhaustive.scores[q] == kth[q - 3]).sum() > 1 for q in range(3, queries.shape[0])) > 5


def test_score_equal_to_theta_is_not_pruned(aggressive):
    """Document 0..5 all score exactly 3.0 for the query; the best k=3 by tie rank are the last three,
    found after theta = 3.0 is set by the first three: a strict bound test would prune them."""
    docs = sp.csr_matrix(
        np.array(
            [[1.0, 1.0, 1.0, 0]] * 3 + [[2.0, 0, 0, 1.0]] * 3 + [[0.5, 0, 0, 0]] * 50,
            dtype=np.float32,
        )
    )
    index = build_index(docs)
    query = sp.csr_matrix(np.array([[1.0, 1.0, 1.0, 1.0]], dtype=np.float32))
    ranks = np.arange(docs.shape[0], dtype=np.int32)[::-1].copy()  # later documents win ties
    for block_docs in (1, 2, 3, 4):
        exhaustive = search(index, query, k=3, tie_ranks=ranks, method="kernel", block_docs=block_docs)
        pruned = search(index, query, k=3, tie_ranks=ranks, method="pruned", block_docs=block_docs)
        assert_same(exhaustive, pruned)
        assert pruned.doc_index[0].tolist() == [5, 4, 3]


def test_term_max_and_high_tier_are_computed_once_per_index(zipf):
    docs, queries, index, ranks = zipf
    np.testing.assert_array_equal(index.term_max, docs.max(axis=0).toarray().ravel())
    assert index.term_max is index.term_max and index.high_tier is index.high_tier
    tau, high_ptr, high_doc, high_weight = index.high_tier
    lengths = index.posting_lengths()
    long = np.flatnonzero(lengths >= K.HIGH_MIN_POSTINGS)
    assert len(long) > 10
    for t in long[:20]:
        w = index.weights[index.term_ptr[t] : index.term_ptr[t + 1]]
        d = index.doc_index[index.term_ptr[t] : index.term_ptr[t + 1]]
        np.testing.assert_array_equal(high_doc[high_ptr[t] : high_ptr[t + 1]], d[w > tau[t]])
        np.testing.assert_array_equal(high_weight[high_ptr[t] : high_ptr[t + 1]], w[w > tau[t]])
    short = np.flatnonzero((lengths > 0) & (lengths < K.HIGH_MIN_POSTINGS))
    np.testing.assert_array_equal(tau[short], index.term_max[short])
    assert len(tau) == VOCAB


def test_bounds_allow_for_float_rounding(aggressive):
    """Document 1 scores fl(fl(a + o) + b) = S, 1 ulp above the real a + b + o: a bound summed in another
    order without slack falls below S = theta (set by document 0, which it beats on the tie rank)."""
    a, b, o = np.float32(1.6369617), np.float32(1.2697867), np.float32(0.0013687618)
    score = np.float32(np.float32(a + o) + b)
    assert float(score) > float(np.float32(a + b)) + float(o) and float(score) > float(a) + float(b) + float(o)
    docs = sp.csr_matrix(np.array([[0, 0, 0, score], [a, o, b, 0]], dtype=np.float32))
    index = build_index(docs)
    query = sp.csr_matrix(np.ones((1, 4), dtype=np.float32))
    ranks = np.array([1, 0], dtype=np.int32)
    exhaustive = search(index, query, k=1, tie_ranks=ranks, method="kernel", block_docs=1)
    pruned = search(index, query, k=1, tie_ranks=ranks, method="pruned", block_docs=1)
    assert exhaustive.doc_index[0, 0] == 1 and exhaustive.scores[0, 0] == score
    assert_same(exhaustive, pruned)
    assert pruned.stats[0, 1] > 0  # document 1 was looked up, not scored exhaustively
