"""Exact top-1000 retrieval: retrieval.search (numba, inverted index) against scipy sparse products.

Synthetic SPLADE-like data: a Zipf-like term distribution, p(rank r) ~ 1/(r + offset)^1.1 over
30,522 terms, ~100-150 active terms per document and 20-40 per query, weights in (0, 3]. The
offset is chosen so the FLOPS statistic is about 3, in the range of trained SPLADE models on
MS MARCO (the results table has 1.1-5.4); the figure is printed.

  ours        retrieval.search: term-at-a-time over posting lists, a bounded heap per query,
              queries spread over numba threads (reported with 1 thread and with all); then
              method='kernel' (exhaustive) against method='pruned' (MaxScore) on 1 thread
  scipy       the inverted index as a CSR matrix (terms x documents), scores = Q @ index for
              batches of queries, then np.argpartition + sort of the top 1000 per query
              (single-threaded, as scipy is)

Both give the same top 1000 (checked on the scipy queries: ids equal except where scores tie
within float32 rounding). Usage (from the repository root):

  python bench/bench_retrieval.py                         # 1M documents, 500 queries
  python bench/bench_retrieval.py --docs 200000 --queries 200
  python bench/bench_retrieval.py --queries 200 --scipy_queries 0     # exhaustive vs pruned, k=10 and 1000
  # MS MARCO scale (8.8M passages, ~10 GB of RAM, ~10 GB of disk for the shards): build time, peak RAM, latency
  flock /tmp/bigmem.lock python bench/bench_retrieval.py --docs 8841823 --queries 200 --doc_terms 110 150 \
      --query_terms 32 32 --shards_dir /tmp/shards
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numba
import numpy as np
import psutil
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import peer_table  # noqa: E402
from common import SHARED  # noqa: E402

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


def write_shards(rows: int, low: int, high: int, p: np.ndarray, directory: Path, shard_rows: int = 400_000):
    """The documents as .npz shard files, generated one shard at a time: never all in memory."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, start in enumerate(range(0, rows, shard_rows)):
        paths.append(directory / f"docs-{i:04d}.npz")
        part = synthetic_vectors(min(shard_rows, rows - start), low, high, p, seed=1000 + i)
        sp.save_npz(paths[-1], part, compressed=False)
    return paths


def latencies_ms(index, queries, k: int, n_threads: int, method: str = "kernel") -> tuple[float, float, float]:
    """p50 and p99 of one-query calls, and ms/query of one call over all queries, with n numba threads.
    A query is scored by one thread: threads add throughput over a batch, not speed to a single query."""
    numba.set_num_threads(n_threads)
    single = []
    for q in range(queries.shape[0]):
        started = time.perf_counter()
        retrieval.search(index, queries[q], k=k, method=method)
        single.append((time.perf_counter() - started) * 1e3)
    started = time.perf_counter()
    retrieval.search(index, queries, k=k, method=method)
    batch = (time.perf_counter() - started) / queries.shape[0] * 1e3
    return float(np.percentile(single, 50)), float(np.percentile(single, 99)), batch


def compare_pruned(index, queries, ks) -> None:
    """Exhaustive ('kernel') against MaxScore ('pruned') on 1 numba thread, each k measured back to back
    in this run; the two must return the same hits and score bits."""
    started = time.perf_counter()
    retrieval.search(index, queries[:2], k=10, method="pruned")  # compiles; builds term_max and the high tier
    tau, high_ptr, high_doc, high_weight = index.high_tier
    extra = index.term_max.nbytes + tau.nbytes + high_ptr.nbytes + high_doc.nbytes + high_weight.nbytes
    print(
        f"pruned: first call (compile + per-index bounds) {time.perf_counter() - started:.1f} s; bounds and high "
        f"tier {extra / 2**20:.0f} MiB ({extra / index.nbytes:.1%} of the index, {len(high_doc):,} postings)"
    )
    postings = index.posting_lengths()[queries.indices].sum() / queries.shape[0]
    for k in ks:
        exhaustive = retrieval.search(index, queries, k=k, method="kernel")
        pruned = retrieval.search(index, queries, k=k, method="pruned")
        same = (
            np.array_equal(exhaustive.doc_index, pruned.doc_index)
            and np.array_equal(exhaustive.scores.view(np.int32), pruned.scores.view(np.int32))
            and np.array_equal(exhaustive.num_hits, pruned.num_hits)
        )
        added, lookups, candidates, rescored = pruned.stats.sum(axis=0) / queries.shape[0]
        rows = {method: latencies_ms(index, queries, k, 1, method) for method in ("kernel", "pruned")}
        for method, (p50, p99, batch) in rows.items():
            print(
                f"top-{k} {method:>6}, 1 thread: one query per call p50 {p50:.2f} ms, p99 {p99:.2f} ms; "
                f"all queries in one call {batch:.2f} ms/query"
            )
        print(
            f"top-{k} exhaustive / pruned: {rows['kernel'][0] / rows['pruned'][0]:.2f}x one query per call, "
            f"{rows['kernel'][2] / rows['pruned'][2]:.2f}x batched; identical results: {same}; pruned added "
            f"{added / postings:.1%} of {postings:,.0f} postings/query, {lookups:,.0f} look-ups, "
            f"{candidates:,.0f} candidates, {rescored:,.0f} re-scored"
        )


