"""Sparsity statistics, TREC runs and the evaluation measures of a search result.

- ``evaluate_run``: MRR@10, nDCG@10, R@1000 with ir-measures' pytrec_eval provider, averaged over
  all judged queries (a judged query with no hit counts 0).
- ``flops_statistic`` / ``mean_active_dims``: the sparsity numbers of the results table.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from data.atomic import atomic_path
from retrieval.index import InvertedIndex, SearchResult

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
    with atomic_path(path) as part, open(part, "w", encoding="utf-8") as out:
        for row, qid in enumerate(query_ids):
            hits = int(result.num_hits[row])
            docs = result.doc_index[row, :hits].tolist()
            scores = result.scores[row, :hits].tolist()
            out.writelines(
                f"{qid} Q0 {doc_ids[d]} {rank} {score:.9g} {run_name}\n"
                for rank, (d, score) in enumerate(zip(docs, scores), start=1)
            )


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
