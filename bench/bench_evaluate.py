"""End-to-end evaluation time: evaluate.evaluate_model against sentence-transformers'
SparseInformationRetrievalEvaluator, same model, same data, same process, one after the other.

Both sides are timed from nothing to metrics: model loading, reading the files, encoding queries
and corpus, retrieval and measures. Ours also writes its run file and caches the vectors in a
fresh directory (so nothing comes from an earlier cache). Afterwards ours runs once more from
the vector cache (re-evaluation time) with BEIR's self-hit rule on (the official BEIR number).

Printed per data set: seconds, ratio, and the metrics side by side. The evaluator takes
relevance as sets, so its nDCG@10 is binary; ours is shown binary (our run file scored with
binary judgments, comparable) and graded (metrics.json). Neither drops self hits unless said.

Usage (from the repository root; ../shared holds the data and splade-tiny):
  python bench/bench_evaluate.py                               # Cranfield and CISI
  python bench/bench_evaluate.py --datasets cranfield cisi arguana --precisions fp32 bf16
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import retrieval  # noqa: E402


def read_beir(directory: Path):
    def lines(name):
        path = directory / name if (directory / name).is_file() else directory / f"{name}.gz"
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
            return [json.loads(line) for line in f]

    corpus = {d["_id"]: f"{d.get('title') or ''} {d['text']}".strip() for d in lines("corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in lines("queries.jsonl")}
    relevant = {}
    with open(directory / "qrels" / "test.tsv") as f:
        next(f)
        for line in f:
            qid, doc, rel = line.split()
            if int(rel) > 0:
                relevant.setdefault(qid, set()).add(doc)
    return corpus, queries, relevant


def run_reference(model_path: str, directory: Path, batch_size: int, max_seq_length: int | None) -> tuple[float, dict]:
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    started = time.perf_counter()
    model = SparseEncoder(model_path, device="cuda" if torch.cuda.is_available() else "cpu")
    if max_seq_length:
        model.max_seq_length = max_seq_length
    corpus, queries, relevant = read_beir(directory)
    evaluator = SparseInformationRetrievalEvaluator(
        queries,
        corpus,
        relevant,
        batch_size=batch_size,
        mrr_at_k=[10],
        ndcg_at_k=[10],
        accuracy_at_k=[10],
        precision_recall_at_k=[10],
        map_at_k=[10],
        write_csv=False,
        show_progress_bar=False,
    )
    metrics = evaluator(model)
    return time.perf_counter() - started, metrics


def run_ours(
    model_path: str,
    directory: Path,
    work: Path,
    batch_size: int,
    max_seq_length: int | None,
    precision: str,
    keep_self_hits: bool = True,
) -> tuple[float, dict, Path]:
    out = work / f"out-{precision}-{'kept' if keep_self_hits else 'dropped'}"
    started = time.perf_counter()
    results = evaluate.evaluate_model(
        model_path,
        [str(directory)],
        out,
        cache_dir=work / f"cache-{precision}",
        max_seq_length=max_seq_length,
        batch_size=batch_size,
        precision=precision,
        keep_self_hits=keep_self_hits,
        show_progress=False,
    )
    return time.perf_counter() - started, results, out


def binary_metrics(run_file: Path, relevant: dict) -> dict:
    run = {}
    for line in open(run_file):
        qid, _, doc, _, score, _ = line.split()
        run.setdefault(qid, {})[doc] = float(score)
    return retrieval.evaluate_run(run, {q: dict.fromkeys(docs, 1) for q, docs in relevant.items()})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "splade-tiny"))
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["cranfield", "cisi"],
        help="names under ../shared/data/beir or BEIR directories",
    )
    parser.add_argument("--batch_size", type=int, default=32, help="both sides (the evaluator's default is 32)")
    parser.add_argument("--max_seq_length", type=int, help="both sides (default: the model's)")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32"],
        choices=("fp32", "bf16"),
        help="ours; bf16 on a CPU is reported for its effect on the metrics",
    )
    args = parser.parse_args()

    print(
        f"model {args.model}, batch {args.batch_size}, max_seq_length {args.max_seq_length or 'model default'}, "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs"
    )
    rows = []
    for name in args.datasets:
        directory = Path(name) if Path(name).is_dir() else SHARED / "data" / "beir" / name
        _, _, relevant = read_beir(directory)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            load_before = os.getloadavg()[0]
            ref_seconds, ref = run_reference(args.model, directory, args.batch_size, args.max_seq_length)
            row = {
                "data": directory.name,
                "evaluator s": ref_seconds,
                "ev nDCG": ref["dot_ndcg@10"],
                "ev MRR": ref["dot_mrr@10"],
                "ev FLOPS": ref["avg_flops"],
            }
            for precision in args.precisions:
                seconds, results, out = run_ours(
                    args.model, directory, work, args.batch_size, args.max_seq_length, precision
                )
                ours = results[f"beir-{directory.name}"]
                binary = binary_metrics(out / "runs" / f"beir-{directory.name}.trec", relevant)
                row.update(
                    {
                        f"ours {precision} s": seconds,
                        f"{precision} ratio": seconds / ref_seconds,
                        f"{precision} nDCG bin": binary["ndcg@10"],
                        f"{precision} MRR": ours["mrr@10"],
                        f"{precision} nDCG graded": ours["ndcg@10"],
                        f"{precision} FLOPS": ours["flops"],
                        f"{precision} encode s": ours["encode_seconds"],
                        f"{precision} search s": ours["search_seconds"],
                    }
                )
                cached_seconds, cached, _ = run_ours(
                    args.model, directory, work, args.batch_size, args.max_seq_length, precision, keep_self_hits=False
                )
                row.update(
                    {
                        f"{precision} cached s": cached_seconds,
                        f"{precision} nDCG BEIR rule": cached[f"beir-{directory.name}"]["ndcg@10"],
                    }
                )
            row["load avg"] = (load_before + os.getloadavg()[0]) / 2
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    columns = " | ".join(f"ours {p} s | ratio | re-run from cache s" for p in args.precisions)
    print("\n| data set | evaluator s | " + columns + " | load avg |")
    print("|---|---|" + "---|---|---|" * len(args.precisions) + "---|")
    for row in rows:
        cells = [
            f"{row[f'ours {p} s']:.1f} | {row[f'{p} ratio']:.2f} | {row[f'{p} cached s']:.1f}" for p in args.precisions
        ]
        print(f"| {row['data']} | {row['evaluator s']:.1f} | " + " | ".join(cells) + f" | {row['load avg']:.1f} |")
    print(
        "\n| data set | evaluator nDCG@10 / MRR@10 / FLOPS | "
        + " | ".join(
            f"ours {p}: nDCG@10 binary / MRR@10 / FLOPS / nDCG graded / nDCG BEIR rule" for p in args.precisions
        )
        + " |"
    )
    print("|---|---|" + "---|" * len(args.precisions))
    for row in rows:
        cells = [
            f"{row[f'{p} nDCG bin']:.4f} / {row[f'{p} MRR']:.4f} / {row[f'{p} FLOPS']:.3f} / "
            f"{row[f'{p} nDCG graded']:.4f} / {row[f'{p} nDCG BEIR rule']:.4f}"
            for p in args.precisions
        ]
        print(
            f"| {row['data']} | {row['ev nDCG']:.4f} / {row['ev MRR']:.4f} / {row['ev FLOPS']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    print(f"\nmachine: {psutil.cpu_count()} CPUs, load average during the runs in the first table")


if __name__ == "__main__":
    main()
