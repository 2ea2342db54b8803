"""A GPU check anyone with a GPU can run in minutes: correctness on CUDA, the recipe's configurations against
sentence-transformers, a short real training run with a resume, and corpus-encoding throughput.

    python bench/gpu_check.py --out gpu_check.json            # one GPU, no internet, about 6-8 minutes
    python bench/gpu_check.py --smoke --out /tmp/smoke.json   # the same code on a CPU at toy sizes, ~1 minute

Sections (each in its own try/except with a time limit; what fails is recorded and the next section runs):
  correctness     SpladeMax (inference path, SpladeMaxHead through the module, the bare head on its sparse and
                  dense backward) against splade_max_naive, fp32 and bf16 autocast, values and gradients; our
                  two losses against sentence-transformers' SpladeLoss; the losses' all_gather across 2 ranks
                  (gloo, CPU) against one process; 5 steps of train_max.py under torchrun.
  recipe          train_max (batch 64, 3 texts, 300 tokens) and train_distill (batch 64, 256 tokens), bf16 autocast,
                  ours against SparseEncoder + SpladeLoss: median step, peak memory, tokens/s, MFU, largest batch.
  training        train_max.py on data/sample for 300 steps, checkpoint, resume to 320, reload with SparseEncoder.
  encoding        corpus encoding, ours (eval, no_grad, bf16) against SparseEncoder.encode_document; fp32 exactness.

The model is a DistilBERT-shaped random masked-LM (bench/common.py) whose decoder bias leaves a trained SPLADE's
sparsity; texts come from data/sample. Code: this file runs the sections (correctness's torchrun step, training,
encoding) and writes the report; gpu_check_correctness.py holds the comparisons, gpu_check_recipe.py the recipe
timings, gpu_check_helpers.py what they share. Exit status: 0 all passed, 1 a correctness check failed, 2 a section
raised an error (and no check failed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # fewer fragmentation OOMs in bisection

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # common.py and the sections' modules, gpu_check_*.py
from common import build_random_distilbert, machine_name, peak_bf16_flops  # noqa: E402
from gpu_check_correctness import bare_head_checks, check, gather_checks, head_checks, loss_checks  # noqa: E402
from gpu_check_helpers import (  # noqa: E402
    Context,
    Sizes,
    autocast,
    batch_texts,
    long_texts,
    realistic_passages,
    st_model,
    sync,
    timing_precision,
    to_device,
)
from gpu_check_recipe import recipe  # noqa: E402

from splade_module import load_splade  # noqa: E402

SECTIONS = ("correctness", "recipe", "training", "encoding")
BUDGET = 470  # seconds: 8 minutes on one H100 with the model build and the imports


GPU = Sizes(
    model={},
    decoder_bias=-2.15,
    check_batch=8,
    check_length=128,
    recipes={"max": (64, 300), "distill": (64, 256)},
    warmup_steps=2,
    measured_steps=5,
    search_seconds=40,
    # --sample: the sample's settings (batch 32, 64 tokens) and its dev MRR@10 before and after training
    train={"steps": 300, "save": 150, "resume": 320, "flags": "--sample --precision bf16 --lr 1e-4".split()},
    encode_docs=4096,
    encode_batch=128,
    exact_docs=256,
    section_seconds={"correctness": 120, "recipe": 220, "training": 150, "encoding": 60},
)
SMOKE = Sizes(
    model=dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    decoder_bias=-0.2,
    check_batch=3,
    check_length=24,
    recipes={"max": (4, 32), "distill": (4, 24)},
    warmup_steps=1,
    measured_steps=2,
    search_seconds=0,
    train={  # the sample's data without --sample's dev evaluation (minutes of CPU on a busy machine)
        "steps": 4,
        "save": 2,
        "resume": 6,
        "flags": "--data_dir data/sample --precision fp32 --train_batch_size 4 --max_seq_length 32 "
        "--logging_steps 1".split(),
    },
    encode_docs=48,
    encode_batch=16,
    exact_docs=16,
    section_seconds={"correctness": 120, "recipe": 60, "training": 150, "encoding": 40},
)


# ---------------------------------------------------------------- 1. correctness (the checks: gpu_check_correctness.py)


def correctness(ctx: Context) -> dict:
    module = load_splade(ctx.model_dir, max_seq_length=ctx.sizes.check_length)[0].to(ctx.device).eval()
    count = ctx.sizes.check_batch
    texts = batch_texts(count, None)
    mixed = texts["query"][: count // 2] + texts["positive"][: count - count // 2] + long_texts(1, 1000)
    features = to_device(module.preprocess(mixed), ctx.device)
    checks = []
    for precision in ("fp32", "bf16"):
        checks += head_checks(ctx, module, features, precision)
        checks += bare_head_checks(ctx, module, features["attention_mask"], precision)
    checks += loss_checks(ctx, texts)
    checks += gather_checks(ctx)
    with tempfile.TemporaryDirectory(prefix="gpu-check-torchrun-") as output_dir:
        run = train_max(ctx, ["--max_steps", "5", "--save_steps", "5"], output_dir, torchrun=True)
    checks.append({"name": "torchrun train_max 5 steps, finite losses", "passed": run.pop("ok"), **run})
    return {"checks": checks}


# ---------------------------------------------------------------- 2. the recipe's configurations: gpu_check_recipe.py


# ---------------------------------------------------------------- 3. training run with a checkpoint and a resume


def run_command(command: list[str], seconds: float) -> tuple[int | None, str, str]:
    """(exit status or None on timeout, stdout, stderr); on timeout the whole process group goes, so that
    torchrun's workers do not outlive it."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, seconds))
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return None, stdout, stderr


