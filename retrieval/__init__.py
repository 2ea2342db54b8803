"""Exact sparse retrieval for SPLADE vectors: an inverted index, top-k search and the evaluation measures.

Nothing here knows about models or files of a data set; it works on scipy CSR matrices
(one row per text, one column per vocabulary entry, non-negative weights) and plain ids.

- index.py: ``build_index``, ``search`` (exact top-k, trec_eval's tie order), ``trec_tie_ranks``
- kernel.py: the numba kernel behind large searches (imported only when one needs it)
- measures.py: ``evaluate_run``, TREC run files, ``flops_statistic`` / ``mean_active_dims``
"""

from retrieval.index import (
    DENSE_SEARCH_CELLS,
    RANK_LIMIT,
    InvertedIndex,
    SearchResult,
    build_index,
    search,
    trec_tie_ranks,
)
from retrieval.measures import (
    evaluate_run,
    flops_statistic,
    judged_query_ids,
    mean_active_dims,
    result_to_run,
    write_trec_run,
)

__all__ = [
    "DENSE_SEARCH_CELLS",
    "RANK_LIMIT",
    "InvertedIndex",
    "SearchResult",
    "build_index",
    "evaluate_run",
    "flops_statistic",
    "judged_query_ids",
    "mean_active_dims",
    "result_to_run",
    "search",
    "trec_tie_ranks",
    "write_trec_run",
]
