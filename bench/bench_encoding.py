"""Corpus encoding throughput: our SpladeMax module against SparseEncoder.encode_document, same texts.

  ours fp32   model[0](model[0].preprocess(batch)) under torch.inference_mode, batches sorted by length,
              plain fp32 projection (screen_bf16=False)
  screened    the same with screen_bf16=True: a bf16 projection finds the (text, term) pairs that can be positive,
              only those are computed in fp32 (max_logits_screened); reports the fraction of pairs recomputed
  ours bf16   the same under torch.autocast(cpu|cuda, bfloat16)
  st          SparseEncoder(path).encode_document(texts, batch_size) (Transformer fill-mask + SpladePooling max;
              it sorts by length too, and returns sparse tensors, its default)

Both sides include tokenisation. Also reported: bf16 and screened against fp32 (max abs difference of the vectors,
change of the active-term count) and ours against sentence-transformers (max abs difference, a correctness check).

Usage (from the repository root):
  python bench/bench_encoding.py                 # CISI corpus, splade-tiny, max_seq_length 256, batch 32
  python bench/bench_encoding.py --model distilbert-random --decoder-bias -2.15 --docs 256
  python bench/bench_encoding.py --variants st fp32 screened   # skip bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, add_model_arguments  # noqa: E402  (benchmarks run as scripts)

VARIANTS = ("st", "fp32", "screened", "bf16")
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
add_model_arguments(parser)
parser.add_argument("--corpus", default=str(SHARED / "data" / "beir" / "cisi" / "corpus.jsonl"))
parser.add_argument("--docs", type=int, default=0, help="encode the first N documents (0: all)")
parser.add_argument("--batch-size", type=int, default=32)
parser.add_argument("--max-seq-length", type=int, default=256)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
parser.add_argument(
    "--wait-idle",
    type=float,
    default=120,
    help="seconds to wait, before starting, for other processes to leave the CPU idle (shared machines)",
)
parser.add_argument(
    "--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS), help="what to run (fp32 always runs)"
)
parser.add_argument("--output", help="write the results as JSON here")
args = parser.parse_args()

import torch  # noqa: E402

sys.path.insert(0, str(ROOT))
from common import build_random_distilbert, cpu_counters, machine_name, others_cpu_pct, wait_for_idle  # noqa: E402

import bf16_screen  # noqa: E402
from splade_module import load_splade  # noqa: E402

# ---------------------------------------------------------------- contention (other processes on the same cores)


def read_corpus() -> list[str]:
    texts = [json.loads(line)["text"] for line in open(args.corpus)]
    return texts[: args.docs] if args.docs else texts


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def encode_ours(module, texts: list[str], device: str, variant: str) -> tuple[float, torch.Tensor]:
    """Seconds and the (docs x vocab) vectors, in the corpus order. variant: fp32, screened or bf16."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # longest first, as sentence-transformers
    vectors = torch.empty(len(texts), module.get_embedding_dimension())
    cast = torch.autocast(device, dtype=torch.bfloat16) if variant == "bf16" else contextlib.nullcontext()
    module.screen_bf16 = variant == "screened"
    with torch.inference_mode(), cast:
        module({k: v.to(device) for k, v in module.preprocess(texts[:2]).items()})  # warm-up
        sync(device)
        start = time.perf_counter()
        for begin in range(0, len(texts), args.batch_size):
            rows = order[begin : begin + args.batch_size]
            features = {k: v.to(device) for k, v in module.preprocess([texts[i] for i in rows]).items()}
            vectors[rows] = module(features)["sentence_embedding"].float().cpu()
        sync(device)
        return time.perf_counter() - start, vectors


class CandidateCounter:
    """Wraps bf16_screen.bf16_screen to count the (text, term) pairs it sends to the exact fp32 recomputation."""

    def __init__(self):
        self.candidates = self.pairs = 0
        self.screen = bf16_screen.bf16_screen

    def __call__(self, *screen_args):
        candidates = self.screen(*screen_args)
        self.candidates += int(candidates.sum())
        self.pairs += candidates.numel()
        return candidates

    def fraction(self) -> float:
        return self.candidates / max(1, self.pairs)


