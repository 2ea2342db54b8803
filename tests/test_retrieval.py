"""retrieval/: the inverted index and exact top-k against brute force, and the measures against
hand computations and pytrec_eval on a written run file."""

import sys

import numpy as np
import pytest
import pytrec_eval
import scipy.sparse as sp

from retrieval import (
    build_index,
    evaluate_run,
    flops_statistic,
    mean_active_dims,
    result_to_run,
    search,
    trec_tie_ranks,
    write_trec_run,
)


def splade_like(rows, vocab, density, seed, levels=4):
    """Random non-negative sparse vectors with few distinct weights, so equal scores are common."""
    matrix = sp.random(rows, vocab, density=density, format="csr", random_state=seed, dtype=np.float32)
    matrix.data = (np.ceil(matrix.data * levels) / levels).astype(np.float32)
    return matrix


def brute_force_top_k(queries, docs, k, tie_ranks, exclude=None):
    scores = (queries @ docs.T).toarray()
    expected = []
    for q, row in enumerate(scores):
        hits = [d for d in np.flatnonzero(row > 0) if exclude is None or d != exclude[q]]
        expected.append(sorted(hits, key=lambda d: (-row[d], tie_ranks[d]))[:k])
    return expected, scores


@pytest.fixture(scope="module")
def collection():
    docs = splade_like(3000, 500, 0.03, seed=1)
    queries = splade_like(40, 500, 0.02, seed=2)
    doc_ids = [f"d{i * 7919 % 3001}" for i in range(docs.shape[0])]  # id order differs from row order
    return docs, queries, doc_ids


# search's paths: scipy score rows, the compiled inverted-index kernel, the same with MaxScore pruning
METHODS = ("dense", "kernel", "pruned")


@pytest.mark.parametrize("method", METHODS)
def test_top_k_equals_brute_force_with_trec_tie_order(collection, method):
    docs, queries, doc_ids = collection
    ranks = trec_tie_ranks(doc_ids)
    result = search(build_index(docs), queries, k=50, tie_ranks=ranks, method=method)
    expected, scores = brute_force_top_k(queries, docs, 50, ranks)
    ties = 0
    for q, hits in enumerate(expected):
        got = result.doc_index[q, : result.num_hits[q]].tolist()
        assert got == hits
        np.testing.assert_allclose(result.scores[q, : len(hits)], scores[q, hits], rtol=1e-5)
        ties += len(hits) - len(set(scores[q, hits].round(5)))
        # Among equal scores the larger id comes first (trec_eval's strcmp order, descending).
        for a, b in zip(got, got[1:]):
            if np.isclose(scores[q, a], scores[q, b], rtol=1e-6, atol=0):
                assert doc_ids[a] > doc_ids[b]
    assert ties > 100  # the data really exercises tie-breaking


@pytest.mark.parametrize("method", METHODS)
def test_short_result_lists_are_padded_and_exclusion_skips_one_doc(collection, method):
    docs, queries, doc_ids = collection
    index = build_index(docs)
    result = search(index, queries, k=3000, method=method)  # more than any query touches
    _, scores = brute_force_top_k(queries, docs, 3000, np.arange(docs.shape[0]))
    assert result.num_hits.tolist() == (scores > 0).sum(1).tolist()
    first_pad = result.num_hits[0]
    assert (result.doc_index[0, first_pad:] == -1).all()

    excluded = result.doc_index[:, 0].astype(np.int64)  # drop each query's best hit
    without = search(index, queries, k=10, exclude=excluded, method=method)
    assert (without.doc_index[:, :9] == result.doc_index[:, 1:10]).all()
    assert search(index, queries[:2], k=5000, method=method).doc_index.shape == (2, 5000)  # k > documents


def test_dense_and_kernel_paths_agree_bit_for_bit_with_ties_and_self_hits(collection):
    """Same hits, same order, same float32 scores: the choice by size can never change a metric."""
    docs, queries, doc_ids = collection
    index, ranks = build_index(docs), trec_tie_ranks(doc_ids)
    exclude = np.full(queries.shape[0], -1, dtype=np.int64)
    exclude[::2] = search(index, queries[::2], k=1, method="dense").doc_index[:, 0]  # a self hit to drop
    dense, *kernels = (
        search(index, queries, k=200, tie_ranks=ranks, exclude=exclude, method=method, block_docs=512)
        for method in METHODS
    )
    for kernel in kernels:
        np.testing.assert_array_equal(dense.num_hits, kernel.num_hits)
        np.testing.assert_array_equal(dense.doc_index, kernel.doc_index)
        np.testing.assert_array_equal(dense.scores.view(np.int32), kernel.scores.view(np.int32))
    assert not (dense.doc_index[::2] == exclude[::2, None]).any()
    expected, _ = brute_force_top_k(queries, docs, 200, ranks, exclude)
    assert [dense.doc_index[q, : dense.num_hits[q]].tolist() for q in range(len(expected))] == expected


