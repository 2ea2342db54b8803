"""Evaluate a SPLADE model: encode, index, retrieve exactly (top 1000) and score, in one command.

    python evaluate.py MODEL --msmarco --trec-dl 2019 2020 --beir scifact nfcorpus path/to/beir_dir

MODEL is a directory saved by this project's training scripts, or any SPLADE masked-LM
checkpoint (a hub id where there is internet). Prints the results table (x100) and
writes, under --output, metrics.json and one TREC run file per data set.

Data sets:
  --msmarco           MS MARCO dev small (queries.dev.small.tsv, qrels.dev.small.tsv) over
                      collection.tsv, all read from --data_dir; a missing file is downloaded.
                      --data_dir data/sample evaluates the bundled sample.
  --trec-dl 2019 2020 TREC DL passage queries and graded qrels, same collection.
  --beir X ...        X = a BEIR name (downloaded once into --cache_dir), a directory in BEIR
                      layout (corpus.jsonl[.gz], queries.jsonl[.gz], qrels/test.tsv) or a .zip.

Conventions: scores are exact dot products over an inverted
index; ties go to the larger document id (trec_eval's order); every judged query counts
(no hit = 0); MRR@10 = trec_eval recip_rank on the run cut at 10; TREC DL recall counts
relevance >= 2; BEIR drops a hit whose id is the query's id. FLOPS = sum_v p_q[v] p_d[v].

Document vectors are cached (scipy CSR .npz shards) under --cache_dir, keyed by model weights,
corpus file, max_seq_length and precision, so re-evaluating a model does not re-encode.
Several GPUs: torchrun --nproc_per_node N evaluate.py ... (each rank encodes every N-th shard;
rank 0 waits for the shards, indexes and scores).

This file is the command line and the orchestration: data/eval_sets.py turns names into data sets
(data/download.py fetches, data/readers.py reads), encoding.py turns texts into cached vectors,
retrieval/ indexes, searches and scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

import retrieval
from data.atomic import write_text_atomic
from data.eval_sets import DEFAULT_CACHE_DIR, SPLADE_BEIR_SETS, EvalSet, resolve_datasets
from encoding import SHARD_TIMEOUT, Encoder, load_model, log, model_fingerprint, model_on_device, resolve_precision
from errors import UserError, main_exits_2_on_user_error

TOP_K = 1000
# The seed's table: (data set, metric, column title). FLOPS comes from MS MARCO dev.
TABLE_COLUMNS = [
    ("msmarco-dev", "mrr@10", "MS MARCO dev MRR@10"),
    ("msmarco-dev", "recall@1000", "R@1k"),
    ("trec-dl-2019", "ndcg@10", "TREC DL19 nDCG@10"),
    ("trec-dl-2019", "recall@1000", "DL19 R@1k"),
    ("trec-dl-2020", "ndcg@10", "DL20 nDCG@10"),
    ("trec-dl-2020", "recall@1000", "DL20 R@1k"),
    ("beir-mean", "ndcg@10", "BEIR nDCG@10"),
]


class InputError(UserError):
    """A problem with the user's arguments: printed as one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_on_index(
    eval_set: EvalSet,
    index: retrieval.InvertedIndex,
    doc_ids: list[str],
    tie_ranks: np.ndarray,
    query_vectors: sp.csr_matrix,
    top_k: int,
    show_progress: bool,
    engine=None,
) -> tuple[dict, retrieval.SearchResult]:
    query_ids = list(eval_set.queries)
    exclude = None
    if eval_set.drop_self_hits:
        position = {doc_id: i for i, doc_id in enumerate(doc_ids)}
        exclude = np.array([position.get(qid, -1) for qid in query_ids], dtype=np.int64)
    started = time.perf_counter()
    if engine is None:
        result = retrieval.search(
            index, query_vectors, k=top_k, tie_ranks=tie_ranks, exclude=exclude, show_progress=show_progress
        )
    else:  # a peer (retrieval/peers.py): its own index of the same vectors, its own ranking and ties
        result = engine.search(index, query_vectors, top_k, exclude)
    search_seconds = time.perf_counter() - started
    run = retrieval.result_to_run(result, query_ids, doc_ids)
    metrics = retrieval.evaluate_run(run, eval_set.qrels, recall_min_rel=eval_set.recall_min_rel)
    metrics.update(
        flops=retrieval.flops_statistic(query_vectors, index),
        query_active_dims=retrieval.mean_active_dims(query_vectors),
        doc_active_dims=index.nnz / index.num_docs,
        num_queries=len(query_ids),
        num_docs=index.num_docs,
        search_seconds=search_seconds,
    )
    return metrics, result


