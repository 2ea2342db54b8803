"""One SPLADE training step (forward + backward + AdamW step): our SpladeMax head against the alternatives.

Variants, all on the same tokenised inputs (queries, positives, negatives) and the same model weights:
  lean      SpladeMax with the SpladeMaxHead autograd function (sparse backward), our MNRL + FLOPS loss
  padded    the lean head as it was before it skipped padding (splade_module.py at --reference-commit, read
            with git show): it projects every padded position and keeps the arg-max in the forward
  autograd  SpladeMax(lean_head=False): plain autograd through the chunked max, same loss
  naive     full B x L x V logits from the MLM, splade_max_naive (log1p(relu) * mask, max), same loss
  st        sentence-transformers' SparseEncoder(path) (Transformer fill-mask + SpladePooling max) with
            SpladeLoss(SparseMultipleNegativesRankingLoss, FLOPS regularisers)

Each variant runs in its own process (this script re-invoked with --variant NAME --json), so that one
variant's allocations cannot hide or inflate another's memory.

Memory. CPU: the peak RSS during a measured step minus the RSS just before it. The step follows a warm-up
step (which allocated AdamW's state), the freed heap is handed back with malloc_trim before the baseline,
and the peak is the kernel's high-water mark (VmHWM) after resetting it through /proc/self/clear_refs, so
no short-lived peak is missed (a 1 ms psutil sampler is the fallback where clear_refs is unavailable).
GPU: torch.cuda.max_memory_allocated after a reset, minus memory_allocated before the step, bf16 autocast.

Usage (from the repository root):
  python bench/bench_training.py                              # reference CPU config, splade-tiny, 16/16/16 x 256
  python bench/bench_training.py --model distilbert-random --decoder-bias -2.15 --batch 4 --steps 2
  python bench/bench_training.py --threads 1                  # a shared machine with one free core
  python bench/bench_training.py --length-mix msmarco --variant lean,padded   # MS MARCO-like lengths, padding
  python bench/bench_training.py --find-max-batch             # GPU only: largest batch, lean vs st
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, add_model_arguments  # noqa: E402  (benchmarks run as scripts)

VARIANTS = ("lean", "padded", "autograd", "naive", "st")
MSMARCO_QUERIES = SHARED / "data" / "msmarco" / "queries.dev.small.tsv"

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
add_model_arguments(parser)
parser.add_argument("--variant", default="all", help=f"'all' or a comma list of {', '.join(VARIANTS)}")
parser.add_argument(
    "--length-mix",
    choices=("long", "msmarco"),
    default="long",
    help="long: CISI queries, CISI abstracts of at least --doc-length tokens (no padding in documents). msmarco: "
    "MS MARCO dev queries and CISI abstracts cut to 60-80 tokens (seeded), the lengths MS MARCO training pads",
)
parser.add_argument("--reference-commit", default="5ba5a54", help="the commit whose lean head 'padded' runs")
parser.add_argument("--batch", type=int, default=16, help="queries per step; as many positives and negatives")
parser.add_argument("--doc-length", type=int, default=256, help="max_seq_length (documents are all at least this long)")
parser.add_argument("--steps", type=int, default=3, help="measured steps after the warm-up step")
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--lambda-q", type=float, default=0.0008)
parser.add_argument("--lambda-d", type=float, default=0.0006)
parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (always on for CUDA)")
parser.add_argument(
    "--find-max-batch", action="store_true", help="GPU: double then bisect the batch until OOM, lean vs st"
)
parser.add_argument("--max-batch-limit", type=int, default=4096)
parser.add_argument(
    "--peak-flops", type=float, default=989e12, help="the GPU's peak bf16 FLOP/s (H100 SXM dense: 989e12)"
)
parser.add_argument(
    "--wait-idle",
    type=float,
    default=120,
    help="seconds to wait, before each variant, for other processes to leave the CPU idle (shared machines)",
)
parser.add_argument(
    "--retries", type=int, default=1, help="re-run a variant whose steps other processes disturbed (> 5 %% CPU)"
)
parser.add_argument("--json", action="store_true", help="(child mode) print one JSON result line")
parser.add_argument("--output", help="write the results as JSON here")
args = parser.parse_args()

import torch  # noqa: E402  (after argparse so that --help is instant)

sys.path.insert(0, str(ROOT))
from common import build_random_distilbert, cpu_counters, machine_name, others_cpu_pct, wait_for_idle  # noqa: E402

from losses import MultipleNegativesRankingLossSplade  # noqa: E402
from splade_module import load_splade, splade_max_naive  # noqa: E402


def pick_device() -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


@functools.cache
def cisi_texts(length: int, tokenizer) -> tuple[list[str], list[str]]:
    """CISI queries, and the CISI abstracts of at least `length` tokens."""
    beir = SHARED / "data" / "beir" / "cisi"
    queries = [json.loads(line)["text"] for line in open(beir / "queries.jsonl")]
    corpus = [json.loads(line)["text"] for line in open(beir / "corpus.jsonl")]
    return queries, [text for text in corpus if len(tokenizer(text, truncation=False)["input_ids"]) >= length]


def read_texts(batch: int, length: int, tokenizer) -> dict[str, list[str]]:
    """`batch` queries, positives and negatives (cycled if the batch asks for more than CISI has)."""
    if args.length_mix == "msmarco":
        return msmarco_like_texts(batch, tokenizer)
    queries, long_docs = cisi_texts(length, tokenizer)
    cycle = lambda texts, start, n: [texts[(start + i) % len(texts)] for i in range(n)]  # noqa: E731
    return {
        "query": cycle(queries, 0, batch),
        "positive": cycle(long_docs, 0, batch),
        "negative": cycle(long_docs, batch, batch),
    }


def msmarco_like_texts(batch: int, tokenizer, seed: int = 0) -> dict[str, list[str]]:
    """MS MARCO dev queries, and CISI abstracts cut to 60-80 tokens (uniform, seeded): MS MARCO passages' lengths."""
    generator = random.Random(seed)
    with open(MSMARCO_QUERIES) as f:
        queries = [line.rstrip("\n").split("\t", 1)[1] for line in f]
    queries = generator.sample(queries, batch)
    corpus = [json.loads(line)["text"] for line in open(SHARED / "data" / "beir" / "cisi" / "corpus.jsonl")]
    passages = []
    for text in generator.sample(corpus, 2 * batch):  # [CLS] and [SEP] count in the 60-80
        ids = tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"]
        passages.append(tokenizer.decode(ids[: generator.randint(58, 78)]))
    return {"query": queries, "positive": passages[:batch], "negative": passages[batch:]}