def test_auto_method_scores_small_searches_densely(collection, monkeypatch):
    docs, queries, _ = collection
    index = build_index(docs)
    monkeypatch.setitem(sys.modules, "retrieval.kernel", None)  # importing the kernel would now fail
    search(index, queries, k=10)  # 40 x 3000 cells: dense
    with pytest.raises(ImportError):
        search(index, queries, k=10, method="kernel")
    # One query over a collection above DENSE_MAX_DOCS is few cells, but a dense row per query costs the
    # whole collection: the compiled kernel takes it (1 query x 1M documents: 70 ms dense, 15 ms kernel).
    monkeypatch.setattr("retrieval.index.DENSE_MAX_DOCS", 1000)
    with pytest.raises(ImportError):
        search(index, queries[:1], k=10)


def test_index_from_shard_files_equals_index_from_one_matrix(collection, tmp_path):
    docs, _, _ = collection
    paths = []
    for i, start in enumerate(range(0, docs.shape[0], 700)):
        paths.append(tmp_path / f"docs-{i}.npz")
        sp.save_npz(paths[-1], docs[start : start + 700])
    whole, sharded = build_index(docs), build_index(paths)
    assert sharded.num_docs == whole.num_docs == 3000
    # Unsorted entries, a duplicate (split weight) and explicit zeros index like the clean matrix.
    clean = sp.csr_matrix(np.array([[0.5, 0, 2.0], [0, 1.0, 0]], dtype=np.float32))
    data, indices = np.array([2.0, 0.25, 0.25, 0.0, 1.0], dtype=np.float32), np.array([2, 0, 0, 1, 1])
    messy = sp.csr_matrix((data, indices, np.array([0, 3, 5])), shape=(2, 3))
    for name in ("term_ptr", "doc_index", "weights"):
        np.testing.assert_array_equal(getattr(build_index(messy), name), getattr(build_index(clean), name))
    np.testing.assert_array_equal(messy.data, data)  # the caller's matrix is left as it was
    for name in ("term_ptr", "doc_index", "weights"):
        np.testing.assert_array_equal(getattr(sharded, name), getattr(whole, name))
    # Posting lists are the CSC form of the matrix.
    csc = docs.tocsc()
    csc.sort_indices()
    np.testing.assert_array_equal(whole.term_ptr, csc.indptr)
    np.testing.assert_array_equal(whole.doc_index, csc.indices)


def test_bad_vectors_are_refused():
    with pytest.raises(ValueError, match="negative weights"):
        build_index(sp.csr_matrix(np.array([[0.5, -1.0]], dtype=np.float32)))
    index = build_index(sp.csr_matrix(np.array([[0.5, 1.0]], dtype=np.float32)))
    with pytest.raises(ValueError, match="columns"):
        search(index, sp.csr_matrix(np.ones((1, 3), dtype=np.float32)))


def test_trec_tie_ranks_prefer_the_larger_id_in_byte_order():
    ranks = trec_tie_ranks(["b", "a", "c", "B", "é"])
    assert [x for _, x in sorted(zip(ranks, ["b", "a", "c", "B", "é"]))] == ["é", "c", "b", "a", "B"]


def test_sparsity_statistics_by_hand():
    queries = sp.csr_matrix(np.array([[1, 0, 2, 0], [0, 0, 3, 0]], dtype=np.float32))
    docs = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]], dtype=np.float32))
    index = build_index(docs)
    # p_q = (1/2, 0, 1, 0), p_d = (1/3, 2/3, 2/3, 1/3)  ->  1/6 + 2/3
    assert flops_statistic(queries, index) == pytest.approx(1 / 6 + 2 / 3)
    assert mean_active_dims(queries) == pytest.approx(1.5)
    assert index.nnz / index.num_docs == pytest.approx(2.0)


