"""End-to-end evaluation time on a first run: `python evaluate.py` against sentence-transformers'
SparseInformationRetrievalEvaluator, same model, same data, one after the other.

Each side runs in a fresh Python process and is timed from outside, process start included: importing
torch, loading the model, reading the files, encoding queries and corpus, retrieval and measures. Ours
gets an empty numba cache (NUMBA_CACHE_DIR pointed at a new directory, as in a fresh clone, which has no
__pycache__) and an empty document-vector cache, and writes its run file. Afterwards ours runs once
more in a new process from the vector cache (re-evaluation time).

Printed per data set: seconds, the ratio ours / evaluator, our time split into encoding and search, and
the metrics side by side. The evaluator takes relevance as sets, so its nDCG@10 is binary; ours is shown
binary (our run file scored with binary judgments, comparable) and graded (metrics.json). Neither drops
self hits (--keep_self_hits on our side, as the evaluator keeps them).

Usage (from the repository root; ../shared holds the data and splade-tiny):
  python bench/bench_evaluate.py                                  # CISI
  python bench/bench_evaluate.py --datasets cisi arguana:3000     # and a 3,000-document ArguAna subset
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import SHARED, cpu_counters  # noqa: E402  (bench/ is the script's directory)


def read_lines(directory: Path, name: str) -> list[dict]:
    path = directory / name if (directory / name).is_file() else directory / f"{name}.gz"
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        return [json.loads(line) for line in f]


def read_relevant(directory: Path) -> dict[str, set[str]]:
    relevant = {}
    with open(directory / "qrels" / "test.tsv") as f:
        next(f)
        for line in f:
            qid, doc, rel = line.split()
            if int(rel) > 0:
                relevant.setdefault(qid, set()).add(doc)
    return relevant


def write_subset(directory: Path, num_docs: int, target: Path, seed: int = 0) -> Path:
    """A BEIR directory of num_docs documents: every judged query's relevant documents while they fit
    (queries in a seeded random order), then random others; the queries whose relevant documents are all in."""
    rng = np.random.default_rng(seed)
    corpus = read_lines(directory, "corpus.jsonl")
    relevant = read_relevant(directory)
    chosen_docs, chosen_queries = set(), []
    for qid in rng.permutation(sorted(relevant)):
        if len(chosen_docs | relevant[qid]) > num_docs // 2:  # half the subset, so most documents are distractors
            break
        chosen_docs |= relevant[qid]
        chosen_queries.append(str(qid))
    others = [d["_id"] for d in corpus if d["_id"] not in chosen_docs]
    chosen_docs |= set(rng.choice(others, size=min(len(others), num_docs - len(chosen_docs)), replace=False))
    (target / "qrels").mkdir(parents=True, exist_ok=True)
    with open(target / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in corpus if d["_id"] in chosen_docs)
    wanted = set(chosen_queries)
    with open(target / "queries.jsonl", "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in read_lines(directory, "queries.jsonl") if q["_id"] in wanted)
    with open(target / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"{q}\t{d}\t1\n" for q in chosen_queries for d in sorted(relevant[q]))
    return target


def reference_in_this_process(model_path: str, directory: Path, batch_size: int, max_seq_length: int | None) -> None:
    """The child process of the evaluator's side: prints its metrics as the last line."""
    import torch
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

    model = SparseEncoder(model_path, device="cuda" if torch.cuda.is_available() else "cpu")
    if max_seq_length:
        model.max_seq_length = max_seq_length
    corpus = {d["_id"]: f"{d.get('title') or ''} {d['text']}".strip() for d in read_lines(directory, "corpus.jsonl")}
    queries = {q["_id"]: q["text"] for q in read_lines(directory, "queries.jsonl")}
    relevant = read_relevant(directory)
    evaluator = SparseInformationRetrievalEvaluator(
        {q: t for q, t in queries.items() if q in relevant},  # the judged queries, as ours evaluates
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
    print(json.dumps(evaluator(model)))


def children_jiffies() -> int:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return round((usage.ru_utime + usage.ru_stime) * os.sysconf("SC_CLK_TCK"))


def timed(command: list[str], env: dict) -> tuple[float, float, float, str]:
    """Wall seconds of a fresh process, process start included; its CPU seconds (all threads: the fairer
    comparison on a machine that others share); the share of the machine's CPU that other processes (not this
    one, not the child) took meanwhile."""
    before, children_before = cpu_counters(), children_jiffies()
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    total, idle, own = (a - b for a, b in zip(cpu_counters(), before))
    child = children_jiffies() - children_before
    others = total - idle - own - child
    return seconds, child / os.sysconf("SC_CLK_TCK"), round(100 * max(0, others) / max(1, total), 1), done.stdout


def binary_metrics(run_file: Path, relevant: dict) -> dict:
    import retrieval

    run = {}
    for line in open(run_file):
        qid, _, doc, _, score, _ = line.split()
        run.setdefault(qid, {})[doc] = float(score)
    return retrieval.evaluate_run(run, {q: dict.fromkeys(docs, 1) for q, docs in relevant.items()})


def compare(directory: Path, args, work: Path) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(work / "numba-cache"), "TOKENIZERS_PARALLELISM": "false"}
    length = ["--max_seq_length", str(args.max_seq_length)] if args.max_seq_length else []
    reference = [sys.executable, __file__, "--reference", str(directory), "--model", args.model]
    reference += ["--batch_size", str(args.batch_size)] + length
    ref_seconds, ref_cpu, ref_load, stdout = timed(reference, env)
    ref = json.loads(stdout.strip().splitlines()[-1])

    ours = [sys.executable, "evaluate.py", args.model, "--beir", str(directory), "--keep_self_hits", "--no_download"]
    ours += ["--cache_dir", str(work / "cache"), "--output", str(work / "out"), "--batch_size", str(args.batch_size)]
    ours += ["--precision", "fp32"] + length
    seconds, cpu, load, _ = timed(ours, env)
    metrics = next(v for k, v in json.loads((work / "out" / "metrics.json").read_text()).items() if k != "beir-mean")
    run_file = next((work / "out" / "runs").glob("*.trec"))
    binary = binary_metrics(run_file, read_relevant(directory))
    again_seconds, _, _, _ = timed(ours, env)  # vector cache and numba cache now filled
    return {
        "data": directory.name,
        "docs": metrics["num_docs"],
        "queries": metrics["num_queries"],
        "evaluator s": ref_seconds,
        "ours s": seconds,
        "ratio": seconds / ref_seconds,
        "evaluator cpu s": ref_cpu,
        "ours cpu s": cpu,
        "cpu ratio": cpu / ref_cpu,
        "encode s": metrics["encode_seconds"],
        "search s": metrics["search_seconds"],
        "re-run s": again_seconds,
        "ev nDCG": ref["dot_ndcg@10"],
        "ev MRR": ref["dot_mrr@10"],
        "ours nDCG bin": binary["ndcg@10"],
        "ours MRR": metrics["mrr@10"],
        "ours nDCG graded": metrics["ndcg@10"],
        "others cpu": (ref_load + load) / 2,
    }


