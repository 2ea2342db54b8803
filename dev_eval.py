"""MS MARCO dev MRR@10 while training: a sentence-transformers evaluator over a fixed dev subset.

Reproductions of SPLADE often learn only at the end of a multi-day run that something was off. This
evaluator gives the results table's own measure, during training, at a cost of minutes:

    subset = dev_subset("msmarco-data")                  # 500 dev-small queries, their positives + 100k passages
    trainer = SparseEncoderTrainer(..., evaluator=DevRetrievalEvaluator(subset))

With ``eval_strategy`` set, the trainer logs ``eval_mrr@10``, ``eval_recall@1000``, ``eval_query_active_dims``
and ``eval_doc_active_dims``; ``metric_for_best_model="mrr@10"`` selects checkpoints by MRR@10.

Retrieval is exact, with the same index, tie order and measures as evaluate.py (retrieval/). The numbers
are not the full dev set's: 100k passages instead of 8.8M make every query easier, so MRR@10 comes out
higher than on the full collection. They are comparable from one evaluation to the next, which is the point.
"""

from __future__ import annotations

import csv
import heapq
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator  # SentenceEvaluator is its old name

import retrieval
from data.download import download_dev_small, file_lock
from data.readers import DataError, iter_id_text, read_qrels, read_query_texts
from encoding import encode, model_on_device, resolve_precision
from errors import UserError

QUERIES_FILE = "queries.dev.small.tsv"
QRELS_FILE = "qrels.dev.small.tsv"
COLLECTION_FILE = "collection.tsv"
RANDOM_BLOCK = 1 << 16  # uniform draws fetched from the generator at a time while streaming the collection


@dataclass
class DevSubset:
    query_ids: list[str]
    queries: list[str]
    qrels: dict[str, dict[str, int]]  # the chosen queries' judgments
    doc_ids: list[str]  # ascending passage id
    passages: list[str]


def choose_queries(qrels: dict, queries: dict, num_queries: int, seed: int) -> list[str]:
    """num_queries judged queries, drawn from the seed, in the qrels file's order."""
    judged = [qid for qid in retrieval.judged_query_ids(qrels) if qid in queries]
    if not judged:
        raise DataError("dev subset: no judged query has a text in the queries file")
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(judged), size=min(num_queries, len(judged)), replace=False)
    return [judged[i] for i in sorted(chosen)]


def sample_collection(path: Path, keep: set[int], corpus_size: int, seed: int) -> dict[int, bytes]:
    """The passages in ``keep`` plus a uniform random sample of corpus_size passages, in one streaming pass.

    The sample is the corpus_size passages with the smallest random keys (keys drawn from the seed in file
    order): a uniform sample without knowing the collection's length, holding only corpus_size texts."""
    rng = np.random.default_rng(seed)
    heap: list[tuple[float, int, bytes]] = []  # (-key, pid, text): heap[0] holds the largest key kept
    kept: dict[int, bytes] = {}
    draws, used = rng.random(RANDOM_BLOCK), 0
    for pid, text in iter_id_text(path, desc=f"dev subset: sampling {path.name}"):
        if pid in keep:
            kept[pid] = text
        if used == RANDOM_BLOCK:
            draws, used = rng.random(RANDOM_BLOCK), 0
        key = -draws[used]
        used += 1
        if len(heap) < corpus_size:
            heapq.heappush(heap, (key, pid, text))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, pid, text))
    kept.update((pid, text) for _, pid, text in heap)
    return kept


class DevFilesError(UserError):
    """The dev-small files are missing and cannot be downloaded; the message names --eval_steps 0."""


