"""The compiled search kernels behind retrieval.search for large collections (numba, threads).

Kept apart so that numba is imported, and the kernels compiled, only when a search is large enough to
need them: compiling takes 15-60 s on a fresh checkout (``cache=True`` then keeps it in __pycache__),
while a small evaluation set is searched in well under a second by the dense path of retrieval/index.py.

- ``_search_queries`` (method='kernel'): exhaustive, every posting of every query term.
- ``_search_queries_pruned`` (method='pruned'): MaxScore over two weight tiers, hand-written because the
  result must be the exhaustive one bit for bit (our float32 summation order and tie rule), which no
  engine offers. Bound: a document's score is a sum of qw * w over its query terms, each at most qw * the
  term's largest weight (qw * tau outside its high tier), so a document found only in parts whose bounds
  sum below the k-th best score so far cannot enter; every bound is widened against float32 rounding in
  any order, and survivors are re-scored in the query's term order. Its scan skips runs of 128
  accumulator entries with one vectorised max, which is most of its gain on iid synthetic data.
"""

from __future__ import annotations

import numba
import numpy as np

from retrieval.index import RANK_LIMIT

# Documents per accumulator block: 2**18 float32 = 1 MiB, a core's L2 cache on recent x86 server cores (or a
# slice of L3), so the scattered adds of a query hit cache instead of memory (the accumulator of 8.8M
# documents is 35 MB). Measured on 1M synthetic documents (bench/bench_retrieval.py's, AMD EPYC znver4, 1 MiB
# L2): 2**18 is 5-10 % faster than 2**17 and as fast as one block of all 1M; smaller blocks are slower.
BLOCK_DOCS = 1 << 18


@numba.njit(inline="always")
def _pack(score_bits, rank):
    return (np.int64(score_bits) << 32) | np.int64(RANK_LIMIT - rank)


@numba.njit(inline="always")
def _keep_best(keys, n, k):
    """Move the k largest of keys[:n] to keys[:k] (in any order); return the smallest of them."""
    best = np.partition(keys[:n], n - k)[n - k :]
    keys[:k] = best
    return best.min()


@numba.njit(inline="always")
def _offer(keys, n_keys, key, k, bar_key, bar_bits):
    """Add a ranking key to the buffer; a full buffer (2k keys) is cut back to its best k (a partition, linear
    time), which raises the bar. Returns the new (n_keys, bar_key, bar_bits)."""
    keys[n_keys] = key
    n_keys += 1
    if n_keys < keys.shape[0]:
        return n_keys, bar_key, bar_bits
    bar_key = _keep_best(keys, n_keys, k)
    return k, bar_key, np.int32(bar_key >> 32)


@numba.njit(inline="always")
def _add_postings(acc, doc_index, weights, begin, stop, qw, block_start):
    # Unsigned indices throughout: numba tests a signed index for wraparound (negative = from the end), which
    # doubled the instructions of this loop, the search's hottest (5 a posting instead of 11).
    base = np.uint64(begin)
    for i in range(stop - begin):
        p = base + np.uint64(i)
        acc[np.uint32(doc_index[p] - block_start)] += qw * weights[p]


ADD_RUN = 16  # postings per test of the block's end in _add_block


@numba.njit(inline="always")
def _add_block(acc, doc_index, weights, begin, end, block_end, qw, block_start):
    """_add_postings from begin up to the list's first document >= block_end (or its end); returns where it
    stopped. The block's end is tested once per ADD_RUN postings, on a document the loop reads anyway: a
    search for it first (binary, or galloping) costs a dozen cache misses in a long list, measured at
    ~0.15 ms a query of 32 terms over 1M documents, 5 % of the search."""
    p = begin
    while p + ADD_RUN <= end and doc_index[p + ADD_RUN - 1] < block_end:
        _add_postings(acc, doc_index, weights, p, p + ADD_RUN, qw, block_start)
        p += ADD_RUN
    while p < end and doc_index[p] < block_end:
        acc[np.uint32(doc_index[p] - block_start)] += qw * weights[p]
        p += 1
    return p


