"""The first hour of a real run, measured at S x MS MARCO's size on synthetic files in the exact real formats.

    python bench/bench_full_scale.py --scale 1 --work_dir /work/fullscale --out full_scale.json
    python bench/bench_full_scale.py --scale 1 --work_dir /work/fullscale --out full_scale.json --stages dev_eval

Stages (each measured in a fresh process, so that a failure loses one figure; results are merged into --out,
so stages can be rerun alone; every stage records the git commit it measured):

  files          WORK/data: collection.tsv (8,841,823 x S passages of ~335 characters), queries.train.tsv
                 (808,731 x S), msmarco-hard-negatives.jsonl.gz (a line per query: 502,939 x S with a positive,
                 the rest without; 13 systems x 50 negatives drawn from one pool of 202 per query, so that
                 the CE file scores ~198 pairs a query, ~160M at S = 1), the CE-scores pickle (every (query,
                 passage) pair of the line, written as pickle.dump writes the dict at protocol 4), dev small
                 (6,980 x S queries, 7,437 x S qrels). Skipped when WORK/files.json says they are there.
  data_first, data_cached   the data stage of train_max.py and train_distill.py (mining + the 30-epoch
                 dataset): first with every cache beside the data removed, then again from the caches
  data_ranks, data_single   the train_max data stage (first run) under torchrun --nproc_per_node --ranks,
                 and under torchrun with one process: peak of the summed PSS of the worker processes
  vectors        WORK/vectors-F: SPLADE-like document shards (400k rows, ~135 terms each) and --search_queries
                 queries (32 terms) whose FLOPS statistic is about F = 1.1 and 3.8 (the table's models)
  index          evaluate.py's index build from the shard files (+ the TREC tie ranks) and exact top-1000
                 search with 1 and 2 numba threads, per FLOPS: seconds, peak RSS, ms per query (search "auto",
                 as evaluate.py runs it; also per method, kernel and pruned, and at top-10 with 1 thread)
  dev_eval       one in-training dev evaluation (dev_eval.DevRetrievalEvaluator) at the default size, 500
                 queries x 100k passages sampled from collection.tsv, with --model (splade-tiny)

Memory: at S = 1 the index stage holds ~9.5 GB (the index) and the first data runs a few GB; check `free -g`.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_memory import MINE, RESULT  # noqa: E402
from common import ROOT, SHARED, machine_name  # noqa: E402

DATA_STAGES = ("data_first", "data_cached", "data_ranks", "data_single")
STAGES = ("files", "vectors", "index", "dev_eval", *DATA_STAGES)
FLOPS_OFFSETS = {"1.1": 245.0, "3.8": 36.0}  # bench_retrieval.term_distribution offsets giving those FLOPS
SCRIPTS = {"max": "train_max", "distill": "train_distill"}

FILES = (
    """
import json, resource, sys, time
sys.path.insert(0, "bench")
from full_scale_files import counts, write_dev_files, write_training_files
t = time.time()
scores = write_training_files(sys.argv[1], float(sys.argv[2]))
write_dev_files(sys.argv[1], float(sys.argv[2]))
result = {"counts": counts(float(sys.argv[2])), "ce_scores": scores}
"""
    + RESULT
)

VECTORS = (
    """
import json, resource, sys, time
from pathlib import Path
import scipy.sparse as sp
sys.path.insert(0, "bench")
from bench_retrieval import synthetic_vectors, term_distribution, write_shards
t = time.time()
out, docs, queries, offset = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
p = term_distribution(offset)
shards = write_shards(docs, 110, 150, p, out)
sp.save_npz(out / "queries.npz", synthetic_vectors(queries, 32, 32, p, seed=2), compressed=False)
result = {"shards": len(shards)}
"""
    + RESULT
)

INDEX = (
    """
import json, resource, sys, time
from pathlib import Path
import numba, numpy as np, scipy.sparse as sp
import retrieval
t = time.time()
d = Path(sys.argv[1])
shards = sorted(d.glob("docs-*.npz"))
index = retrieval.build_index(shards, show_progress=True)
tie_ranks = retrieval.trec_tie_ranks([str(i) for i in range(index.num_docs)])  # evaluate.py: ids are strings
build_s = time.time() - t
build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
queries = sp.load_npz(d / "queries.npz")
flops = retrieval.flops_statistic(queries, index)
started = time.time()
retrieval.search(index, queries[:2], k=1000, tie_ranks=tie_ranks)  # compiles unless numba's cache has it
first_call_s = time.time() - started
by_method = {}  # method -> k -> threads -> ms/query; "auto" (what evaluate.py runs) is the reported figure
for method in ("auto", "kernel", "pruned"):
    retrieval.search(index, queries[:2], k=1000, tie_ranks=tie_ranks, method=method)  # compiles; touches the index
    for k in (1000, 10):
        for threads in sorted({1, numba.config.NUMBA_NUM_THREADS}) if k == 1000 else [1]:
            numba.set_num_threads(threads)
            started = time.perf_counter()
            retrieval.search(index, queries, k=k, tie_ranks=tie_ranks, method=method)
            ms_q = round((time.perf_counter() - started) / queries.shape[0] * 1e3, 2)
            by_method.setdefault(method, {}).setdefault(str(k), {})[str(threads)] = ms_q