def warn_unjudgeable(eval_set: EvalSet, known_doc_ids: set) -> None:
    judged = {d for hits in eval_set.qrels.values() for d, rel in hits.items() if rel > 0}
    missing = judged - known_doc_ids
    if missing:
        log(
            f"{eval_set.name}: {len(missing)} relevant document ids are not in {eval_set.corpus_file.name} "
            f"(e.g. {sorted(missing)[0]!r}); they count as not retrieved"
        )


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun, from its environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def evaluate_model(
    model_or_path,
    datasets: list,
    output_dir=None,
    *,
    data_dir="msmarco-data",
    cache_dir=DEFAULT_CACHE_DIR,
    max_seq_length: int | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    device: str | None = None,
    top_k: int = TOP_K,
    beir_split: str = "test",
    download: bool = True,
    write_runs: bool = True,
    run_name: str | None = None,
    keep_self_hits: bool = False,
    distributed: bool = False,
    show_progress: bool = True,
    shard_timeout: float = SHARD_TIMEOUT,
    engine: str = "exact",
) -> dict | None:
    """Evaluate a model (a SparseEncoder or a path / hub id) on data sets and return the metrics,
    the same dict that ``output_dir/metrics.json`` receives:

        {"msmarco-dev": {"mrr@10", "ndcg@10", "recall@1000", "flops", "query_active_dims",
                         "doc_active_dims", "num_queries", "num_docs", "encode_seconds",
                         "search_seconds", ...}, ..., "beir-mean": {"ndcg@10", "datasets"}}

    ``datasets``: 'msmarco', 'trec-dl-2019', 'trec-dl-2020', 'beir:NAME_OR_DIR', or directories
    (see data.eval_sets.resolve_datasets) or EvalSet objects. ``keep_self_hits``: do not apply BEIR's
    rule that drops a hit whose id equals the query id. ``cache_dir=None``: no cache (vectors in a
    temporary directory). ``distributed=True``: call on every torchrun rank; documents are encoded by
    all ranks, the rest by rank 0, which alone returns the metrics (others return None); rank 0 gives up
    when no other rank's shard has appeared for ``shard_timeout`` seconds. Call it on rank 0 only with
    distributed=False (the default). ``engine``: 'exact' (ours), or a peer engine of
    retrieval/peers.py ('seismic', 'bmp') searching the same vectors, to see what it costs in quality."""
    peer = None
    if engine != "exact":
        from retrieval.peers import peer_engine  # optional packages: imported only when asked for

        peer = peer_engine(engine)
    rank, world_size = distributed_rank() if distributed else (0, 1)
    sets = eval_sets_of(datasets, data_dir, cache_dir or DEFAULT_CACHE_DIR, beir_split, download, keep_self_hits)
    if cache_dir is None and world_size > 1:
        raise InputError("several ranks share document vectors through the cache: give a cache_dir")
    if run_name is None:
        run_name = "splade" if isinstance(model_or_path, torch.nn.Module) else Path(str(model_or_path)).name
    output_dir = Path(output_dir) if output_dir else None
    if output_dir and rank == 0:
        (output_dir / "runs" if write_runs else output_dir).mkdir(parents=True, exist_ok=True)
    runs_dir = output_dir / "runs" if output_dir and write_runs else None

    model = load_model(model_or_path, max_seq_length)
    with (
        tempfile.TemporaryDirectory(prefix="splade-eval-") if cache_dir is None else nullcontext(cache_dir) as cache,
        model_on_device(model, max_seq_length, device) as device,
    ):
        fingerprint = model_fingerprint(model_or_path, model)
        precision = resolve_precision(precision, device)
        cache_root = Path(cache) / "doc_vectors"
        encoder = Encoder(
            model, fingerprint, cache_root, batch_size, device, precision, rank, world_size, show_progress,
            shard_timeout,
        )  # fmt: skip
        results = {}
        # Data sets over the same corpus (MS MARCO dev, DL19, DL20) share one encoding and one index.
        corpora = {}
        for eval_set in sets:
            corpora.setdefault(eval_set.corpus_file.resolve(), []).append(eval_set)
        for corpus_file, group in corpora.items():
            results.update(evaluate_corpus(encoder, corpus_file, group, top_k, runs_dir, run_name, peer))
    if rank != 0:
        return None
    add_beir_mean(results, sets)
    if output_dir:
        write_text_atomic(output_dir / "metrics.json", json.dumps(results, indent=2))
    return results


def eval_sets_of(datasets, data_dir, cache_dir, beir_split, download, keep_self_hits) -> list[EvalSet]:
    sets = [d for d in datasets if isinstance(d, EvalSet)]
    named = [d for d in datasets if not isinstance(d, EvalSet)]
    sets += resolve_datasets(named, data_dir, cache_dir, beir_split, download)
    if not sets:
        raise InputError("nothing to evaluate: name at least one data set")
    if keep_self_hits:
        for eval_set in sets:
            eval_set.drop_self_hits = False
    return sets