@numba.njit(inline="always")
def _write_best(keys, n_keys, k, row, doc_of_rank, out):
    """Best first into row of out = (out_doc, out_score_bits, out_hits): sort the kept keys, decode score bits
    and document; the rest of the row is -1 / 0."""
    out_doc, out_score_bits, out_hits = out
    size = min(n_keys, k)
    best = np.sort(keys[:n_keys])[::-1][:size]
    out_hits[row] = size
    for pos in range(size):
        out_score_bits[row, pos] = np.int32(best[pos] >> 32)
        out_doc[row, pos] = doc_of_rank[RANK_LIMIT - (best[pos] & RANK_LIMIT)]
    for pos in range(size, k):
        out_doc[row, pos] = -1
        out_score_bits[row, pos] = 0


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
    workspace,
    out,
):
    """Score queries first_query..last_query-1 exactly and keep each one's top k.

    Term-at-a-time in blocks of documents: for each block, add every query term's postings that
    fall in it (posting lists are sorted by document: one cursor per term walks forward) into a
    small accumulator, then scan the accumulator. Hits that beat the current k-th best go into a
    buffer of 2k ranking keys (_offer). workspace = (accumulators, cursors, key buffers), a row per
    thread; thread t takes queries first+t, first+t+n...; out = (out_doc, out_score_bits, out_hits)."""
    acc_workspace, cursor_workspace, key_workspace = workspace
    n_threads = acc_workspace.shape[0]
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
                    stop = _add_block(acc, doc_index, weights, begin, end, block_end, qw, block_start)
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
                    n_keys, bar_key, bar_bits = _offer(keys, n_keys, key, k, bar_key, bar_bits)

            row = qi - first_query
            _write_best(keys, n_keys, k, row, doc_of_rank, out)


# Relative slack on every pruning bound, per query term: a float32 sum of n positive products in any
# order is within n * 2**-24 of the real sum, so the exact (query-order) score is at most the bound
# computed in another order times (1 + 2n * 2**-24); twice that again, plus a floor, is safe.
SLACK_PER_TERM = 4.0 * 2.0**-24
SLACK_FLOOR = 1e-6
# Non-essential parts may bound up to this fraction of theta: at theta itself nearly every document of
# the essential lists stays a candidate (measured: more look-ups than postings spared); at half of it
# few do, while most of the spared postings are still spared.
NE_FRACTION = 0.25
# A look-up of a non-essential weight costs about as much as adding this many postings (measured on
# bench/bench_retrieval.py's workload): a block whose look-ups cost more than the postings they spared
# is followed by a few exhaustive ones before pruning is tried again.
LOOKUP_COST = 64
# Pruning is tried only for k up to this: for top-1000 on that workload theta stays low, nearly every
# first pruned block cost more in look-ups than it spared, and the kernel then runs exhaustively anyway.
PRUNE_MAX_K = 100
# Posting lists at least this long get a high tier: a copy of their postings above the term's
# (1 - HIGH_FRACTION) weight quantile, so that the rest of the list is bounded by that quantile
# instead of the term's largest weight (memory: about HIGH_FRACTION of those postings, 8 bytes each).
HIGH_MIN_POSTINGS = 1024
HIGH_FRACTION = 0.1