ms = by_method["auto"]["1000"]
result = {"index_build_s": round(build_s, 1), "index_build_peak_rss_mb": round(build_peak), "flops": round(flops, 3),
          "docs": index.num_docs, "postings": index.nnz, "index_gib": round(index.nbytes / 2**30, 2),
          "queries": queries.shape[0], "query_terms": round(queries.nnz / queries.shape[0], 1),
          "first_call_s": round(first_call_s, 1), "search_ms_per_query": ms, "search_ms_by_method": by_method,
          "peak_rss_mb_after_search": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
"""
    + RESULT
)

DEV_EVAL = (
    """
import json, resource, sys, time
import torch
from dev_eval import DevRetrievalEvaluator, dev_subset
from encoding import load_model
t = time.time()
subset = dev_subset(sys.argv[1], int(sys.argv[3]), int(sys.argv[4]), 42)
subset_s = time.time() - t
model = load_model(sys.argv[2])
started = time.time()
metrics = DevRetrievalEvaluator(subset)(model)
result = {"dev_eval_s": round(time.time() - started, 1), "dev_subset_s": round(subset_s, 1),
          "passages": len(subset.doc_ids), "queries": len(subset.query_ids), "torch_threads": torch.get_num_threads(),
          "metrics": {k: round(float(v), 4) for k, v in metrics.items()}}
"""
    + RESULT
)


def git_commit():
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True
    )
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def tree_pss_mb(root_pid, workers_only):
    """Summed PSS of a process tree (MB); workers_only: the leaves of torchrun (its children), not the launcher."""
    try:
        root = psutil.Process(root_pid)
        procs = root.children(recursive=True) + ([] if workers_only else [root])
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def run(label, argv, timeout, sample_pss=False):
    """Run a fresh process; returns (the RESULT dicts it printed, peak summed PSS or None). Raises on failure."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    print(f"[{time.strftime('%H:%M:%S')}] {label}: {' '.join(map(str, argv))[:200]}", flush=True)
    log = open(LOGS / f"{label}.log", "w")
    proc = subprocess.Popen([str(a) for a in argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.wait(0.5):
            peak[0] = max(peak[0], tree_pss_mb(proc.pid, workers_only=True))

    sampler = threading.Thread(target=sample, daemon=True)
    if sample_pss:
        sampler.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"{label}: over {timeout} s") from None
    finally:
        stop.set()
    log.close()
    if proc.returncode:
        tail = (LOGS / f"{label}.log").read_text()[-2000:]
        raise RuntimeError(f"{label}: exit {proc.returncode}\n{tail}")
    results = [json.loads(line[7:]) for line in stdout.splitlines() if line.startswith("RESULT ")]
    print(f"  -> {results if len(results) < 3 else results[:2] + ['...']}", flush=True)
    return results, (round(peak[0]) if sample_pss else None)


def script_file(name, text):
    path = LOGS / f"stage_{name}.py"  # not the name of a module it imports
    path.write_text(text)
    return path


def clear_caches(data_dir):
    """Remove everything beside the generated files (the CE-score cache, mined-data caches, locks)."""
    keep = set(json.loads((data_dir.parent / "files.json").read_text())["files"])
    for p in data_dir.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def stage_files(args, data_dir, out):
    manifest = args.work_dir / "files.json"
    if manifest.exists() and json.loads(manifest.read_text())["scale"] == args.scale:
        print(f"files: {manifest} says they are there (scale {args.scale})")
        return json.loads(manifest.read_text())
    [r], _ = run("files", [sys.executable, script_file("files", FILES), data_dir, args.scale], args.timeout)
    info = {"scale": args.scale, "files_s": r["seconds"], **r, "files": sorted(p.name for p in data_dir.iterdir())}
    info["file_mb"] = {p.name: round(p.stat().st_size / 2**20) for p in data_dir.iterdir()}
    manifest.write_text(json.dumps(info, indent=2))
    return info


def stage_data(args, data_dir, out, stage):
    mine = script_file("mine", MINE)
    if stage in ("data_first", "data_cached"):
        key = "data_first_run" if stage == "data_first" else "data_cached"
        for mode in args.scripts:
            script = SCRIPTS[mode]
            if stage == "data_first":
                clear_caches(data_dir)
            elif not any(p.is_dir() for p in (data_dir / "mined-cache").glob(f"{script}-*")):  # cleared by the other
                run(f"{stage}_{mode}_fill", [sys.executable, mine, data_dir, mode], args.timeout)  # not recorded
            [r], _ = run(f"{stage}_{mode}", [sys.executable, mine, data_dir, mode], args.timeout)
            out.setdefault(f"{key}_s", {})[script] = r["seconds"]
            out.setdefault(f"{key}_peak_rss_mb", {})[script] = r["peak_rss_mb"]
            out.setdefault(f"{key}_detail", {})[script] = r
        return
    ranks = args.ranks if stage == "data_ranks" else 1
    clear_caches(data_dir)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", ranks, "--master_port", 29533]
    rs, pss = run(stage, [*torchrun, mine, data_dir, "max"], args.timeout, sample_pss=True)
    if stage == "data_ranks":
        out.update(ranks=ranks, ranks_peak_pss_mb=pss, ranks_detail=rs)
    else:
        out.update(single_peak_pss_mb=pss, single_detail=rs)


def stage_vectors(args, out):
    docs = round(8_841_823 * args.scale)
    for flops in args.flops:
        offset = FLOPS_OFFSETS[flops]
        d = args.work_dir / f"vectors-{flops}"
        if (d / "queries.npz").exists():
            print(f"vectors: {d} is there")
            continue
        shutil.rmtree(d, ignore_errors=True)
        script = script_file("vectors", VECTORS)
        [r], _ = run(f"vectors_{flops}", [sys.executable, script, d, docs, args.search_queries, offset], args.timeout)
        out.setdefault("vectors_s", {})[flops] = r["seconds"]


def stage_index(args, out):
    for flops in args.flops:
        [r], _ = run(
            f"index_{flops}",
            [sys.executable, script_file("index", INDEX), args.work_dir / f"vectors-{flops}"],
            args.timeout,
        )
        out.setdefault("index_build_s", {})[flops] = r["index_build_s"]
        out.setdefault("index_peak_rss_mb", {})[flops] = r["index_build_peak_rss_mb"]
        out.setdefault("search_ms_per_query", {})[flops] = r["search_ms_per_query"]
        out.setdefault("index_detail", {})[flops] = r


def stage_dev_eval(args, data_dir, out):
    [r], _ = run(
        "dev_eval",
        [sys.executable, script_file("dev_eval", DEV_EVAL), data_dir, args.model, args.dev_queries, args.dev_passages],
        args.timeout,
    )
    out.update(dev_eval_s=r["dev_eval_s"], dev_eval_detail=r)


LOGS = Path(".")


def main():
    global LOGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="times the real counts")
    parser.add_argument("--work_dir", type=Path, required=True, help="where the files go (~20 GB at scale 1)")
    parser.add_argument("--out", type=Path, required=True, help="JSON results, merged with what it holds")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma list among {', '.join(STAGES)}")
    parser.add_argument("--ranks", type=int, default=8, help="processes of data_ranks")
    parser.add_argument("--scripts", default="max,distill", help="whose data stage data_first/data_cached run")
    parser.add_argument("--flops", default=",".join(FLOPS_OFFSETS), help="vector sets of vectors and index")
    parser.add_argument("--search_queries", type=int, default=200)
    parser.add_argument("--model", default=str(SHARED / "models" / "splade-tiny"))
    # the training scripts' --eval_queries and --eval_corpus_size defaults
    parser.add_argument("--dev_queries", type=int, default=500)
    parser.add_argument("--dev_passages", type=int, default=100_000)
    parser.add_argument("--timeout", type=int, default=7200, help="seconds per stage process")
    args = parser.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    args.scripts = [m.strip() for m in args.scripts.split(",") if m.strip()]
    if set(args.scripts) - set(SCRIPTS):
        parser.error(f"--scripts: choose among {list(SCRIPTS)}")
    args.flops = [f.strip() for f in args.flops.split(",") if f.strip()]
    if set(args.flops) - set(FLOPS_OFFSETS):
        parser.error(f"--flops: choose among {list(FLOPS_OFFSETS)}")
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}; choose among {STAGES}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    LOGS = args.work_dir / "logs"
    LOGS.mkdir(exist_ok=True)
    data_dir = args.work_dir / "data"
    data_dir.mkdir(exist_ok=True)
    out = json.loads(args.out.read_text()) if args.out.exists() else {}
    out.update(scale=args.scale, machine=machine_name("cpu"))
    failed = []
    for stage in stages:
        started, commit = time.time(), git_commit()
        try:
            if stage == "files":
                out["files"] = stage_files(args, data_dir, out)
            elif stage in DATA_STAGES:
                stage_data(args, data_dir, out, stage)
            elif stage == "vectors":
                stage_vectors(args, out)
            elif stage == "index":
                stage_index(args, out)
            else:
                stage_dev_eval(args, data_dir, out)
            out.setdefault("errors", {}).pop(stage, None)
        except (RuntimeError, OSError, KeyError, ValueError) as err:
            print(f"{stage} failed: {err}", file=sys.stderr)
            out.setdefault("errors", {})[stage] = str(err)[-2000:]
            failed.append(stage)
        out.setdefault("commit", {})[stage] = commit
        out.setdefault("stage_wall_s", {})[stage] = round(time.time() - started, 1)
        args.out.write_text(json.dumps(out, indent=2))  # after every stage: a later failure keeps it
    print(json.dumps({k: v for k, v in out.items() if not k.endswith("_detail")}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
