"""The field's engines for learned sparse vectors behind one call: ``peer_engine(name).search(...)``.

- 'seismic' (``pyseismic-lsr``, Bruch et al., SIGIR 2024): approximate; clustered, pruned posting lists
  with summaries. Built with its README's recommended configuration (n_postings 3500, centroid_fraction
  0.1, summary_energy 0.4, doc_cut 15); ``query_cut`` / ``heap_factor`` trade accuracy for speed.
- 'bmp' (``bmp``, Mallia et al., SIGIR 2024): block-max pruning over integer impacts; at alpha = beta = 1
  exact over its own quantization (weights x 100 rounded, then 8-bit impacts inside BMP).

Both are optional dependencies (requirements-peers.txt), imported only here and only when asked for.
Documents are addressed by their row number (as a string token-free id), vocabulary entries by their
column number written as a string, so the peers see exactly our vectors.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from errors import UserError
from retrieval.index import InvertedIndex, SearchResult

ENGINES = ("exact", "seismic", "bmp")
# Seismic's README build; search settings measured by bench/bench_retrieval.py (top-10 accuracy of our exact top 10).
SEISMIC_BUILD = dict(n_postings=3500, centroid_fraction=0.1, min_cluster_size=2, summary_energy=0.4, doc_cut=15)
# On ArguAna with splade-tiny: "fast" 0.90 of our exact top 10, "accurate" 0.985 (nDCG@10 equal to exact to 3 decimals).
SEISMIC_SEARCH = {"fast": dict(query_cut=5, heap_factor=0.8), "accurate": dict(query_cut=10, heap_factor=1.0)}
BMP_SCALE = 100.0  # float weights -> BMP's integer impacts, as BMP's own PyTerrier indexer does
BMP_BLOCK = 32


class MissingPeerError(UserError):
    """A peer engine was asked for but its package is not installed."""


def _require(module: str, package: str):
    try:
        return __import__(module)
    except ImportError:
        raise MissingPeerError(
            f"--engine {module}: the package {package!r} is not installed; pip install -r requirements-peers.txt"
        ) from None


def doc_matrix(index: InvertedIndex) -> sp.csr_matrix:
    """The documents x vocabulary matrix back from the posting lists (rows sorted by term)."""
    by_term = sp.csc_matrix((index.weights, index.doc_index, index.term_ptr), shape=(index.num_docs, index.vocab_size))
    return by_term.tocsr()


def _pack(rows: list[tuple[list[int], list[float]]], k: int) -> SearchResult:
    out_doc = np.full((len(rows), k), -1, dtype=np.int32)
    out_score = np.zeros((len(rows), k), dtype=np.float32)
    hits = np.zeros(len(rows), dtype=np.int32)
    for q, (docs, scores) in enumerate(rows):
        n = min(len(docs), k)
        out_doc[q, :n], out_score[q, :n], hits[q] = docs[:n], scores[:n], n
    return SearchResult(doc_index=out_doc, scores=out_score, num_hits=hits)


def _drop_excluded(docs, scores, skip):
    if skip < 0:
        return docs, scores
    keep = [i for i, d in enumerate(docs) if d != skip]
    return [docs[i] for i in keep], [scores[i] for i in keep]


@dataclass
class SeismicEngine:
    setting: str | dict = "accurate"  # a SEISMIC_SEARCH name, or its own query_cut and heap_factor
    num_threads: int = 1
    built: object = None
    build_seconds: float = 0.0
    _key: int = field(default=-1, repr=False)

    def build(self, index: InvertedIndex):
        seismic = _require("seismic", "pyseismic-lsr")
        if self._key != id(index):
            docs = doc_matrix(index)
            dataset = seismic.SeismicDataset(dim=index.vocab_size)
            dataset.add_documents_by_id(
                [str(d) for d in range(docs.shape[0])],
                docs.indices.astype(np.int64),
                docs.data.astype(np.float32),
                docs.indptr.astype(np.int64),
            )
            self.built = seismic.SeismicIndex.build_from_dataset(dataset, **SEISMIC_BUILD, num_threads=self.num_threads)
            self._key = id(index)
        return self.built

    def search(self, index, queries: sp.csr_matrix, k: int, exclude=None) -> SearchResult:
        seismic = _require("seismic", "pyseismic-lsr")
        built = self.build(index)
        string = seismic.get_seismic_string()
        queries = sp.csr_matrix(queries)
        extra = 0 if exclude is None else 1
        ids = np.array([str(q) for q in range(queries.shape[0])], dtype=string)
        terms = [np.array([str(t) for t in queries[q].indices], dtype=string) for q in range(queries.shape[0])]
        values = [queries[q].data.astype(np.float32) for q in range(queries.shape[0])]
        found = built.batch_search(
            queries_ids=ids,
            query_components=terms,
            query_values=values,
            k=k + extra,
            **(SEISMIC_SEARCH[self.setting] if isinstance(self.setting, str) else self.setting),
            num_threads=self.num_threads,
        )
        rows = [([], [])] * queries.shape[0]
        for hits in found:  # each hit is (query id, score, document id); a query without hits has no list
            if hits:
                q = int(hits[0][0])
                docs, scores = [int(h[2]) for h in hits], [h[1] for h in hits]
                rows[q] = _drop_excluded(docs, scores, -1 if exclude is None else int(exclude[q]))
        return _pack(rows, k)


@dataclass
class BmpEngine:
    directory: str | None = None
    built: object = None
    path: str = ""
    _key: int = field(default=-1, repr=False)

    def build(self, index: InvertedIndex):
        bmp = _require("bmp", "bmp")
        if self._key != id(index):
            docs = doc_matrix(index)
            self.directory = self.directory or tempfile.mkdtemp(prefix="bmp-")
            self.path = os.path.join(self.directory, "index.bmp")
            indexer = bmp.Indexer(self.path, bsize=BMP_BLOCK, compress_range=False)
            impacts = np.rint(docs.data * BMP_SCALE).astype(np.int64)
            terms = docs.indices.astype(str)
            for d in range(docs.shape[0]):
                lo, hi = docs.indptr[d], docs.indptr[d + 1]
                vector = {t: int(v) for t, v in zip(terms[lo:hi], impacts[lo:hi]) if v > 0}
                indexer.add_document(str(d), vector)
            indexer.finish()
            self.built = bmp.Searcher(self.path)
            self._key = id(index)
        return self.built

    def search(self, index, queries: sp.csr_matrix, k: int, exclude=None) -> SearchResult:
        searcher = self.build(index)
        queries = sp.csr_matrix(queries)
        extra = 0 if exclude is None else 1
        rows = []
        for q in range(queries.shape[0]):
            row = queries[q]
            vector = {str(t): float(w) for t, w in zip(row.indices, row.data)}
            docs, scores = searcher.search(vector, k=k + extra, alpha=1.0, beta=1.0)
            rows.append(_drop_excluded([int(d) for d in docs], scores, -1 if exclude is None else int(exclude[q])))
        return _pack(rows, k)


def peer_engine(name: str, **options):
    """'seismic' or 'bmp'; raises MissingPeerError (exit 2) when the package is missing."""
    if name == "seismic":
        _require("seismic", "pyseismic-lsr")
        return SeismicEngine(**options)
    if name == "bmp":
        _require("bmp", "bmp")
        return BmpEngine(**options)
    raise ValueError(f"unknown engine {name!r}; one of {ENGINES}")