@numba.njit(cache=True)
def build_high_tier(term_ptr, doc_index, weights, min_postings, fraction):
    """(tau, high_ptr, high_doc, high_weight): for each term with at least min_postings postings, tau =
    the weight below which lie (1 - fraction) of them and its postings of weight > tau, in document
    order; other terms get tau = their largest weight and no high postings."""
    vocab = len(term_ptr) - 1
    tau = np.zeros(vocab, dtype=np.float32)
    high_ptr = np.zeros(vocab + 1, dtype=np.int64)
    for t in range(vocab):
        begin, end = term_ptr[t], term_ptr[t + 1]
        n = end - begin
        count = 0
        if n >= min_postings:
            cut = min(n - 1, int(n * (1.0 - fraction)))
            tau[t] = np.partition(weights[begin:end].copy(), cut)[cut]
            for p in range(begin, end):
                if weights[p] > tau[t]:
                    count += 1
        elif n > 0:
            tau[t] = weights[begin:end].max()
        high_ptr[t + 1] = high_ptr[t] + count
    high_doc = np.empty(high_ptr[vocab], dtype=np.int32)
    high_weight = np.empty(high_ptr[vocab], dtype=np.float32)
    for t in range(vocab):
        q = high_ptr[t]
        if high_ptr[t + 1] > q:
            for p in range(term_ptr[t], term_ptr[t + 1]):
                if weights[p] > tau[t]:
                    high_doc[q] = doc_index[p]
                    high_weight[q] = weights[p]
                    q += 1
    return tau, high_ptr, high_doc, high_weight


@numba.njit(inline="always")
def _gallop(doc_index, begin, end, target):
    """First p in [begin, end) with doc_index[p] >= target (end if none): doubling steps from begin,
    then a binary search, so a lookup just past the cursor costs a step or two."""
    lo = begin
    hi = begin
    step = 1
    while hi < end and doc_index[hi] < target:
        lo = hi + 1
        hi = begin + step
        step *= 2
    if hi > end:
        hi = end
    while lo < hi:
        mid = (lo + hi) >> 1
        if doc_index[mid] < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(inline="always")
def _seek(doc_index, begin, end, target):
    """_gallop after a few single steps: the posting sought is often one of the next few."""
    p = begin
    for _ in range(4):
        if p == end or doc_index[p] >= target:
            return p
        p += 1
    return _gallop(doc_index, p, end, target)


SCAN_RUN = 128  # accumulator entries per vectorised test of the scan


@numba.njit(inline="always")
def _run_max(bits, begin, end):
    """The largest of bits[begin:end]. A full run is a loop of constant length over unsigned indices, which
    LLVM turns into a few vector max instructions; measured on AMD EPYC (znver4), 1M entries: runs of 128
    cost 0.055 ms, runs of 64 0.64 ms (LLVM's vectorisation of a 64-long loop is poor), a loop of variable
    length or signed indices (numba's wraparound test) about as slow."""
    top = np.int32(0)
    if end - begin == SCAN_RUN:
        base = np.uint64(begin)
        for i in range(SCAN_RUN):
            v = bits[base + np.uint64(i)]
            top = v if v > top else top
    else:
        for i in range(begin, end):
            top = max(top, bits[i])
    return top


# States of a query term within a block of the pruned kernel.
FULL = 0  # essential: the whole posting list is added
SPLIT = 1  # the high tier is added; the rest (weights <= tau) is non-essential, bounded by qw * tau
NONE = 2  # non-essential, bounded by qw * the term's largest weight


