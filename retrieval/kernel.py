"""The compiled search kernel behind retrieval.search for large collections (numba, threads).

Kept apart so that numba is imported, and the kernel compiled, only when a search is large enough to
need it: compiling takes 15-60 s on a fresh checkout (``cache=True`` then keeps it in __pycache__),
while a small evaluation set is searched in well under a second by the dense path of retrieval/index.py.
"""

from __future__ import annotations

import numba
import numpy as np

from retrieval.index import RANK_LIMIT

# Documents per accumulator block: 2**17 float32 = 512 KiB stays in a core's L2 cache, so the
# scattered adds of a query hit cache instead of memory (the accumulator of 8.8M documents is 35 MB).
BLOCK_DOCS = 1 << 17


@numba.njit(inline="always")
def _pack(score_bits, rank):
    return (np.int64(score_bits) << 32) | np.int64(RANK_LIMIT - rank)


@numba.njit(inline="always")
def _keep_best(keys, n, k):
    """Move the k largest of keys[:n] to keys[:k] (in any order); return the smallest of them."""
    best = np.partition(keys[:n], n - k)[n - k :]
    keys[:k] = best
    return best.min()


@numba.njit(parallel=True, cache=True)
def _search_queries(
    term_ptr,
    doc_index,
    weights,
    num_docs,
    q_ptr,
    q_terms,
    q_weights,
    first_query,
    last_query,
    k,
    block_docs,
    tie_rank,
    doc_of_rank,
    exclude,
    acc_workspace,
    cursor_workspace,
    key_workspace,
    out_doc,
    out_score_bits,
    out_hits,
):
    """Score queries first_query..last_query-1 exactly and keep each one's top k.

    Term-at-a-time in blocks of documents: for each block, add every query term's postings that
    fall in it (posting lists are sorted by document: one cursor per term walks forward) into a
    small accumulator, then scan the accumulator. Hits that beat the current k-th best go into a
    buffer of 2k ranking keys; a full buffer is cut back to its best k (a partition, linear time),
    which raises the bar. One thread per workspace row; thread t takes queries first+t, first+t+n..."""
    n_threads = acc_workspace.shape[0]
    capacity = key_workspace.shape[1]
    for t in numba.prange(n_threads):
        acc = acc_workspace[t]
        acc_bits = acc.view(np.int32)
        cursor = cursor_workspace[t]
        keys = key_workspace[t]
        for qi in range(first_query + t, last_query, n_threads):
            q_first = q_ptr[qi]
            n_terms = q_ptr[qi + 1] - q_first
            for j in range(n_terms):
                cursor[j] = term_ptr[q_terms[q_first + j]]
            n_keys = 0
            bar_key = np.int64(-1)  # every hit beats it until k hits are kept
            bar_bits = np.int32(0)  # score bits of the k-th best so far
            skip = exclude[qi]
            for block_start in range(0, num_docs, block_docs):
                block_end = min(block_start + block_docs, num_docs)
                touched = False
                for j in range(n_terms):
                    qw = q_weights[q_first + j]
                    begin = cursor[j]
                    end = term_ptr[q_terms[q_first + j] + 1]
                    stop = begin + np.searchsorted(doc_index[begin:end], block_end)
                    for p in range(begin, stop):
                        acc[np.uint32(doc_index[p] - block_start)] += qw * weights[p]  # unsigned: no wraparound test
                    cursor[j] = stop
                    touched = touched or stop > begin
                if not touched:
                    continue
                for local in range(block_end - block_start):
                    s = acc[local]
                    if s == 0:  # weights are >= 0: score 0 = no common term (or nothing to add)
                        continue
                    bits = acc_bits[local]
                    acc[local] = 0
                    if bits < bar_bits:
                        continue
                    d = block_start + local
                    key = _pack(bits, tie_rank[d])
                    if key <= bar_key or d == skip:
                        continue
                    keys[n_keys] = key
                    n_keys += 1
                    if n_keys == capacity:
                        bar_key = _keep_best(keys, n_keys, k)
                        bar_bits = np.int32(bar_key >> 32)
                        n_keys = k

            # Best first: sort the kept keys, decode score bits and document.
            row = qi - first_query
            size = min(n_keys, k)
            best = np.sort(keys[:n_keys])[::-1][:size]
            out_hits[row] = size
            for pos in range(size):
                out_score_bits[row, pos] = np.int32(best[pos] >> 32)
                out_doc[row, pos] = doc_of_rank[RANK_LIMIT - (best[pos] & RANK_LIMIT)]
            for pos in range(size, k):
                out_doc[row, pos] = -1
                out_score_bits[row, pos] = 0


def search_with_kernel(index, queries, k, tie_ranks, doc_of_rank, exclude, step, block_docs, bar):
    """Fill (out_doc, out_score_bits, out_hits) for every query row, ``step`` queries per kernel call."""
    num_queries = queries.shape[0]
    n_threads = numba.get_num_threads()
    block_docs = max(1, min(block_docs or BLOCK_DOCS, index.num_docs))
    acc_workspace = np.zeros((n_threads, block_docs), dtype=np.float32)
    max_terms = int(np.diff(queries.indptr).max()) if num_queries else 0
    cursor_workspace = np.empty((n_threads, max(max_terms, 1)), dtype=np.int64)
    key_workspace = np.empty((n_threads, 2 * k), dtype=np.int64)
    out_doc = np.empty((num_queries, k), dtype=np.int32)
    out_score_bits = np.empty((num_queries, k), dtype=np.int32)  # float32 bit patterns
    out_hits = np.empty(num_queries, dtype=np.int32)
    q_ptr = queries.indptr.astype(np.int64)
    q_terms = queries.indices.astype(np.int64)
    # Calls of a few queries per thread keep the progress bar moving without costing speed.
    step = step or max(64 * n_threads, 1)
    for first in range(0, num_queries, step):
        last = min(first + step, num_queries)
        _search_queries(
            index.term_ptr,
            index.doc_index,
            index.weights,
            index.num_docs,
            q_ptr,
            q_terms,
            queries.data,
            first,
            last,
            k,
            block_docs,
            tie_ranks,
            doc_of_rank,
            exclude,
            acc_workspace,
            cursor_workspace,
            key_workspace,
            out_doc[first:last],
            out_score_bits[first:last],
            out_hits[first:last],
        )
        bar.update(last - first)
    return out_doc, out_score_bits, out_hits