def compare_with_scipy(docs, queries, result, k: int, n_queries: int) -> float:
    """ms/query of scipy on the first n_queries; prints the top-k agreement with ours."""
    postings = sp.csr_matrix(docs.T)  # terms x documents: scipy's inverted index
    subset = queries[:n_queries]
    scipy_top_k(subset[:2], postings, k)
    started = time.perf_counter()
    reference = scipy_top_k(subset, postings, k)
    scipy_ms = (time.perf_counter() - started) / subset.shape[0] * 1e3
    # Same documents: compare id lists, tolerating swaps between scores equal to float32 rounding.
    exact = (subset @ docs.T).toarray()
    mismatched = 0
    for q in range(subset.shape[0]):
        ours = result.doc_index[q]
        if not np.array_equal(ours, reference[q]):
            if not np.allclose(exact[q, ours], exact[q, reference[q]], rtol=1e-5, atol=0):
                mismatched += 1
    print(f"scipy (Q @ index, argpartition, sort), 1 thread: {scipy_ms:.2f} ms/query")
    print(f"top-{k} agreement with scipy: {subset.shape[0] - mismatched}/{subset.shape[0]} queries")
    return scipy_ms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--doc_terms", type=int, nargs=2, default=(100, 150), metavar=("LOW", "HIGH"))
    parser.add_argument("--query_terms", type=int, nargs=2, default=(20, 40), metavar=("LOW", "HIGH"))
    parser.add_argument("--scipy_queries", type=int, default=100, help="scipy is slow: time it on fewer; 0: skip")
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--offset", type=float, default=40.0, help="flattens the head of the term distribution")
    parser.add_argument(
        "--pruned_ks", type=int, nargs="*", default=(10, 1000), help="exhaustive vs pruned at these k; none: skip"
    )
    parser.add_argument(
        "--shards_dir", type=Path, help="MS MARCO scale: write the documents as shards here, index from them, no scipy"
    )
    parser.add_argument("--peers", type=int, default=0, help="also run BMP and Seismic on this many of the queries")
    parser.add_argument("--beir", help="with --peers: a BEIR folder, encoded by --model, for nDCG@10 per engine")
    parser.add_argument("--model", default=str(SHARED / "models" / "splade-tiny"))
    parser.add_argument("--cache_dir", default="/tmp/bench-retrieval-cache", help="document vectors of --beir")
    args = parser.parse_args()

    p = term_distribution(args.offset)
    started = time.perf_counter()
    if args.shards_dir:
        docs = write_shards(args.docs, *args.doc_terms, p, args.shards_dir)
    else:
        docs = synthetic_vectors(args.docs, *args.doc_terms, p, seed=1)
    queries = synthetic_vectors(args.queries, *args.query_terms, p, seed=2)
    print(
        f"data: {args.docs:,} docs, {args.queries} queries x {queries.nnz / args.queries:.1f} terms "
        f"({time.perf_counter() - started:.0f} s to generate); RSS {psutil.Process().memory_info().rss / 2**30:.1f} GiB"
    )

    started = time.perf_counter()
    index = retrieval.build_index(docs)
    build_seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(
        f"index: {index.nnz / index.num_docs:.1f} terms/doc, {index.nbytes / 2**30:.2f} GiB "
        f"({index.nbytes / index.nnz:.2f} bytes/posting), built in {build_seconds:.1f} s; peak RSS {peak:.1f} GiB; "
        f"FLOPS statistic {retrieval.flops_statistic(queries, index):.2f}"
    )

    started = time.perf_counter()
    retrieval.search(index, queries[:2], k=args.k, method="kernel")
    print(f"first kernel call (compiles unless numba's cache has it): {time.perf_counter() - started:.1f} s")
    threads = numba.config.NUMBA_NUM_THREADS
    timings = {}
    for n_threads in sorted({1, threads}):
        p50, p99, timings[n_threads] = latencies_ms(index, queries, args.k, n_threads)
        print(
            f"ours, {n_threads} thread(s): one query per call p50 {p50:.1f} ms, p99 {p99:.1f} ms; "
            f"all queries in one call {timings[n_threads]:.2f} ms/query"
        )
    if args.pruned_ks:
        compare_pruned(index, queries, args.pruned_ks)
    numba.set_num_threads(threads)
    if args.peers:  # the peer engines on the same vectors, then on a real corpus encoded by --model
        rows = peer_table.peer_rows(index, queries[: args.peers], build_s=build_seconds)
        shown = min(args.peers, queries.shape[0])
        peer_table.print_table(rows, f"{index.num_docs:,} synthetic documents, {shown} queries")
        if args.beir:
            rows = peer_table.beir_rows(args.model, args.beir, args.cache_dir)
            peer_table.print_table(rows, f"{Path(args.beir).name}, {Path(args.model).name}")
    if args.shards_dir or not args.scipy_queries:
        return
    result = retrieval.search(index, queries[: args.scipy_queries], k=args.k, method="kernel")
    scipy_ms = compare_with_scipy(docs, queries, result, args.k, args.scipy_queries)
    print(
        f"speed-up over scipy: {scipy_ms / timings[1]:.1f}x on 1 thread, {scipy_ms / timings[threads]:.1f}x "
        f"on {threads} threads"
    )


if __name__ == "__main__":
    main()