def padding_pct(features: list[dict[str, torch.Tensor]]) -> list[float]:
    """Share of padded positions in each column's batch (queries, positives, negatives), in %."""
    return [round(100 * (1 - float(f["attention_mask"].float().mean())), 1) for f in features]


def use_reference_head(commit: str) -> None:
    """Make SpladeMax train with the lean head of splade_module.py at `commit` (this process only)."""
    import importlib.util

    import splade_module

    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:splade_module.py"], capture_output=True, text=True, check=True
    ).stdout
    with tempfile.TemporaryDirectory(prefix="splade-reference-") as folder:
        path = Path(folder) / "splade_module_reference.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("splade_module_reference", path)
        reference = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reference)
    splade_module.SpladeMaxHead = reference.SpladeMaxHead


def naive_forward(self, features, **kwargs):
    """SpladeMax.forward with the full logits and the formula as written (splade_max_naive)."""
    logits = self.model(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).logits
    features["sentence_embedding"] = splade_max_naive(logits, features["attention_mask"])
    return features


def build(variant: str, path: str, device: str):
    """Model and loss of one variant."""
    if variant == "st":
        from sentence_transformers import SparseEncoder
        from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

        model = SparseEncoder(path, device=device)
        model.max_seq_length = args.doc_length
        loss = SpladeLoss(
            model,
            SparseMultipleNegativesRankingLoss(model, scale=1.0),
            query_regularizer_weight=args.lambda_q,
            document_regularizer_weight=args.lambda_d,
        )
        return model, loss
    model = load_splade(path, max_seq_length=args.doc_length, lean_head=(variant != "autograd")).to(device)
    if variant == "padded":
        use_reference_head(args.reference_commit)
    if variant == "naive":
        model[0].forward = naive_forward.__get__(model[0])
    return model, MultipleNegativesRankingLossSplade(model, lambda_q=args.lambda_q, lambda_d=args.lambda_d)


def tokenise(model, texts: dict[str, list[str]], device: str) -> list[dict[str, torch.Tensor]]:
    features = [model.preprocess(texts[column]) for column in ("query", "positive", "negative")]
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()} for f in features]


def autocast(device: str):
    if device == "cuda" or args.bf16:
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model, loss, optimizer, features, device: str) -> torch.Tensor:
    with autocast(device):
        terms = loss([dict(f) for f in features], None)  # fresh dicts: the modules write into them
        total = sum(terms.values())
    total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total.detach()


# ---------------------------------------------------------------- memory probes


