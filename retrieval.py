"""Exact sparse retrieval for SPLADE vectors: an inverted index, top-k search and the evaluation measures.

Nothing here knows about models or files of a data set; it works on scipy CSR matrices
(one row per text, one column per vocabulary entry, non-negative weights) and plain ids.

- ``build_index``: an inverted index (posting lists = the CSC form of the document matrix,
  int64 term offsets, int32 document numbers, float32 weights), built from one matrix or from
  shard files one at a time so the document matrix never has to be in memory twice.
- ``search``: exact top-k by score = sum over the query's terms of q_w * d_w, a term-at-a-time
  numba kernel over cache-sized blocks of documents, queries spread over threads. Ties: score
  descending, then document id descending in byte order, trec_eval's own order (see
  ``trec_tie_ranks``), so a run file re-scored by trec_eval / pytrec_eval ranks exactly as we did.
- ``evaluate_run``: MRR@10, nDCG@10, R@1000 with ir-measures' pytrec_eval provider, averaged over
  all judged queries (a judged query with no hit counts 0).
- ``flops_statistic`` / ``mean_active_dims``: the sparsity numbers of the results table.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numba
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
    if isinstance(shard, (str, os.PathLike)):
        return _as_csr_float32(sp.load_npz(shard), str(shard))
    return _as_csr_float32(shard, "document matrix")


@numba.njit(cache=True)
def _scatter_postings(indptr, indices, data, first_doc, fill_pos, doc_index, weights):
    """Append the rows of one CSR shard to the posting lists. Rows arrive in document order, so
    every posting list stays sorted by document number."""
    for row in range(len(indptr) - 1):
        doc = first_doc + row
        for p in range(indptr[row], indptr[row + 1]):
            w = data[p]
            if w > 0:  # explicit zeros carry no score
                t = indices[p]
                q = fill_pos[t]
                doc_index[q] = doc
                weights[q] = w
                fill_pos[t] = q + 1


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
        counts = np.bincount(matrix.indices[matrix.data > 0], minlength=width)
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
        _scatter_postings(
            matrix.indptr.astype(np.int64),
            matrix.indices.astype(np.int32),
            matrix.data,
            first_doc,
            fill_pos,
            doc_index,
            weights,
        )
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


# Documents per accumulator block: 2**17 float32 = 512 KiB stays in a core's L2 cache, so the
# scattered adds of a query hit cache instead of memory (the accumulator of 8.8M documents is 35 MB).
BLOCK_DOCS = 1 << 17
# Ranking keys: for scores >= 0 the float32 bit pattern, read as an integer, orders like the score.
# key = score_bits << 32 | (RANK_LIMIT - tie_rank): larger key = better hit, ties to the smaller rank,
# and both the score and the document come back out of the key.
RANK_LIMIT = (1 << 32) - 1


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


def search(
    index: InvertedIndex,
    query_vectors,
    k: int = 1000,
    tie_ranks: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    show_progress: bool = False,
    queries_per_call: int | None = None,
    block_docs: int | None = None,
) -> SearchResult:
    """Exact top-k documents of every query row by dot product.

    ``tie_ranks[d]``: smaller wins among equal scores (default: document number, ascending;
    evaluate.py passes ``trec_tie_ranks(doc_ids)``). ``exclude[q]``: a document number never
    returned for query q (BEIR's rule that a query does not retrieve itself), -1 for none."""
    queries = _as_csr_float32(query_vectors, "query vectors")
    if queries.shape[1] > index.vocab_size:
        raise ValueError(f"search: queries have {queries.shape[1]} columns, the index {index.vocab_size} terms")
    queries.sort_indices()
    num_queries = queries.shape[0]
    k = int(k)
    if k < 1:
        raise ValueError("search: k must be >= 1")
    if tie_ranks is None:
        tie_ranks = np.arange(index.num_docs, dtype=np.int32)
    if exclude is None:
        exclude = np.full(num_queries, -1, dtype=np.int64)
    tie_ranks = np.ascontiguousarray(tie_ranks, dtype=np.int32)
    exclude = np.ascontiguousarray(exclude, dtype=np.int64)
    if len(tie_ranks) != index.num_docs or len(exclude) != num_queries:
        raise ValueError("search: tie_ranks needs one entry per document, exclude one per query")

    n_threads = numba.get_num_threads()
    block_docs = max(1, min(block_docs or BLOCK_DOCS, index.num_docs))
    acc_workspace = np.zeros((n_threads, block_docs), dtype=np.float32)
    max_terms = int(np.diff(queries.indptr).max()) if num_queries else 0
    cursor_workspace = np.empty((n_threads, max(max_terms, 1)), dtype=np.int64)
    key_workspace = np.empty((n_threads, 2 * k), dtype=np.int64)
    doc_of_rank = np.full(index.num_docs, -1, dtype=np.int32)
    doc_of_rank[tie_ranks] = np.arange(index.num_docs, dtype=np.int32)
    if (doc_of_rank < 0).any():
        raise ValueError("search: tie_ranks must be a permutation of 0..num_docs-1")
    out_doc = np.empty((num_queries, k), dtype=np.int32)
    out_score_bits = np.empty((num_queries, k), dtype=np.int32)  # float32 bit patterns
    out_hits = np.empty(num_queries, dtype=np.int32)
    q_ptr = queries.indptr.astype(np.int64)
    q_terms = queries.indices.astype(np.int64)

    # Calls of a few queries per thread keep the progress bar moving without costing speed.
    step = queries_per_call or max(64 * n_threads, 1)
    with tqdm(total=num_queries, desc="search", unit="q", disable=not show_progress) as bar:
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
    return SearchResult(doc_index=out_doc, scores=out_score_bits.view(np.float32), num_hits=out_hits)


# ---------------------------------------------------------------------------------------------
# Sparsity statistics
# ---------------------------------------------------------------------------------------------


def mean_active_dims(vectors) -> float:
    """Average number of non-zero vocabulary entries per vector."""
    vectors = sp.csr_matrix(vectors)
    return float((vectors.data > 0).sum() / max(vectors.shape[0], 1))


def flops_statistic(query_vectors, index: InvertedIndex) -> float:
    """sum_v p_q[v] * p_d[v], p = fraction of vectors in which term v is active: the expected
    number of multiply-adds per query-document pair of an inverted index."""
    queries = sp.csr_matrix(query_vectors)
    query_counts = np.bincount(queries.indices[queries.data > 0], minlength=index.vocab_size)
    p_query = query_counts[: index.vocab_size] / max(queries.shape[0], 1)
    p_doc = index.posting_lengths() / max(index.num_docs, 1)
    return float(np.dot(p_query, p_doc))


# ---------------------------------------------------------------------------------------------
# Runs and measures
# ---------------------------------------------------------------------------------------------


def result_to_run(result: SearchResult, query_ids: Sequence[str], doc_ids: Sequence[str]) -> dict:
    """{query_id: {doc_id: score}} with scores as Python floats (exact float32 values)."""
    run = {}
    for row, qid in enumerate(query_ids):
        hits = int(result.num_hits[row])
        docs = result.doc_index[row, :hits].tolist()
        scores = result.scores[row, :hits].tolist()
        run[qid] = {doc_ids[d]: s for d, s in zip(docs, scores)}
    return run


def write_trec_run(path, result: SearchResult, query_ids: Sequence[str], doc_ids: Sequence[str], run_name: str) -> None:
    """TREC run file: ``qid Q0 docid rank score run_name``, rank from 1, best first. Scores
    are printed with 9 significant digits, which round-trips float32: equal scores stay equal
    and the order is kept, so trec_eval sorts the file exactly as we ranked."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        for row, qid in enumerate(query_ids):
            hits = int(result.num_hits[row])
            docs = result.doc_index[row, :hits].tolist()
            scores = result.scores[row, :hits].tolist()
            out.writelines(
                f"{qid} Q0 {doc_ids[d]} {rank} {score:.9g} {run_name}\n"
                for rank, (d, score) in enumerate(zip(docs, scores), start=1)
            )
    os.replace(tmp, path)


def judged_query_ids(qrels: dict) -> list[str]:
    """Queries with at least one judgment above 0: the ones every measure averages over."""
    return [qid for qid, judged in qrels.items() if any(rel > 0 for rel in judged.values())]


def evaluate_run(run: dict, qrels: dict, recall_min_rel: int = 1) -> dict:
    """MRR@10, nDCG@10 (graded gains) and R@1000 (a document counts as relevant from
    ``recall_min_rel``; 2 for TREC DL passages) of a run ``{qid: {docid: score}}`` whose dicts
    list each query's hits best first.

    All three come from ir-measures' pytrec_eval provider, i.e. trec_eval's code. MRR@10 is
    trec_eval's recip_rank on the run cut at 10 (ir-measures' own RR@10 goes through
    msmarco_eval, which breaks score ties by ascending id, unlike trec_eval). Averages over every
    judged query; a judged query absent from the run or without a relevant hit counts 0
    (msmarco_eval and trec_eval -c do the same; plain trec_eval would drop it)."""
    import ir_measures
    from ir_measures import RR, R, nDCG

    judged = judged_query_ids(qrels)
    qrels = {qid: {doc: int(rel) for doc, rel in qrels[qid].items()} for qid in judged}
    run = {qid: hits for qid, hits in run.items() if qid in qrels and hits}
    run_at_10 = {qid: dict(list(hits.items())[:10]) for qid, hits in run.items()}
    recall = R(rel=recall_min_rel) @ 1000 if recall_min_rel != 1 else R @ 1000
    per_query = {name: dict.fromkeys(judged, 0.0) for name in ("mrr@10", "ndcg@10", "recall@1000")}
    if run:
        for name, measure, measured_run in (
            ("mrr@10", RR, run_at_10),
            ("ndcg@10", nDCG @ 10, run),
            ("recall@1000", recall, run),
        ):
            for metric in ir_measures.pytrec_eval.iter_calc([measure], qrels, measured_run):
                per_query[name][metric.query_id] = metric.value
    return {name: float(np.mean(list(values.values()))) if values else 0.0 for name, values in per_query.items()}
