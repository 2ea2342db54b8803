"""The exact inverted index and top-k search over SPLADE vectors (scipy CSR in, numpy arrays out).

- ``build_index``: an inverted index (posting lists = the CSC form of the document matrix,
  int64 term offsets, int32 document numbers, float32 weights), built from one matrix or from
  shard files one at a time so the document matrix never has to be in memory twice.
- ``search``: exact top-k by score = sum over the query's terms of q_w * d_w. Small searches (up to
  DENSE_SEARCH_CELLS queries x documents over at most DENSE_MAX_DOCS documents, e.g. most BEIR sets or
  the in-training dev subset) score whole
  rows with scipy; larger ones use retrieval/kernel.py, a term-at-a-time numba kernel over cache-sized
  blocks of documents with queries spread over threads, compiled (and numba imported) only then, by
  default its MaxScore variant (method='pruned': skips documents that provably cannot reach the current
  k-th best score, with per-term maxima and a high tier of each long posting list built once per
  index). All add in the same order and return identical results. Ties: score descending, then document id
  descending in byte order, trec_eval's own order (see ``trec_tie_ranks``), so a run file re-scored by
  trec_eval / pytrec_eval ranks exactly as we did.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm

# ---------------------------------------------------------------------------------------------
# Inverted index
# ---------------------------------------------------------------------------------------------


@dataclass
class InvertedIndex:
    """Posting lists of a document matrix: documents containing term t are
    ``doc_index[term_ptr[t]:term_ptr[t+1]]`` (ascending) with weights ``weights[...]``."""

    term_ptr: np.ndarray  # int64, vocab_size + 1
    doc_index: np.ndarray  # int32, nnz
    weights: np.ndarray  # float32, nnz
    num_docs: int

    @property
    def vocab_size(self) -> int:
        return len(self.term_ptr) - 1

    @property
    def nnz(self) -> int:
        return len(self.doc_index)

    @property
    def nbytes(self) -> int:
        return self.term_ptr.nbytes + self.doc_index.nbytes + self.weights.nbytes

    def posting_lengths(self) -> np.ndarray:
        """Number of documents in which each term is active (document frequency)."""
        return np.diff(self.term_ptr)

    # Computed on first use and kept with the index (one pass over the postings, not one per search):
    # they assume the arrays are not modified in place afterwards.
    @cached_property
    def term_max(self) -> np.ndarray:
        """float32 (vocab_size,): each term's largest weight, 0 for a term in no document (the pruning
        bound of search(method='pruned'); 4 bytes a term)."""
        out = np.zeros(self.vocab_size, dtype=np.float32)
        present = np.flatnonzero(np.diff(self.term_ptr) > 0)
        if len(present):
            out[present] = np.maximum.reduceat(self.weights, self.term_ptr[present])
        return out

    @cached_property
    def high_tier(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(tau, high_ptr, high_doc, high_weight) of retrieval/kernel.py's build_high_tier: for each long
        posting list, its weight quantile tau and a copy of its postings above it (search(method='pruned'))."""
        from retrieval.kernel import HIGH_FRACTION, HIGH_MIN_POSTINGS, build_high_tier  # imports numba

        return build_high_tier(self.term_ptr, self.doc_index, self.weights, HIGH_MIN_POSTINGS, HIGH_FRACTION)

    @cached_property
    def default_tie_ranks(self) -> np.ndarray:
        """int32 0..num_docs-1: the tie ranks (and their inverse) when search() is given none."""
        return np.arange(self.num_docs, dtype=np.int32)


def _as_csr_float32(matrix, what: str) -> sp.csr_matrix:
    matrix = sp.csr_matrix(matrix)
    if matrix.dtype != np.float32:
        matrix = matrix.astype(np.float32)
    if matrix.nnz and not np.isfinite(matrix.data).all():
        raise ValueError(f"{what}: contains NaN or infinite weights")
    if matrix.nnz and matrix.data.min() < 0:
        # The kernel finds a document's first contribution by its accumulator being 0, which
        # needs every product to be positive. SPLADE weights (log1p of relu) always are.
        raise ValueError(f"{what}: contains negative weights; SPLADE weights are >= 0")
    return matrix