def resolve(spec: str, work: Path) -> Path:
    """'name', 'name:DOCS' (a subset of that many documents) or a BEIR directory."""
    name, _, size = spec.partition(":")
    directory = Path(name) if Path(name).is_dir() else SHARED / "data" / "beir" / name
    if not size:
        return directory
    return write_subset(directory, int(size), work / f"{directory.name}-{size}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHARED / "models" / "splade-tiny"))
    parser.add_argument("--datasets", nargs="+", default=["cisi"], help="NAME, NAME:DOCS (a subset) or a directory")
    parser.add_argument("--batch_size", type=int, default=32, help="both sides (the evaluator's default is 32)")
    parser.add_argument("--max_seq_length", type=int, default=256, help="both sides")
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)  # the evaluator's child process
    args = parser.parse_args()
    if args.reference:
        return reference_in_this_process(args.model, args.reference, args.batch_size, args.max_seq_length)

    print(f"model {args.model}, batch {args.batch_size}, max_seq_length {args.max_seq_length}, {os.cpu_count()} CPUs")
    rows = []
    for spec in args.datasets:
        with tempfile.TemporaryDirectory() as tmp:
            row = compare(resolve(spec, Path(tmp)), args, Path(tmp))
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    print(
        "\n| data set | docs / queries | evaluator s | ours s (first run) | ratio | CPU s evaluator / ours | CPU ratio "
        "| encode s | search s | re-run s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['data']} | {r['docs']} / {r['queries']} | {r['evaluator s']:.1f} | {r['ours s']:.1f} | "
            f"{r['ratio']:.2f} | {r['evaluator cpu s']:.0f} / {r['ours cpu s']:.0f} | {r['cpu ratio']:.2f} | "
            f"{r['encode s']:.1f} | {r['search s']:.2f} | {r['re-run s']:.1f} |"
        )
    print("\n| data set | evaluator nDCG@10 / MRR@10 | ours nDCG@10 binary / MRR@10 / nDCG@10 graded | others' CPU % |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['data']} | {r['ev nDCG']:.4f} / {r['ev MRR']:.4f} | {r['ours nDCG bin']:.4f} / "
            f"{r['ours MRR']:.4f} / {r['ours nDCG graded']:.4f} | {r['others cpu']:.0f} |"
        )


if __name__ == "__main__":
    main()