def rss_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _hwm_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _clear_refs_works() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class PeakRss:
    """Peak RSS over a block: the kernel's reset high-water mark, else a psutil sampler at ~1 ms."""

    exact = sys.platform == "linux" and _clear_refs_works()

    def __enter__(self):
        if self.exact:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        else:
            import psutil

            process, self.peak, self.done = psutil.Process(), 0, threading.Event()

            def sample():
                while not self.done.is_set():
                    self.peak = max(self.peak, process.memory_info().rss)
                    time.sleep(0.001)

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.exact:
            self.peak_mb = _hwm_mb()
        else:
            self.done.set()
            self.thread.join()
            self.peak_mb = max(self.peak / 2**20, rss_mb())


def release_freed_heap() -> None:
    """Give glibc's cached free chunks back, so that the baseline RSS is live memory only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# ---------------------------------------------------------------- contention (other processes on the same cores)


# ---------------------------------------------------------------- measurements


def count_flops_per_token(model) -> tuple[int, float]:
    """(parameters, training FLOPs per token): 6 x non-embedding params + 6 x V x H for the vocabulary projection."""
    mlm = model[0].model  # SpladeMax and sentence-transformers' Transformer both keep the masked-LM here
    decoder = mlm.get_output_embeddings()
    embeddings = {id(p) for p in mlm.get_input_embeddings().parameters()} | {id(decoder.weight)}
    params = {id(p): p for p in mlm.parameters()}
    dense = sum(p.numel() for i, p in params.items() if i not in embeddings)
    vocab, hidden = decoder.weight.shape
    return sum(p.numel() for p in params.values()), 6.0 * dense + 6.0 * vocab * hidden


def measure_steps(variant: str, path: str, device: str) -> dict:
    """Warm-up step, then `steps` measured steps: time and peak extra memory of each."""
    model, loss = build(variant, path, device)
    model.train()
    texts = read_texts(args.batch, args.doc_length, model.tokenizer)
    features = tokenise(model, texts, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    train_step(model, loss, optimizer, features, device)  # allocates AdamW state and warms the kernels

    times, cpu_times, extras = [], [], []
    counters = cpu_counters()
    for _ in range(args.steps):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            train_step(model, loss, optimizer, features, device)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            extras.append((torch.cuda.max_memory_allocated() - base) / 2**20)
        else:
            release_freed_heap()
            base = rss_mb()
            with PeakRss() as peak:
                start, cpu_start = time.perf_counter(), time.process_time()
                train_step(model, loss, optimizer, features, device)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
            extras.append(peak.peak_mb - base)
    others = others_cpu_pct(counters, cpu_counters())

    with torch.no_grad(), autocast(device):  # density of the (text, term) pairs the sparse backward visits
        embedding = model(dict(features[1]))["sentence_embedding"]
    tokens = sum(int(f["attention_mask"].numel()) for f in features)
    params, flops_per_token = count_flops_per_token(model)
    step_s = statistics.median(times)
    result = {
        "variant": variant,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch,
        "shape": [list(f["input_ids"].shape) for f in features],
        "padding_pct": padding_pct(features),
        "params": params,
        "step_ms": [round(t * 1000, 1) for t in times],
        "median_step_ms": round(step_s * 1000, 1),
        "median_cpu_ms": round(statistics.median(cpu_times) * 1000, 1) if cpu_times else None,
        "peak_extra_mb": [round(m, 1) for m in extras],
        "median_peak_extra_mb": round(statistics.median(extras), 1),
        "rss_before_mb": round(rss_mb(), 1),
        "tokens_per_s": round(tokens / step_s, 1),
        "active_terms_per_doc": round(float((embedding > 0).sum(1).float().mean()), 1),
        "others_cpu_pct": others,
        "peak_rss_method": "cuda.max_memory_allocated"
        if device == "cuda"
        else ("VmHWM after clear_refs" if PeakRss.exact else "psutil 1 ms sampler"),
    }
    if device == "cuda":
        result["mfu"] = round(flops_per_token * tokens / step_s / args.peak_flops, 4)
    return result


def find_max_batch(variant: str, path: str, device: str) -> dict:
    """GPU: the largest batch (queries = positives = negatives) whose step fits, doubling then bisecting."""
    model, loss = build(variant, path, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)

    def fits(batch: int) -> bool:
        try:
            features = tokenise(model, read_texts(batch, args.doc_length, model.tokenizer), device)
            train_step(model, loss, optimizer, features, device)
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            optimizer.zero_grad(set_to_none=True)
            features = None
            torch.cuda.empty_cache()

    good, bad = 0, None
    batch = 8
    while bad is None and batch <= args.max_batch_limit:
        if fits(batch):
            good, batch = batch, batch * 2
        else:
            bad = batch
    while bad is not None and bad - good > max(1, good // 16):  # bisect to ~6 %
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return {"variant": variant, "max_batch": good, "first_oom": bad, "limit": args.max_batch_limit}


# ---------------------------------------------------------------- driver


def run_child(variant: str, path: str) -> dict:
    command = [sys.executable, __file__, "--variant", variant, "--json", "--model", path]
    for flag in (
        "batch",
        "doc_length",
        "length_mix",
        "reference_commit",
        "steps",
        "threads",
        "lambda_q",
        "lambda_d",
        "device",
        "max_batch_limit",
        "peak_flops",
    ):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    command += ["--bf16"] * args.bf16 + ["--find-max-batch"] * args.find_max_batch
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"variant": variant, "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def undisturbed(result: dict) -> bool:
    """Other processes left the CPU alone, or (one thread) left this process a core: CPU time ~ wall time."""
    if "error" in result or result.get("device") == "cuda":
        return True
    if result["others_cpu_pct"] <= 5:
        return True
    return result["torch_threads"] == 1 and result["median_cpu_ms"] >= 0.95 * result["median_step_ms"]


def ratio(value, reference):
    return f"{value / reference:.2f}x" if reference else "-"


def print_table(results: list[dict]) -> None:
    """Time and memory of each variant, and their ratios to each reference variant of the same run."""
    by_name = {r["variant"]: r for r in results if "error" not in r}
    references = [name for name in ("padded", "naive", "st") if name in by_name]
    header = f"{'variant':<9} {'median step ms':>14} {'peak extra MB':>13}"
    header += "".join(f" {'time/' + name:>12} {'mem/' + name:>11}" for name in references)
    print(header + f" {'tokens/s':>9} {'active/doc':>10}" + ("  mfu" if "mfu" in by_name.get("st", {}) else ""))
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<9} FAILED: {r['error']}")
            continue
        t, m = r["median_step_ms"], r["median_peak_extra_mb"]
        line = f"{r['variant']:<9} {t:>14.1f} {m:>13.1f}"
        for name in references:
            reference = by_name[name]
            line += f" {ratio(t, reference['median_step_ms']):>12} {ratio(m, reference['median_peak_extra_mb']):>11}"
        line += f" {r['tokens_per_s']:>9.0f} {r['active_terms_per_doc']:>10.0f}"
        print(line + (f"  {r['mfu']:.3f}" if "mfu" in r else ""))
    if by_name:
        first = next(iter(by_name.values()))
        print(f"batch shapes (queries, positives, negatives): {first['shape']}, padding %: {first['padding_pct']}")


def main() -> None:
    torch.set_num_threads(args.threads)
    device = pick_device()
    if args.json:  # child: one variant
        if args.find_max_batch:
            result = find_max_batch(args.variant, args.model, device)
        else:
            result = measure_steps(args.variant, args.model, device)
        print(json.dumps(result))
        return

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    scratch = None
    path = args.model
    if args.model == "distilbert-random":
        scratch = tempfile.mkdtemp(prefix="splade-bench-")
        path = build_random_distilbert(scratch, args.decoder_bias)
    if args.find_max_batch and device != "cuda":
        sys.exit("--find-max-batch needs a GPU (it bisects until CUDA out of memory)")
    if args.find_max_batch:
        variants = ("lean", "st")
    else:
        variants = VARIANTS if args.variant == "all" else args.variant.split(",")
    try:
        results = []
        for variant in variants:
            for _attempt in range(1 + args.retries):
                if device == "cpu":
                    wait_for_idle(args.wait_idle, max(5.0, 95.0 - 100.0 * args.threads / (os.cpu_count() or 1)))
                result = run_child(variant, path)
                if undisturbed(result):
                    break
            results.append(result)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)

    config = {
        "model": args.model,
        "decoder_bias": args.decoder_bias,
        "batch": args.batch,
        "doc_length": args.doc_length,
        "length_mix": args.length_mix,
        "steps": args.steps,
        "threads": args.threads,
        "device": device,
        "bf16": device == "cuda" or args.bf16,
        "cpu": machine_name(pick_device()),
        "torch": torch.__version__,
    }
    print(json.dumps(config))
    if args.find_max_batch:
        for r in results:
            first_oom = f"(first OOM at {r.get('first_oom')})"
            print(f"{r['variant']:<6} max batch {r.get('max_batch')} {first_oom}  {r.get('error', '')}")
    else:
        print_table(results)
        busy = {r["variant"]: r["others_cpu_pct"] for r in results if "error" not in r and not undisturbed(r)}
        if busy:
            print(
                f"WARNING: other processes took this much of the CPU during the measured steps (%): {busy}; "
                "the timings of those variants are not trustworthy, rerun on an idle machine (or with --threads 1, "
                "which only needs one free core)"
            )
    if args.output:
        Path(args.output).write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
