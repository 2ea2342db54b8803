"""Exact top-1000 retrieval: retrieval.search (numba, inverted index) against scipy sparse products.

Synthetic SPLADE-like data: a Zipf-like term distribution, p(rank r) ~ 1/(r + offset)^1.1 over
30,522 terms, ~100-150 active terms per document and 20-40 per query, weights in (0, 3]. The
offset is chosen so the FLOPS statistic is about 3, in the range of trained SPLADE models on
MS MARCO (the results table has 1.1-5.4); the figure is printed.

  ours        retrieval.search: term-at-a-time over posting lists, a bounded heap per query,
              queries spread over numba threads (reported with 1 thread and with all)
  scipy       the inverted index as a CSR matrix (terms x documents), scores = Q @ index for
              batches of queries, then np.argpartition + sort of the top 1000 per query
              (single-threaded, as scipy is)

Both give the same top 1000 (checked on the scipy queries: ids equal except where scores tie
within float32 rounding). Usage (from the repository root):

  python bench/bench_retrieval.py                         # 1M documents, 500 queries
  python bench/bench_retrieval.py --docs 200000 --queries 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numba
import numpy as np
import psutil
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import retrieval  # noqa: E402

VOCAB = 30522


def term_distribution(offset: float, exponent: float = 1.1) -> np.ndarray:
    p = 1.0 / (np.arange(VOCAB) + offset) ** exponent
    return p / p.sum()


def synthetic_vectors(rows: int, low: int, high: int, p: np.ndarray, seed: int, chunk: int = 200_000):
    """Rows of about low..high distinct terms drawn from p, weights in (0, 3]. Terms are drawn with
    replacement and repeats merged, so 1.1x as many are drawn as the row should end up with."""
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(p)
    parts = []
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        draws = (rng.integers(low, high + 1, size=n) * 1.1).astype(np.int64)
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(draws, out=indptr[1:])
        terms = np.minimum(np.searchsorted(cdf, rng.random(int(indptr[-1]), dtype=np.float32)), VOCAB - 1)
        data = (rng.gamma(2.0, 0.4, size=len(terms)) + 0.01).clip(max=3).astype(np.float32)
        part = sp.csr_matrix((data, terms.astype(np.int32), indptr), shape=(n, VOCAB))
        part.sum_duplicates()  # a repeated term keeps the sum of its weights, as with max pooling's one value
        parts.append(part)
    return sp.vstack(parts, format="csr")


def scipy_top_k(queries: sp.csr_matrix, postings: sp.csr_matrix, k: int, batch: int = 16):
    """Top k by scipy: dense score rows from a sparse product, argpartition, then sort."""
    top = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], batch):
        scores = (queries[start : start + batch] @ postings).toarray()
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1, kind="stable")
        top[start : start + batch] = np.take_along_axis(part, order, 1)
    return top


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--scipy_queries", type=int, default=100, help="scipy is slow: time it on fewer")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--offset", type=float, default=40.0, help="flattens the head of the term distribution")
    args = parser.parse_args()

    p = term_distribution(args.offset)
    started = time.perf_counter()
    docs = synthetic_vectors(args.docs, 100, 150, p, seed=1)
    queries = synthetic_vectors(args.queries, 20, 40, p, seed=2)
    print(
        f"data: {args.docs:,} docs x {docs.nnz / args.docs:.1f} terms, {args.queries} queries x "
        f"{queries.nnz / args.queries:.1f} terms ({time.perf_counter() - started:.0f} s to generate)"
    )

    started = time.perf_counter()
    index = retrieval.build_index(docs)
    build_seconds = time.perf_counter() - started
    print(
        f"index: {index.nbytes / 2**30:.2f} GiB ({index.nbytes / index.nnz:.2f} bytes/posting), "
        f"built in {build_seconds:.1f} s; FLOPS statistic {retrieval.flops_statistic(queries, index):.2f}; "
        f"process RSS {psutil.Process().memory_info().rss / 2**30:.1f} GiB"
    )

    retrieval.search(index, queries[:2], k=args.k)  # compile
    threads = numba.config.NUMBA_NUM_THREADS
    timings = {}
    for n_threads in sorted({1, threads}):
        numba.set_num_threads(n_threads)
        started = time.perf_counter()
        result = retrieval.search(index, queries, k=args.k)
        timings[n_threads] = (time.perf_counter() - started) / args.queries * 1e3
        print(f"ours, {n_threads} thread(s): {timings[n_threads]:.2f} ms/query")
    numba.set_num_threads(threads)

    postings = sp.csr_matrix(docs.T)  # terms x documents: scipy's inverted index
    subset = queries[: args.scipy_queries]
    scipy_top_k(subset[:2], postings, args.k)
    started = time.perf_counter()
    reference = scipy_top_k(subset, postings, args.k)
    scipy_ms = (time.perf_counter() - started) / subset.shape[0] * 1e3
    print(f"scipy (Q @ index, argpartition, sort), 1 thread: {scipy_ms:.2f} ms/query")

    # Same documents: compare id lists, tolerating swaps between scores equal to float32 rounding.
    exact = (queries[: subset.shape[0]] @ docs.T).toarray()
    mismatched = 0
    for q in range(subset.shape[0]):
        ours = result.doc_index[q]
        if not np.array_equal(ours, reference[q]):
            if not np.allclose(exact[q, ours], exact[q, reference[q]], rtol=1e-5, atol=0):
                mismatched += 1
    print(f"top-{args.k} agreement with scipy: {subset.shape[0] - mismatched}/{subset.shape[0]} queries")
    print(
        f"speed-up over scipy: {scipy_ms / timings[1]:.1f}x on 1 thread, {scipy_ms / timings[threads]:.1f}x "
        f"on {threads} threads"
    )


if __name__ == "__main__":
    main()