def test_measures_count_unretrieved_queries_and_cut_mrr_by_our_order():
    qrels = {
        "q1": {"a": 1, "b": 0, "c": 2},
        "q2": {"x": 2, "y": 1},
        "q3": {"z": 1},  # judged, but no hit at all: must count 0, not be skipped
        "q4": {"w": 0},  # nothing relevant: not a judged query, not averaged
    }
    run = {
        "q1": {"n1": 3.0, "a": 2.0, "c": 1.0},
        "q2": {"y": 5.0, "x": 4.0},
        "q4": {"w": 1.0},
    }
    metrics = evaluate_run(run, qrels)
    assert metrics["mrr@10"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert metrics["recall@1000"] == pytest.approx((1 + 1 + 0) / 3)
    # TREC DL style: only relevance >= 2 counts for recall.
    assert evaluate_run(run, qrels, recall_min_rel=2)["recall@1000"] == pytest.approx((1 + 1 + 0) / 3)
    run_q2_misses_x = {"q2": {"y": 5.0}}
    assert evaluate_run(run_q2_misses_x, qrels, recall_min_rel=2)["recall@1000"] == 0
    # nDCG@10 with graded gains: q1 gains (0, 1, 2), ideal (2, 1); q2 gains (1, 2), ideal (2, 1).
    dcg = lambda gains: sum(g / np.log2(i + 2) for i, g in enumerate(gains))  # noqa: E731
    expected = (dcg([0, 1, 2]) / dcg([2, 1]) + dcg([1, 2]) / dcg([2, 1]) + 0) / 3
    assert metrics["ndcg@10"] == pytest.approx(expected)

    # RR@10 looks at our first 10 hits only: a relevant doc at rank 11 gives 0.
    eleven = {"q1": {**{f"n{i}": 100.0 - i for i in range(10)}, "a": 1.0}}
    assert evaluate_run(eleven, {"q1": {"a": 1}})["mrr@10"] == 0


def test_run_file_rescored_by_pytrec_eval_gives_the_same_numbers(collection, tmp_path):
    docs, queries, doc_ids = collection
    ranks = trec_tie_ranks(doc_ids)
    result = search(build_index(docs), queries, k=100, tie_ranks=ranks)
    query_ids = [f"q{i}" for i in range(queries.shape[0])]
    rng = np.random.default_rng(0)
    qrels = {}
    for q, qid in enumerate(query_ids[:-1]):  # the last query is unjudged
        pool = result.doc_index[q, : min(20, result.num_hits[q])]
        qrels[qid] = {doc_ids[d]: int(rng.integers(0, 3)) for d in rng.choice(pool, 8, replace=False)}
        qrels[qid][doc_ids[int(rng.integers(0, 3000))]] = 1  # maybe not retrieved
    ours = evaluate_run(result_to_run(result, query_ids, doc_ids), qrels)

    path = tmp_path / "run.trec"
    write_trec_run(path, result, query_ids, doc_ids, "test")
    lines = [line.split() for line in path.read_text().splitlines()]
    assert all(len(fields) == 6 and fields[1] == "Q0" and fields[5] == "test" for fields in lines)
    run = {}
    for qid, _, doc, _rank, score, _ in lines:
        run.setdefault(qid, {})[doc] = float(score)
    # trec_eval ignores the rank column and sorts by score, then docno descending: our order.
    for hits in run.values():
        trec_order = sorted(sorted(hits, reverse=True), key=lambda d: -hits[d])  # stable: ties keep id desc
        assert trec_order == list(hits)
    judged = [q for q in qrels if any(r > 0 for r in qrels[q].values())]
    qrels_judged = {q: qrels[q] for q in judged}
    full = pytrec_eval.RelevanceEvaluator(qrels_judged, {"ndcg_cut_10", "recall_1000"}).evaluate(run)
    cut = {q: dict(list(h.items())[:10]) for q, h in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels_judged, {"recip_rank"}).evaluate(cut)
    assert ours["ndcg@10"] == pytest.approx(sum(full[q]["ndcg_cut_10"] for q in judged) / len(judged), abs=1e-12)
    assert ours["recall@1000"] == pytest.approx(sum(full[q]["recall_1000"] for q in judged) / len(judged), abs=1e-12)
    assert ours["mrr@10"] == pytest.approx(sum(rr[q]["recip_rank"] for q in judged) / len(judged), abs=1e-12)
    assert 0.1 < ours["ndcg@10"] < 1