def _load_shard(shard) -> sp.csr_matrix:
    """A shard as float32 CSR with one positive entry per (document, term): both index passes count the same."""
    if isinstance(shard, (str, os.PathLike)):
        matrix = _as_csr_float32(sp.load_npz(shard), str(shard))
    else:
        matrix = _as_csr_float32(shard, "document matrix")
    if not matrix.has_canonical_format or (matrix.data == 0).any():
        matrix = matrix.copy()  # the in-place clean-up below must not touch the caller's matrix
        matrix.sum_duplicates()
        matrix.eliminate_zeros()  # explicit zeros carry no score
    return matrix


def _scatter_postings(matrix: sp.csr_matrix, first_doc: int, fill_pos: np.ndarray, doc_index, weights) -> None:
    """Append the rows of one CSR shard to the posting lists. Rows arrive in document order, so every
    posting list stays sorted by document number. scipy's CSC conversion groups the shard by term (in C++);
    each term's run of postings then lands at that term's fill position."""
    by_term = matrix.tocsc()
    by_term.sort_indices()
    counts = np.diff(by_term.indptr)
    width = len(counts)
    targets = np.repeat(fill_pos[:width] - by_term.indptr[:-1], counts) + np.arange(by_term.nnz)
    doc_index[targets] = by_term.indices + first_doc
    weights[targets] = by_term.data
    fill_pos[:width] += counts


def build_index(doc_vectors, vocab_size: int | None = None, show_progress: bool = False) -> InvertedIndex:
    """Build the inverted index.

    ``doc_vectors`` is a CSR matrix (documents x vocabulary) or a sequence of shards: CSR matrices
    or ``.npz`` files written by ``scipy.sparse.save_npz``, whose rows are consecutive documents.
    Shards are read twice (count, then fill), one at a time, so peak memory is the index plus
    one shard.
    """
    shards = [doc_vectors] if sp.issparse(doc_vectors) else list(doc_vectors)
    if not shards:
        raise ValueError("build_index: no document vectors given")

    # Pass 1: posting-list lengths.
    term_counts = None
    num_docs = 0
    for shard in tqdm(shards, desc="index: count", disable=not show_progress or len(shards) == 1):
        matrix = _load_shard(shard)
        width = matrix.shape[1] if vocab_size is None else vocab_size
        if matrix.shape[1] > width:
            raise ValueError(f"build_index: shard has {matrix.shape[1]} columns, vocabulary is {width}")
        counts = np.bincount(matrix.indices, minlength=width)
        term_counts = counts if term_counts is None else term_counts + counts
        num_docs += matrix.shape[0]
    if num_docs >= 2**31:
        raise ValueError(f"build_index: {num_docs} documents do not fit int32 document numbers")

    term_ptr = np.zeros(len(term_counts) + 1, dtype=np.int64)
    np.cumsum(term_counts, out=term_ptr[1:])
    nnz = int(term_ptr[-1])
    doc_index = np.empty(nnz, dtype=np.int32)
    weights = np.empty(nnz, dtype=np.float32)

    # Pass 2: fill the posting lists.
    fill_pos = term_ptr[:-1].copy()
    first_doc = 0
    for shard in tqdm(shards, desc="index: fill", disable=not show_progress or len(shards) == 1):
        matrix = _load_shard(shard)
        _scatter_postings(matrix, first_doc, fill_pos, doc_index, weights)
        first_doc += matrix.shape[0]
        del matrix
    return InvertedIndex(term_ptr=term_ptr, doc_index=doc_index, weights=weights, num_docs=num_docs)