def dev_subset(data_dir, num_queries: int = 500, corpus_size: int = 100_000, seed: int = 42) -> DevSubset | None:
    """num_queries MS MARCO dev-small queries against their relevant passages plus a fixed random sample of
    corpus_size passages of collection.tsv (all of it when it is that small). Deterministic from the seed.

    Under torchrun only the first process builds it (sentence-transformers' trainer calls the evaluator on rank 0
    only); the others get None and do not stream the collection."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    data_dir = Path(data_dir)
    if not (data_dir / QUERIES_FILE).exists() or not (data_dir / QRELS_FILE).exists():
        try:
            with file_lock(data_dir / ".download.lock"):
                download_dev_small(data_dir)
        except UserError as err:
            raise DevFilesError(
                f"the in-training evaluation needs {QUERIES_FILE} and {QRELS_FILE} in {data_dir}: {err}\n"
                "  Put them there, or pass --eval_steps 0 to train without the in-training evaluation."
            ) from None
    queries = read_query_texts(data_dir / QUERIES_FILE)
    qrels, _ = read_qrels(data_dir / QRELS_FILE)
    chosen = choose_queries(qrels, queries, num_queries, seed)
    positives = {doc for qid in chosen for doc, rel in qrels[qid].items() if rel > 0}
    passages = sample_collection(data_dir / COLLECTION_FILE, {int(doc) for doc in positives}, corpus_size, seed)
    missing = positives - {str(pid) for pid in passages}
    if missing:
        raise DataError(f"{data_dir / QRELS_FILE}: relevant passage {min(missing)} is not in {COLLECTION_FILE}")
    pids = sorted(passages)
    return DevSubset(
        query_ids=chosen,
        queries=[queries[qid] for qid in chosen],
        qrels={qid: qrels[qid] for qid in chosen},
        doc_ids=[str(pid) for pid in pids],
        passages=[passages[pid].decode("utf-8", "replace") for pid in pids],
    )


class DevRetrievalEvaluator(BaseEvaluator):
    """Exact top-k retrieval over a DevSubset; returns ``mrr@10``, ``recall@1000``, ``query_active_dims`` and
    ``doc_active_dims`` (prefixed ``name_`` when a name is given).

    Encoding is evaluate.py's (no gradients, fp32 on a CPU, bf16 on a GPU by default); the model is put in eval
    mode and back to train mode afterwards. Under DDP, sentence-transformers' trainer calls an evaluator on
    rank 0 only and broadcasts its metrics, so the work is done once."""

    def __init__(
        self,
        subset: DevSubset | None,
        batch_size: int = 64,
        top_k: int = 1000,
        precision: str = "auto",
        name: str = "",
        show_progress: bool = False,
    ):
        super().__init__()
        self.subset, self.batch_size, self.top_k = subset, batch_size, top_k
        self.precision, self.name, self.show_progress = precision, name, show_progress
        # None on the processes other than the first, which the trainer never asks to evaluate
        self.tie_ranks = retrieval.trec_tie_ranks(subset.doc_ids) if subset is not None else None
        self.primary_metric = "mrr@10"
        self.greater_is_better = True

    def __call__(self, model, output_path: str | None = None, epoch: float = -1, steps: int = -1) -> dict:
        if self.subset is None:
            raise RuntimeError("this process has no dev subset: only the first process evaluates")
        device = next(model.parameters()).device
        with model_on_device(model, None, str(device)) as device:
            precision = resolve_precision(self.precision, device)
            options = dict(batch_size=self.batch_size, device=device, precision=precision)
            options["show_progress"] = self.show_progress
            docs = encode(model, self.subset.passages, desc="dev: passages", **options)
            queries = encode(model, self.subset.queries, desc="dev: queries", **options)
        index = retrieval.build_index(docs)
        result = retrieval.search(index, queries, k=self.top_k, tie_ranks=self.tie_ranks)
        run = retrieval.result_to_run(result, self.subset.query_ids, self.subset.doc_ids)
        measures = retrieval.evaluate_run(run, self.subset.qrels)
        metrics = {
            "mrr@10": measures["mrr@10"],
            "recall@1000": measures["recall@1000"],
            "query_active_dims": retrieval.mean_active_dims(queries),
            "doc_active_dims": index.nnz / max(index.num_docs, 1),
        }
        if output_path is not None:
            self.append_csv(Path(output_path), epoch, steps, metrics)
        return self.prefix_name_to_metrics(metrics, self.name)

    def append_csv(self, directory: Path, epoch: float, steps: int, metrics: dict) -> None:
        """One line per evaluation, like sentence-transformers' own evaluators write."""
        path = directory / f"dev_retrieval{'_' + self.name if self.name else ''}_results.csv"
        new = not path.is_file()
        directory.mkdir(parents=True, exist_ok=True)
        with open(path, "a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["epoch", "steps", *metrics])
            writer.writerow([epoch, steps, *metrics.values()])
            f.flush()
            os.fsync(f.fileno())

    def get_config_dict(self) -> dict:
        if self.subset is None:
            return {"top_k": self.top_k}
        return {"queries": len(self.subset.query_ids), "passages": len(self.subset.doc_ids), "top_k": self.top_k}