@numba.njit(parallel=True, cache=True)
def _search_queries_pruned(
    term_ptr,
    doc_index,
    weights,
    term_max,
    tau,
    high_ptr,
    high_doc,
    high_weight,
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
    workspace,
    out,
    out_stats,
    ne_fraction,
    lookup_cost,
    prune_max_k,
):
    """_search_queries with MaxScore pruning over two tiers; the same hits, order and score bits.

    Per block, theta = the current k-th best score. Each query term has two parts: its high tier
    (weights > tau, bounded by qw * max) and the rest (bounded by qw * tau); the parts of least bound,
    as many as sum below ne_fraction * theta, are non-essential (NE), so a document found in no
    essential part scores below theta and is never looked at. The essential parts are added into the
    accumulator in query order; a document there whose sum + the NE bounds could reach theta looks its
    NE weights up in the full posting lists (one forward cursor per term: documents come in ascending
    order), largest bound first, dropping out once it can no longer reach theta. A survivor with a
    posting outside the parts added is re-scored over all its terms in the query's order, the
    exhaustive kernel's, so its float32 score is bit for bit the same; without one, the accumulator
    already holds that sum. Where it may prune (k <= prune_max_k), the first blocks are small (theta
    rises sooner); after a block whose look-ups cost more than the postings they spared, and for
    k > prune_max_k, blocks are scored exhaustively (with the same scan: runs of SCAN_RUN entries below
    the floor cost one vectorised max).
    out_stats[row]: postings added, NE look-ups, candidates looked up, survivors re-scored."""
    acc_workspace, cursor_workspace, key_workspace = workspace
    n_threads = acc_workspace.shape[0]
    max_terms = cursor_workspace.shape[1]
    for t in numba.prange(n_threads):
        acc = acc_workspace[t]
        acc_bits = acc.view(np.int32)
        cursor = cursor_workspace[t]  # in the full lists
        keys = key_workspace[t]
        hcursor = np.empty(max_terms, dtype=np.int64)  # in the high tiers (caught up when pruning is tried)
        rcursor = np.empty(max_terms, dtype=np.int64)  # re-scoring cursors in the full lists
        stop_at = np.empty(max_terms, dtype=np.int64)  # each full list's end within the current block
        hi_bound = np.empty(max_terms, dtype=np.float32)  # qw * max
        lo_bound = np.empty(max_terms, dtype=np.float32)  # qw * tau
        look = np.empty(max_terms, dtype=np.float32)  # the current candidate's product per looked-up term
        state = np.empty(max_terms, dtype=np.int64)
        items = np.empty(2 * max_terms, dtype=np.float64)
        ne_terms = np.empty(max_terms, dtype=np.int64)  # NE terms, largest bound first
        ne_bound = np.empty(max_terms, dtype=np.float64)
        ne_val = np.empty(max_terms, dtype=np.float64)  # each NE term's share of ne_sum
        one = np.empty(1, dtype=np.float32)
        one_bits = one.view(np.int32)
        for qi in range(first_query + t, last_query, n_threads):
            q_first = q_ptr[qi]
            n_terms = q_ptr[qi + 1] - q_first
            for j in range(n_terms):
                term = q_terms[q_first + j]
                qw = q_weights[q_first + j]
                cursor[j] = term_ptr[term]
                hcursor[j] = high_ptr[term]
                hi_bound[j] = qw * term_max[term]  # >= every product qw * w of the term (rounding is monotone)
                lo_bound[j] = qw * tau[term]  # >= qw * w for w <= tau
            # NE candidates, smallest bound first: a rest part (value lo), then a high tier on top (hi - lo)
            for j in range(n_terms):
                items[2 * j] = lo_bound[j]
                items[2 * j + 1] = np.float64(hi_bound[j]) - lo_bound[j]
            order = np.argsort(items[: 2 * n_terms])
            widen = 1.0 + SLACK_FLOOR + SLACK_PER_TERM * n_terms
            n_added = 0
            n_lookups = 0
            n_cands = 0
            n_rescored = 0
            rest_blocks = 0  # exhaustive blocks to go before pruning is tried again
            n_keys = 0
            bar_key = np.int64(-1)
            bar_bits = np.int32(0)
            skip = exclude[qi]
            block_start = 0
            block_size = max(1, block_docs >> 3) if k <= prune_max_k else block_docs
            while block_start < num_docs:
                block_end = min(block_start + block_size, num_docs)
                block_size = min(2 * block_size, block_docs)  # small blocks first: theta rises sooner
                one_bits[0] = bar_bits
                theta = np.float64(one[0])  # 0 until k hits are kept
                # Choose the NE parts for this block.
                for j in range(n_terms):
                    state[j] = FULL
                ne_sum = 0.0
                n_ne = 0
                if theta > 0 and rest_blocks == 0 and k <= prune_max_k:
                    for j in range(n_terms):  # the high tiers' cursors move only in blocks that prune
                        term = q_terms[q_first + j]
                        hcursor[j] = _gallop(high_doc, hcursor[j], high_ptr[term + 1], block_start)
                    budget = ne_fraction * theta
                    for i in range(2 * n_terms):
                        item = order[i]
                        j = item >> 1
                        value = items[item]
                        if (item & 1) == 0:
                            if (ne_sum + value) * widen < budget:
                                ne_sum += value
                                ne_val[j] = value
                                # no high posting left: every posting to come is <= tau, bounded by value
                                state[j] = SPLIT if high_ptr[q_terms[q_first + j] + 1] > hcursor[j] else NONE
                        elif state[j] == SPLIT and (ne_sum + value) * widen < budget:
                            ne_sum += value
                            ne_val[j] += value
                            state[j] = NONE
                    # NE terms by decreasing bound, for the look-ups
                    for j in range(n_terms):
                        if state[j] != FULL:
                            bound = ne_val[j]
                            pos = n_ne
                            while pos > 0 and ne_bound[pos - 1] < bound:
                                ne_bound[pos] = ne_bound[pos - 1]
                                ne_terms[pos] = ne_terms[pos - 1]
                                pos -= 1
                            ne_bound[pos] = bound
                            ne_terms[pos] = j
                            n_ne += 1
                elif rest_blocks > 0:
                    rest_blocks -= 1
                prune = n_ne > 0
                touched = False
                spared = 0
                for j in range(n_terms):
                    term = q_terms[q_first + j]
                    qw = q_weights[q_first + j]
                    begin = cursor[j]
                    rcursor[j] = begin
                    if state[j] == FULL:
                        stop = _add_block(
                            acc, doc_index, weights, begin, term_ptr[term + 1], block_end, qw, block_start
                        )
                        n_added += stop - begin
                        touched = touched or stop > begin
                    else:
                        stop = _gallop(doc_index, begin, term_ptr[term + 1], block_end)
                        spared += stop - begin
                    stop_at[j] = stop
                    if state[j] == SPLIT:
                        hbegin = hcursor[j]
                        hstop = _gallop(high_doc, hbegin, high_ptr[term + 1], block_end)
                        _add_postings(acc, high_doc, high_weight, hbegin, hstop, qw, block_start)
                        hcursor[j] = hstop
                        n_added += hstop - hbegin
                        spared -= hstop - hbegin
                        touched = touched or hstop > hbegin
                if not touched:
                    for j in range(n_terms):
                        cursor[j] = stop_at[j]
                    block_start = block_end
                    continue
                block_lookups = 0
                rescored_before = n_rescored
                n_local = block_end - block_start
                if prune:
                    # A candidate needs (s + ne_sum) * widen >= theta: s >= cut, cut rounded down to float32
                    # (more candidates, never fewer), tested on the bit patterns as the bar is.
                    cut = theta / widen - ne_sum
                    one[0] = np.float32(cut * (1.0 - 2.0**-20)) if cut > 0 else np.float32(0)
                    floor_bits = max(one_bits[0], np.int32(1))
                else:
                    floor_bits = max(bar_bits, np.int32(1))  # >= 1: score 0 = no common term
                # The scan: a run of documents none of which reaches the floor costs one vectorised max.
                for run in range(0, n_local, SCAN_RUN):
                    run_end = min(run + SCAN_RUN, n_local)
                    if _run_max(acc_bits, run, run_end) < floor_bits:
                        continue
                    for local in range(run, run_end):
                        bits = acc_bits[local]
                        if bits < floor_bits:
                            continue
                        d = block_start + local
                        if prune:
                            s = acc[local]
                            n_cands += 1
                            rest = ne_sum
                            part = 0.0
                            outside = False  # a posting not in the accumulator
                            alive = True
                            for i in range(n_ne):  # largest bound first
                                j = ne_terms[i]
                                rest -= ne_bound[i]
                                term = q_terms[q_first + j]
                                p = _seek(doc_index, cursor[j], stop_at[j], d)
                                cursor[j] = p
                                block_lookups += 1
                                look[j] = 0
                                if p < stop_at[j] and doc_index[p] == d:
                                    look[j] = q_weights[q_first + j] * weights[p]
                                    if state[j] == NONE or weights[p] <= tau[term]:
                                        part += look[j]
                                        outside = True
                                if (s + part + rest) * widen < theta:
                                    alive = False
                                    break
                            if not alive:
                                continue
                            if outside:  # re-score in query order: the exhaustive kernel's float32 sum
                                n_rescored += 1
                                exact = np.float32(0)
                                for j in range(n_terms):
                                    if state[j] != FULL:
                                        exact += look[j]
                                    else:
                                        p = _seek(doc_index, rcursor[j], stop_at[j], d)
                                        rcursor[j] = p
                                        if p < stop_at[j] and doc_index[p] == d:
                                            exact += q_weights[q_first + j] * weights[p]
                                one[0] = exact
                                bits = one_bits[0]
                        if bits < bar_bits:
                            continue
                        key = _pack(bits, tie_rank[d])
                        if key <= bar_key or d == skip:
                            continue
                        n_keys, bar_key, bar_bits = _offer(keys, n_keys, key, k, bar_key, bar_bits)
                        if not prune:
                            floor_bits = max(bar_bits, np.int32(1))
                acc[:n_local] = 0
                for j in range(n_terms):
                    cursor[j] = stop_at[j]
                n_lookups += block_lookups
                if prune and lookup_cost * (block_lookups + n_terms * (n_rescored - rescored_before)) > spared:
                    rest_blocks = num_docs  # the look-ups cost more than the postings they spared: stop pruning
                if n_keys >= k:  # raise theta for the next block (the kept set stays the best k)
                    bar_key = _keep_best(keys, n_keys, k)
                    bar_bits = np.int32(bar_key >> 32)
                    n_keys = k
                block_start = block_end

            row = qi - first_query
            _write_best(keys, n_keys, k, row, doc_of_rank, out)
            out_stats[row, 0] = n_added
            out_stats[row, 1] = n_lookups
            out_stats[row, 2] = n_cands
            out_stats[row, 3] = n_rescored