# ---------------------------------------------------------------------------------------------
# Exact top-k search
# ---------------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    doc_index: np.ndarray  # int32 (num_queries, k), best first; -1 pads a query with fewer hits
    scores: np.ndarray  # float32 (num_queries, k)
    num_hits: np.ndarray  # int32 (num_queries,)
    # method='pruned' only, int64 (num_queries, 4): postings added, non-essential look-ups, candidates
    # looked up, survivors re-scored (the work pruning did; an exhaustive search adds every posting).
    stats: np.ndarray | None = field(default=None, repr=False)


def trec_tie_ranks(doc_ids: Sequence[str]) -> np.ndarray:
    """Tie-break rank of every document: 0 for the largest id in byte order (Python's str order
    is code-point order, the same as UTF-8 byte order). On equal scores the smaller rank wins,
    i.e. the larger id ranks first, which is trec_eval's rule (it sorts by score, then by
    strcmp(docno) descending) and so also pytrec_eval's, ir-measures' and BEIR's."""
    ids = np.asarray(doc_ids, dtype=str)
    order = np.argsort(ids, kind="stable")[::-1]
    ranks = np.empty(len(ids), dtype=np.int32)
    ranks[order] = np.arange(len(ids), dtype=np.int32)
    return ranks


# Ranking keys: for scores >= 0 the float32 bit pattern, read as an integer, orders like the score.
# key = score_bits << 32 | (RANK_LIMIT - tie_rank): larger key = better hit, ties to the smaller rank,
# and both the score and the document come back out of the key.
RANK_LIMIT = (1 << 32) - 1
# Up to this many query-document cells, search() scores densely with scipy (a few seconds at most)
# rather than compile the kernel, which costs 15-60 s on a fresh checkout (once; numba caches it).
DENSE_SEARCH_CELLS = 100_000_000
# ... and only over collections this small: a dense score row costs time in proportion to the collection
# for every query, so one query over 1M documents took 70 ms densely against 15 ms in the kernel.
DENSE_MAX_DOCS = 1 << 17
# search()'s methods; 'auto' takes 'dense' for small searches, else AUTO_KERNEL.
METHODS = ("auto", "dense", "kernel", "pruned")
AUTO_KERNEL = "pruned"
# Score rows per dense block: 2**22 cells of int64 keys = 32 MiB.
DENSE_BLOCK_CELLS = 1 << 22