def encode_st(model, texts: list[str], device: str) -> tuple[float, torch.Tensor]:
    model.encode_document(texts[:2], batch_size=args.batch_size)  # warm-up
    sync(device)
    start = time.perf_counter()
    vectors = model.encode_document(texts, batch_size=args.batch_size)
    sync(device)
    seconds = time.perf_counter() - start
    return seconds, vectors.to_dense().float().cpu()


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Max abs difference, active terms per doc of each, and the terms active in only one of them."""
    active_a, active_b = a > 0, b > 0
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "active_per_doc": [
            round(float(active_a.sum(1).float().mean()), 2),
            round(float(active_b.sum(1).float().mean()), 2),
        ],
        "active_count_change_pct": round(100 * float(active_b.sum() - active_a.sum()) / max(1, int(active_a.sum())), 3),
        "terms_active_in_one_only_per_doc": round(float((active_a ^ active_b).sum(1).float().mean()), 2),
    }


def run_variants(path: str, texts: list[str], device: str) -> dict:
    """{variant: (seconds, vectors)}, plus the screen's candidate fraction, all in one process and one sitting."""
    from sentence_transformers import SparseEncoder

    ours = load_splade(path, max_seq_length=args.max_seq_length).to(device).eval()
    st = SparseEncoder(path, device=device)
    st.max_seq_length = args.max_seq_length
    counter = CandidateCounter()
    bf16_screen.bf16_screen = counter
    if device == "cpu":
        wait_for_idle(args.wait_idle, max(5.0, 95.0 - 100.0 * args.threads / (os.cpu_count() or 1)))
    runs = {}
    for variant in [v for v in VARIANTS if v in args.variants or v == "fp32"]:
        if variant == "st":
            runs[variant] = encode_st(st, texts, device)
        else:
            runs[variant] = encode_ours(ours[0], texts, device, variant)
    return runs, counter.fraction()


def main() -> None:
    torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    scratch = None
    path = args.model
    if args.model == "distilbert-random":
        scratch = tempfile.mkdtemp(prefix="splade-bench-")
        path = build_random_distilbert(scratch, args.decoder_bias)
    try:
        texts = read_corpus()
        counters, cpu_start, wall_start = cpu_counters(), time.process_time(), time.perf_counter()
        runs, candidate_fraction = run_variants(path, texts, device)
        others = others_cpu_pct(counters, cpu_counters())
        cpu_per_wall = (time.process_time() - cpu_start) / (time.perf_counter() - wall_start)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    config = {
        "model": args.model,
        "decoder_bias": args.decoder_bias,
        "docs": len(texts),
        "batch_size": args.batch_size,
        "max_seq_length": args.max_seq_length,
        "threads": args.threads,
        "device": device,
        "machine": machine_name(device),
        "bf16_matmul_native": bf16_screen.bf16_matmul_is_native(torch.device(device)),
        "torch": torch.__version__,
        "others_cpu_pct": others,
        "cpu_per_wall": round(cpu_per_wall, 2),
    }
    report(config, runs, candidate_fraction, len(texts))


def report(config: dict, runs: dict, candidate_fraction: float, docs: int) -> None:
    fp32_s, fp32_vectors = runs["fp32"]
    results = {
        "seconds": {name: round(s, 2) for name, (s, _) in runs.items()},
        "docs_per_s": {name: round(docs / s, 1) for name, (s, _) in runs.items()},
        "speedup_vs_fp32": {name: round(fp32_s / s, 2) for name, (s, _) in runs.items()},
        "screen_candidate_fraction": round(candidate_fraction, 5) if "screened" in runs else None,
    }
    comparisons = [("st", "fp32"), ("fp32", "screened"), ("fp32", "bf16")]
    for a, b in [(a, b) for a, b in comparisons if a in runs and b in runs]:
        results[f"{b}_vs_{a}"] = compare(runs[a][1], runs[b][1])
    print(json.dumps(config))
    print(f"{'variant':<10} {'seconds':>8} {'docs/s':>8} {'vs fp32':>8}")
    for name, (seconds, _) in runs.items():
        print(f"{name:<10} {seconds:>8.2f} {docs / seconds:>8.1f} {fp32_s / seconds:>7.2f}x")
    if results["screen_candidate_fraction"] is not None:
        print(f"screened: {100 * candidate_fraction:.3f} % of (text, term) pairs recomputed in fp32")
    for name in [key for key in results if key.endswith(("_vs_st", "_vs_fp32")) and key != "speedup_vs_fp32"]:
        c = results[name]
        print(
            f"{name}: max |diff| {c['max_abs_diff']:.4g}, active terms/doc {c['active_per_doc'][0]} -> "
            f"{c['active_per_doc'][1]} ({c['active_count_change_pct']:+.2f} %), "
            f"terms active in only one: {c['terms_active_in_one_only_per_doc']}/doc"
        )
    others, cpu_per_wall = config["others_cpu_pct"], config["cpu_per_wall"]
    if others > 5 and not (args.threads == 1 and cpu_per_wall > 0.95):
        print(
            f"WARNING: other processes took {others} % of the CPU meanwhile; rerun on an idle machine "
            "(or with --threads 1, which only needs one free core)"
        )
    if args.output:
        Path(args.output).write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