def search_with_kernel(index, queries, k, tie_ranks, doc_of_rank, exclude, step, block_docs, bar, pruned=False):
    """Fill (out_doc, out_score_bits, out_hits, stats) for every query row, ``step`` queries per kernel call:
    exhaustively, or with MaxScore pruning (``pruned``; ``stats``, else None, per query: postings added,
    look-ups, candidates, re-scored)."""
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
    stats = np.zeros((num_queries, 4), dtype=np.int64) if pruned else None
    q_ptr = queries.indptr.astype(np.int64)
    q_terms = queries.indices.astype(np.int64)
    # Calls of a few queries per thread keep the progress bar moving without costing speed.
    step = step or max(64 * n_threads, 1)
    for first in range(0, num_queries, step):
        last = min(first + step, num_queries)
        head = (index.term_ptr, index.doc_index, index.weights)
        if pruned:
            head = head + (index.term_max, *index.high_tier)
        tail = (
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
            (acc_workspace, cursor_workspace, key_workspace),
            (out_doc[first:last], out_score_bits[first:last], out_hits[first:last]),
        )
        if pruned:
            _search_queries_pruned(*head, *tail, stats[first:last], NE_FRACTION, LOOKUP_COST, PRUNE_MAX_K)
        else:
            _search_queries(*head, *tail)
        bar.update(last - first)
    return out_doc, out_score_bits, out_hits, stats