def _dense_top_k(queries, postings, k, tie_ranks, doc_of_rank, exclude, bar):
    """Exact top k by whole score rows. ``queries @ postings`` runs scipy's row-by-row product, which
    adds each query term's postings into a float32 row in term order: the kernel's own order, so the
    scores, and with them the ties, are bit for bit the kernel's."""
    num_queries, num_docs = queries.shape[0], postings.shape[1]
    out_doc = np.full((num_queries, k), -1, dtype=np.int32)
    out_score_bits = np.zeros((num_queries, k), dtype=np.int32)
    out_hits = np.zeros(num_queries, dtype=np.int32)
    tie_keys = RANK_LIMIT - tie_ranks.astype(np.int64)
    width = min(k, num_docs)
    step = max(1, DENSE_BLOCK_CELLS // max(num_docs, 1))
    for first in range(0, num_queries, step):
        last = min(first + step, num_queries)
        scores = (queries[first:last] @ postings).toarray()
        keys = (scores.view(np.int32).astype(np.int64) << 32) | tie_keys
        keys[scores == 0] = -1  # weights are >= 0: score 0 = no common term
        rows = np.flatnonzero(exclude[first:last] >= 0)
        keys[rows, exclude[first:last][rows]] = -1
        if width < num_docs:
            keys = -np.partition(-keys, width - 1, axis=1)[:, :width]
        best = -np.sort(-keys, axis=1)[:, :width]
        found = best >= 0
        out_hits[first:last] = found.sum(axis=1)
        out_score_bits[first:last, :width] = np.where(found, best >> 32, 0)
        out_doc[first:last, :width] = np.where(found, doc_of_rank[RANK_LIMIT - (best & RANK_LIMIT)], -1)
        bar.update(last - first)
    return out_doc, out_score_bits, out_hits


def search(
    index: InvertedIndex,
    query_vectors,
    k: int = 1000,
    tie_ranks: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    show_progress: bool = False,
    queries_per_call: int | None = None,
    block_docs: int | None = None,
    method: str = "auto",
) -> SearchResult:
    """Exact top-k documents of every query row by dot product.

    ``tie_ranks[d]``: smaller wins among equal scores (default: document number, ascending;
    evaluate.py passes ``trec_tie_ranks(doc_ids)``). ``exclude[q]``: a document number never
    returned for query q (BEIR's rule that a query does not retrieve itself), -1 for none.
    ``method``: 'dense' (scipy score rows), 'kernel' (the compiled inverted-index kernel of
    retrieval/kernel.py, exhaustive), 'pruned' (the same with MaxScore pruning; fills
    ``SearchResult.stats``; the first call on an index builds ``term_max`` and ``high_tier``, one pass
    over the postings, about HIGH_FRACTION of the long lists' postings in memory) or 'auto': dense up to
    DENSE_SEARCH_CELLS queries x documents over at most DENSE_MAX_DOCS documents, else AUTO_KERNEL
    ('pruned', measured faster by bench/bench_retrieval.py). All give the same hits in the same order
    with the same scores. Setup independent of the queries (default tie ranks, bounds) is kept on the
    index, so a one-query call pays no O(num_docs) setup unless it passes its own ``tie_ranks``."""
    queries = _as_csr_float32(query_vectors, "query vectors")
    if queries.shape[1] > index.vocab_size:
        raise ValueError(f"search: queries have {queries.shape[1]} columns, the index {index.vocab_size} terms")
    queries = sp.csr_matrix((queries.data, queries.indices, queries.indptr), shape=(queries.shape[0], index.vocab_size))
    queries.sort_indices()
    num_queries = queries.shape[0]
    k = int(k)
    if k < 1:
        raise ValueError("search: k must be >= 1")
    if method not in METHODS:
        raise ValueError(f"search: method must be one of {', '.join(map(repr, METHODS))}, not {method!r}")
    if exclude is None:
        exclude = np.full(num_queries, -1, dtype=np.int64)
    exclude = np.ascontiguousarray(exclude, dtype=np.int64)
    if len(exclude) != num_queries:
        raise ValueError("search: exclude needs one entry per query")
    if tie_ranks is None:  # the identity, its own inverse: built once per index, not per call
        tie_ranks = doc_of_rank = index.default_tie_ranks
    else:
        tie_ranks = np.ascontiguousarray(tie_ranks, dtype=np.int32)
        if len(tie_ranks) != index.num_docs:
            raise ValueError("search: tie_ranks needs one entry per document")
        doc_of_rank = np.full(index.num_docs, -1, dtype=np.int32)
        doc_of_rank[tie_ranks] = np.arange(index.num_docs, dtype=np.int32)
        if (doc_of_rank < 0).any():
            raise ValueError("search: tie_ranks must be a permutation of 0..num_docs-1")

    if method == "auto":
        small = index.num_docs <= DENSE_MAX_DOCS and num_queries * index.num_docs <= DENSE_SEARCH_CELLS
        method = "dense" if small else AUTO_KERNEL
    stats = None
    with tqdm(total=num_queries, desc="search", unit="q", disable=not show_progress) as bar:
        if method == "dense":
            postings = sp.csr_matrix(
                (index.weights, index.doc_index, index.term_ptr), shape=(index.vocab_size, index.num_docs)
            )
            found = _dense_top_k(queries, postings, k, tie_ranks, doc_of_rank, exclude, bar)
        else:
            from retrieval.kernel import search_with_kernel  # imports numba: only when needed

            found = search_with_kernel(
                index,
                queries,
                k,
                tie_ranks,
                doc_of_rank,
                exclude,
                queries_per_call,
                block_docs,
                bar,
                pruned=method == "pruned",
            )
            found, stats = found[:3], found[3]
    out_doc, out_score_bits, out_hits = found
    return SearchResult(doc_index=out_doc, scores=out_score_bits.view(np.float32), num_hits=out_hits, stats=stats)