def evaluate_corpus(
    encoder: Encoder,
    corpus_file: Path,
    group: list[EvalSet],
    top_k: int,
    runs_dir: Path | None,
    run_name: str,
    engine=None,
) -> dict:
    """Encode and index one corpus, then search and score every data set over it (rank 0 only)."""
    docs = encoder.documents(corpus_file)
    if docs is None:  # another rank than 0: its share of the documents is encoded
        return {}
    started = time.perf_counter()
    index = retrieval.build_index(docs.shards, show_progress=encoder.show_progress)
    tie_ranks = retrieval.trec_tie_ranks(docs.doc_ids)
    index_seconds = time.perf_counter() - started
    log(
        f"index of {corpus_file.name}: {index.num_docs:,} documents, {index.nnz:,} postings, "
        f"{index.nbytes / 2**30:.2f} GiB, {index_seconds:.1f} s"
    )
    known, results = set(docs.doc_ids), {}
    for eval_set in group:
        warn_unjudgeable(eval_set, known)
        started = time.perf_counter()
        query_vectors = encoder.texts(list(eval_set.queries.values()), desc=f"encode {eval_set.name} queries")
        query_seconds = time.perf_counter() - started
        metrics, result = evaluate_on_index(
            eval_set, index, docs.doc_ids, tie_ranks, query_vectors, top_k, encoder.show_progress, engine
        )
        metrics.update(
            encode_seconds=docs.encode_seconds + query_seconds,
            index_seconds=index_seconds,
            doc_vectors_cached=docs.cached,
            recall_min_rel=eval_set.recall_min_rel,
        )
        results[eval_set.name] = metrics
        if runs_dir:
            retrieval.write_trec_run(
                runs_dir / f"{eval_set.name}.trec", result, list(eval_set.queries), docs.doc_ids, run_name
            )
        log(
            f"{eval_set.name}: nDCG@10 {metrics['ndcg@10']:.4f}  MRR@10 {metrics['mrr@10']:.4f}  "
            f"R@1k {metrics['recall@1000']:.4f}  FLOPS {metrics['flops']:.3f}"
        )
    return results


def add_beir_mean(results: dict, sets: list[EvalSet]) -> None:
    """A set split in parts (CQADupStack's forums) gets the mean nDCG@10 of its parts on its own line; `beir-mean`
    averages exactly the SPLADE papers' 13 sets (SPLADE_BEIR_SETS) among those evaluated, and names any missing."""
    groups = {}
    for eval_set in sets:
        if eval_set.beir_group:
            groups.setdefault(eval_set.beir_group, []).append(results[eval_set.name]["ndcg@10"])
    for group, values in groups.items():
        if len(values) > 1 or group not in results:
            results[group] = {"ndcg@10": float(np.mean(values)), "parts": len(values)}
    papers = {group: results[group]["ndcg@10"] for group in groups if _beir_name(group) in SPLADE_BEIR_SETS}
    if papers:
        results["beir-mean"] = {
            "ndcg@10": float(np.mean(list(papers.values()))),
            "datasets": sorted(papers),
            "missing": sorted(set(SPLADE_BEIR_SETS) - {_beir_name(group) for group in papers}),
        }