def train_max(ctx: Context, flags: list[str], output_dir: str, torchrun: bool = False) -> dict:
    """Run train_max.py --sample on the random model; its exit status and the losses its trainer logged."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun else []
    command = [sys.executable, *launcher, "train_max.py", "--model_name", ctx.model_dir]
    returncode, stdout, stderr = run_command(
        command + ["--output_dir", output_dir, *ctx.sizes.train["flags"], *flags], ctx.seconds_left()
    )
    states = sorted(Path(output_dir).glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
    history = json.loads(states[-1].read_text())["log_history"] if states else []
    losses = [entry["loss"] for entry in history if "loss" in entry]
    result = {
        "ok": returncode == 0 and bool(losses) and all(math.isfinite(x) for x in losses),
        "returncode": returncode,
        "last_step": history[-1].get("step") if history else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "logged_losses": len(losses),
    }
    if returncode is None:
        result["timed_out"] = True
    elif returncode != 0:
        result["error"] = (stderr or stdout)[-1500:]
    mrr = [line for line in stdout.splitlines() if line.startswith("sample dev MRR@10")]
    if mrr:
        result["sample_dev_mrr"] = mrr[-1]
    return result


def training(ctx: Context) -> dict:
    plan = ctx.sizes.train
    output_dir = tempfile.mkdtemp(prefix="gpu-check-train-")
    try:
        start = time.monotonic()
        first = train_max(ctx, ["--max_steps", str(plan["steps"]), "--save_steps", str(plan["save"])], output_dir)
        first["seconds"] = round(time.monotonic() - start, 1)
        resumed = train_max(ctx, ["--resume_from_checkpoint", "last", "--max_steps", str(plan["resume"])], output_dir)
        checks = [
            {"name": f"train_max {plan['steps']} steps, finite losses", "passed": first.pop("ok"), **first},
            {
                "name": f"resume to {plan['resume']}, finite losses",
                "passed": resumed.pop("ok") and resumed["last_step"] == plan["resume"],
                **resumed,
            },
            reload_check(output_dir, ctx.device),
        ]
        return {"checks": checks, "checkpoints": sorted(p.name for p in Path(output_dir).glob("checkpoint-*"))}
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


def reload_check(output_dir: str, device: str) -> dict:
    """The run folder's final model loads with sentence-transformers' SparseEncoder and encodes a query."""
    from sentence_transformers import SparseEncoder

    name = "final model loads with SparseEncoder"
    if not (Path(output_dir) / "config.json").is_file():
        return {"name": name, "passed": False, "error": "no final model: the training run did not finish"}
    vector = SparseEncoder(output_dir, device=device).encode_query(
        ["what is the capital of france"], convert_to_tensor=True
    )
    vector = vector.to_dense() if vector.is_sparse else vector
    return {"name": name, "passed": bool(torch.isfinite(vector).all()), "active_terms": int((vector > 0).sum())}


# ---------------------------------------------------------------- 4. corpus encoding


def encode_ours(module, texts: list[str], batch_size: int, device: str, precision: str) -> torch.Tensor:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch, as ST does
    vectors = [None] * len(texts)
    with torch.no_grad(), autocast(device, precision):
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            features = to_device(module.preprocess([texts[i] for i in chunk]), device)
            for i, vector in zip(chunk, module(features)["sentence_embedding"].float()):
                vectors[i] = vector
    return torch.stack(vectors)


def timed(device: str, function):
    sync(device)
    start = time.perf_counter()
    result = function()
    sync(device)
    return result, time.perf_counter() - start


def encoding(ctx: Context) -> dict:
    sizes, device = ctx.sizes, ctx.device
    texts = realistic_passages(sizes.encode_docs)
    ours = load_splade(ctx.model_dir, max_seq_length=256)[0].to(device).eval()
    theirs = st_model(ctx.model_dir, 256, device).eval()
    precision = timing_precision(device)
    encode_theirs = lambda docs: theirs.encode_document(
        docs, batch_size=sizes.encode_batch, convert_to_tensor=True, convert_to_sparse_tensor=False
    )  # noqa: E731
    encode_ours(ours, texts[: sizes.encode_batch], sizes.encode_batch, device, precision)  # warm-up
    with autocast(device, precision):
        encode_theirs(texts[: sizes.encode_batch])
    _, ours_s = timed(device, lambda: encode_ours(ours, texts, sizes.encode_batch, device, precision))
    with autocast(device, precision):
        _, theirs_s = timed(device, lambda: encode_theirs(texts))
    subset = texts[: sizes.exact_docs]
    exact = check(
        ctx,
        "fp32 vectors vs SparseEncoder.encode_document",
        encode_ours(ours, subset, sizes.encode_batch, device, "fp32"),
        encode_theirs(subset).float(),
    )
    return {
        "docs": len(texts), "precision": precision, "batch_size": sizes.encode_batch,
        "ours_docs_per_s": round(len(texts) / ours_s, 1), "st_docs_per_s": round(len(texts) / theirs_s, 1),
        "speedup": round(theirs_s / ours_s, 2), "checks": [exact],
    }  # fmt: skip


# ---------------------------------------------------------------- driver


def run_section(ctx: Context, name: str, function, global_deadline: float, scale: float) -> dict:
    limit = ctx.sizes.section_seconds[name] * scale
    ctx.deadline = min(global_deadline, time.monotonic() + limit)
    if ctx.seconds_left() < 5:
        return {"status": "skipped", "reason": "time budget"}
    start = time.monotonic()
    try:
        result = function(ctx)
        failed = [c["name"] for c in result.get("checks", []) if not c["passed"]]
        wrong = [c for c in result.get("checks", []) if not c["passed"] and not c.get("timed_out")]
        result["status"] = "failed" if wrong else "error" if failed else "passed"
        if failed:
            result["failed"] = failed
    except Exception as error:  # noqa: BLE001  (one section's crash must not stop the others)
        result = {
            "status": "error",
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc()[-3000:],
        }
    result["seconds"] = round(time.monotonic() - start, 1)
    print(f"[{name}] {result['status']} in {result['seconds']} s", flush=True)
    return result


def markdown(report: dict) -> str:
    """The report as Markdown tables: sections, failed checks, recipe measurements, encoding."""
    lines = ["| section | status | seconds | notes |", "|---|---|---|---|"]
    for name, section in report["sections"].items():
        notes = section.get("error", "") or ", ".join(section.get("failed", []))
        checks = section.get("checks", [])
        if checks and not notes:
            notes = f"{sum(c['passed'] for c in checks)}/{len(checks)} checks passed"
        lines.append(f"| {name} | {section['status']} | {section.get('seconds', '')} | {notes[:200]} |")
    rows = report["sections"].get("recipe", {}).get("rows", [])
    if rows:
        lines += [
            "",
            "| recipe | side | lengths | batch x len | median step ms | peak GB | tokens/s | MFU | max batch |",
        ]
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            shape = f"{r['batch']} x {r['max_seq_length']}" if "batch" in r else ""
            measured = [r.get(k) for k in ("median_step_ms", "peak_memory_gb", "tokens_per_s", "mfu", "max_batch")]
            if "median_step_ms" not in r:  # out of memory at the recipe's batch, or no time left
                measured = ["OOM" if r.get("oom") else r.get("skipped", "")] + [None] * 4
            cells = [r["recipe"], r["side"], r["lengths"], shape, *measured]
            lines.append("| " + " | ".join("" if c is None else str(c) for c in cells) + " |")
    encoding = report["sections"].get("encoding", {})
    if "ours_docs_per_s" in encoding:
        ours, theirs = encoding["ours_docs_per_s"], encoding["st_docs_per_s"]
        what = f"encoding {encoding['docs']} documents ({encoding['precision']})"
        lines += ["", f"{what}: ours {ours} docs/s, SparseEncoder {theirs} docs/s ({encoding['speedup']}x)"]
    return "\n".join(lines)


def exit_status(report: dict) -> int:
    statuses = [section["status"] for section in report["sections"].values()]
    return 1 if "failed" in statuses else 2 if "error" in statuses else 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="where to write the JSON report")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (or GPU), in about a minute")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--budget", type=float, default=BUDGET, help="seconds for all sections (each section's limit scales with it)"
    )
    parser.add_argument(
        "--inject-fault", action="store_true", help="testing: shift our side of every comparison, which must then fail"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = SMOKE if args.smoke else GPU
    if args.smoke:
        torch.set_num_threads(1)  # toy sizes gain nothing from threads, and a shared CPU loses to their spinning
    global_deadline = time.monotonic() + args.budget
    scratch = tempfile.mkdtemp(prefix="gpu-check-model-")
    from transformers import DistilBertConfig

    name = machine_name(device)
    report = {
        "config": {
            "device": name,
            "smoke": args.smoke,
            "budget_s": args.budget,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "peak_bf16_flops": peak_bf16_flops(name) if device == "cuda" else None,
            "model": {"distilbert_overrides": sizes.model, "decoder_bias": sizes.decoder_bias},
        },
        "sections": {},
    }
    try:
        try:
            build_random_distilbert(scratch, sizes.decoder_bias, DistilBertConfig(**sizes.model))
        except Exception as error:  # noqa: BLE001  (no model, no sections: still a report that says why)
            report["sections"]["setup"] = {"status": "error", "error": f"{type(error).__name__}: {error}"}
            args.sections = []
        ctx = Context(sizes, device, scratch, global_deadline, fault=0.01 if args.inject_fault else 0.0)
        functions = {"correctness": correctness, "recipe": recipe, "training": training, "encoding": encoding}
        for name in args.sections:
            report["sections"][name] = run_section(ctx, name, functions[name], global_deadline, args.budget / BUDGET)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # what ran so far survives a kill
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(markdown(report))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