def _beir_name(group: str) -> str:
    return group.removeprefix("beir-").lower()


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def results_table(results: dict, model_name: str) -> str:
    """The seed's results table (metrics x 100, FLOPS as is) and one line per data set."""

    def cell(name, metric):
        value = results.get(name, {}).get(metric)
        return "" if value is None else f"{100 * value:.1f}"

    headers = ["model"] + [title for _, _, title in TABLE_COLUMNS] + ["FLOPS"]
    flops = results.get("msmarco-dev", {}).get("flops")
    row = [model_name] + [cell(name, metric) for name, metric, _ in TABLE_COLUMNS]
    row.append("" if flops is None else f"{flops:.2f}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers), "| " + " | ".join(row) + " |", ""]
    detail = "data set|nDCG@10|MRR@10|R@1k|FLOPS|q dims|d dims|queries|docs|encode s|search s".split("|")
    lines += ["| " + " | ".join(detail) + " |", "|" + "---|" * len(detail)]
    for name, m in results.items():
        if name == "beir-mean":
            lines.append(
                f"| BEIR mean ({len(m['datasets'])} of the papers' 13 sets) | {100 * m['ndcg@10']:.1f} |" + " |" * 9
            )
            continue
        if "parts" in m:
            lines.append(f"| {name} (mean of {m['parts']} parts) | {100 * m['ndcg@10']:.1f} |" + " |" * 9)
            continue
        lines.append(
            f"| {name} | {100 * m['ndcg@10']:.1f} | {100 * m['mrr@10']:.1f} | {100 * m['recall@1000']:.1f}"
            + (" (rel>=2)" if m.get("recall_min_rel", 1) > 1 else "")
            + f" | {m['flops']:.2f} | {m['query_active_dims']:.1f} | {m['doc_active_dims']:.1f} | "
            f"{m['num_queries']} | {m['num_docs']} | {m['encode_seconds']:.1f} | {m['search_seconds']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory saved by the training scripts, or a SPLADE checkpoint")
    parser.add_argument("--msmarco", action="store_true", help="MS MARCO dev small (MRR@10, R@1k)")
    parser.add_argument(
        "--trec-dl",
        "--trec_dl",
        nargs="*",
        type=int,
        choices=(2019, 2020),
        metavar="YEAR",
        help="TREC DL passage years (no year: 2019 and 2020)",
    )
    parser.add_argument(
        "--beir",
        nargs="+",
        default=[],
        metavar="NAME_OR_DIR",
        help="BEIR set names (downloaded), directories in BEIR layout or .zip files",
    )
    parser.add_argument("--beir_split", default="test", help="qrels file of the BEIR sets (qrels/<split>.tsv)")
    parser.add_argument(
        "--keep_self_hits", action="store_true", help="BEIR: keep a hit whose id equals the query id (BEIR drops it)"
    )
    parser.add_argument("--data_dir", default="msmarco-data", help="MS MARCO / TREC DL files (downloaded if missing)")
    parser.add_argument("--no_download", action="store_true", help="fail instead of downloading missing files")
    parser.add_argument("--output", help="where metrics.json and runs/ go (default: output/eval-<model name>)")
    parser.add_argument(
        "--cache_dir",
        default=str(DEFAULT_CACHE_DIR),
        help="document-vector cache and downloaded BEIR sets (env SPLADE_CACHE_DIR)",
    )
    parser.add_argument("--no_cache", action="store_true", help="do not keep document vectors")
    parser.add_argument("--max_seq_length", type=int, help="truncation in tokens (default: the model's)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="encoding precision; auto = bf16 on a GPU of compute capability >= 8, else fp16; fp32 on a CPU",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the GPU if there is one)")
    parser.add_argument("--top_k", type=int, default=TOP_K, help="hits per query in runs and metrics")
    parser.add_argument("--run_name", help="last column of the run files (default: the model's folder name)")
    parser.add_argument("--no_runs", action="store_true", help="do not write TREC run files")
    parser.add_argument(
        "--shard_timeout",
        type=float,
        default=SHARD_TIMEOUT,
        help="torchrun: seconds the first process waits without a new shard from the others",
    )
    parser.add_argument(
        "--engine",
        choices=("exact", "seismic", "bmp"),
        default="exact",
        help="search engine: exact (ours, the table's) or a peer over the same vectors (requirements-peers.txt)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """The command line. A UserError (bad input, failed download) propagates: the __main__ wrapper prints it."""
    args = parse_args(argv)
    datasets = ["msmarco"] if args.msmarco else []
    if args.trec_dl is not None:
        datasets += [f"trec-dl-{year}" for year in (args.trec_dl or [2019, 2020])]
    datasets += [f"beir:{spec}" for spec in args.beir]
    if not datasets:
        raise InputError("nothing to evaluate: give --msmarco, --trec-dl and/or --beir")
    model_name = Path(args.model.rstrip("/")).name
    output = Path(args.output or Path("output") / f"eval-{model_name}")
    rank, world_size = distributed_rank()
    if world_size > 1 and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    results = evaluate_model(
        args.model,
        datasets,
        output,
        data_dir=args.data_dir,
        cache_dir=None if args.no_cache else args.cache_dir,
        max_seq_length=args.max_seq_length,
        batch_size=args.batch_size,
        precision=args.precision,
        device=args.device,
        top_k=args.top_k,
        beir_split=args.beir_split,
        download=not args.no_download,
        write_runs=not args.no_runs,
        run_name=args.run_name,
        keep_self_hits=args.keep_self_hits,
        distributed=world_size > 1,
        shard_timeout=args.shard_timeout,
        engine=args.engine,
    )
    if results is not None:
        print(results_table(results, model_name))
        print(f"\nmetrics: {output / 'metrics.json'}" + ("" if args.no_runs else f"   runs: {output / 'runs'}/"))
    return 0


if __name__ == "__main__":
    sys.exit(main_exits_2_on_user_error(main))
