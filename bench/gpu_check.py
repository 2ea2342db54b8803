"""A GPU check anyone with a GPU can run in minutes, which exits 0 only when every section ran to the end and
every comparison in it passed.

    python bench/gpu_check.py --out gpu_check.json            # one GPU, no internet, under 8 minutes
    python bench/gpu_check.py --smoke --out /tmp/smoke.json   # the same code on a CPU at toy sizes

Sections, each in its own process killed at its time limit (the limits add up to at most --budget, which is checked
before anything runs; a section whose limit no longer fits is skipped):
  setup         the random DistilBERT-shaped model; the device, its compute capability, what "auto" precision picks.
  correctness   SpladeMax (inference path, the training head through the module, the bare head's sparse and dense
                backward) against splade_max_naive, fp32 and bf16 autocast, values and gradients; our two losses
                against sentence-transformers' SpladeLoss, terms and gradients.
  recipe        train_max (batch 64 x 3 texts x 300 tokens) and train_distill (64 x 3 x 256), bf16 autocast, ours
                against SparseEncoder + SpladeLoss: no out-of-memory at batch 64, step time <= 0.6x theirs, peak
                memory <= 0.5x theirs; tokens/s, MFU, largest batch.
  training      train_max.py --sample for 300 steps: dev MRR@10 up by >= 0.1; checkpoint, resume to 320; the final
                model reloaded with SparseEncoder gives finite, non-zero vectors.
  multiprocess  2 processes (NCCL on 2 GPUs; gloo on a CPU): both losses' gather and its backward against one
                process on the whole batch; train_max.py under torchrun. With 1 GPU: "not tested: 1 GPU".
  encoding      corpus encoding, ours against SparseEncoder.encode_document: docs/s, fp32 exactness.

Exit status: 0 every selected section ran to the end and every comparison that applies passed; 1 a comparison
failed; 2 a section was skipped, timed out or raised (and no comparison failed). Each comparison is printed with
its threshold; those that mean nothing on a CPU (--smoke: timings, the MRR rise of a 4-step run) are printed as
"N/A" with the reason and the measured value. Code: this file is the driver and the setup, training and encoding
sections; gpu_check_correctness.py, gpu_check_recipe.py and gpu_check_multiprocess.py hold the other sections,
gpu_check_helpers.py what they share.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # fewer fragmentation OOMs in bisection

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # common.py and the sections' modules, gpu_check_*.py
from gpu_check_helpers import (  # noqa: E402
    Context,
    Sizes,
    autocast,
    compare,
    describe,
    finite_losses_check,
    realistic_passages,
    run_command,
    st_model,
    sync,
    to_device,
    train_max,
)

SECTIONS = ("correctness", "recipe", "training", "multiprocess", "encoding")
BUDGET = 470  # seconds, all limits together: under 8 minutes on one H100/H200 with the driver's own start
SMOKE_BUDGET = 1500  # a shared 2-core CPU: every process start costs seconds of imports

GPU = Sizes(
    model={},
    decoder_bias=-2.15,
    check_batch=8,
    check_length=128,
    recipes={"max": (64, 300), "distill": (64, 256)},
    warmup_steps=2,
    measured_steps=5,
    search_seconds=20,
    # train_max.py --sample (its small BERT, batch 32 x 64 tokens, lr 2e-3), "auto" precision (bf16 on an H100)
    train={"steps": 300, "save": 150, "resume": 320, "flags": "--sample --precision auto".split()},
    torchrun_flags="--data_dir data/sample --precision auto --train_batch_size 32 --max_seq_length 64 "
    "--logging_steps 1 --eval_steps 0".split(),
    encode_docs=4096,
    encode_batch=128,
    exact_docs=256,
    section_seconds={"setup": 40, "correctness": 60, "recipe": 160, "training": 120, "multiprocess": 45,
                     "encoding": 45},
)  # fmt: skip
SMOKE = Sizes(
    model=dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
    decoder_bias=-0.2,
    check_batch=3,
    check_length=24,
    recipes={"max": (4, 32), "distill": (4, 24)},
    warmup_steps=1,
    measured_steps=2,
    search_seconds=0,
    train={
        "steps": 4,
        "save": 2,
        "resume": 6,
        "flags": "--sample --train_batch_size 4 --max_seq_length 32 --logging_steps 1 --eval_steps 0".split(),
    },
    torchrun_flags="--data_dir data/sample --precision auto --train_batch_size 4 --max_seq_length 32 "
    "--logging_steps 1 --eval_steps 0".split(),
    encode_docs=48,
    encode_batch=16,
    exact_docs=16,
    section_seconds={"setup": 120, "correctness": 300, "recipe": 200, "training": 300, "multiprocess": 300,
                     "encoding": 200},
)  # fmt: skip
MRR_GAIN = 0.1  # training: the sample run's dev MRR@10 must rise by at least this much


# ---------------------------------------------------------------- 0. setup: the model, the device, "auto" precision


def setup(ctx: Context) -> dict:
    from common import build_random_distilbert, machine_name, peak_bf16_flops
    from transformers import DistilBertConfig

    import encoding
    import training

    build_random_distilbert(ctx.model_dir, ctx.sizes.decoder_bias, DistilBertConfig(**ctx.sizes.model))
    device = torch.device(ctx.device)
    cuda = ctx.device == "cuda"
    auto_training = training.precision("auto")
    info = {
        "device": machine_name(ctx.device),
        "gpus": torch.cuda.device_count() if cuda else 0,
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
        "peak_bf16_flops": peak_bf16_flops(machine_name(ctx.device)) if cuda else None,
        "auto_precision_training": next((k for k, on in auto_training.items() if on), "fp32"),
        "auto_precision_encoding": encoding.resolve_precision("auto", device),
    }
    model_files = sorted(p.name for p in Path(ctx.model_dir).rglob("*") if p.is_file())
    return {**info, "checks": [compare("random model saved", len(model_files) > 0, "==", True)]}


# ---------------------------------------------------------------- 1. correctness: gpu_check_correctness.py
# ---------------------------------------------------------------- 2. the recipe's configurations: gpu_check_recipe.py
# ---------------------------------------------------------------- 3. training run with a checkpoint and a resume


def training(ctx: Context) -> dict:
    plan = ctx.sizes.train
    output_dir = tempfile.mkdtemp(prefix="gpu-check-train-")
    result = {"checks": []}
    try:
        start = time.monotonic()
        first = train_max(ctx, ["--max_steps", str(plan["steps"]), "--save_steps", str(plan["save"])], output_dir,
                          model=None)  # fmt: skip
        first["seconds"] = round(time.monotonic() - start, 1)
        before, after = dev_mrr(first["stdout"])
        result["checks"].append(finite_losses_check(ctx, f"train_max --sample {plan['steps']} steps", first))
        result["checks"].append(mrr_gain_check(ctx, before, after))
        ctx.save(result)
        resumed = train_max(ctx, ["--resume_from_checkpoint", "last", "--max_steps", str(plan["resume"])], output_dir,
                            model=None)  # fmt: skip
        result["checks"].append(finite_losses_check(ctx, f"resume to {plan['resume']}", resumed))
        last_step = resumed["last_step"] - (1 if ctx.fault and resumed["last_step"] else 0)
        result["checks"].append(compare("resumed run's last logged step", last_step, "==", plan["resume"]))
        result["checks"] += reload_checks(ctx, output_dir)
        result["checkpoints"] = sorted(p.name for p in Path(output_dir).glob("checkpoint-*"))
        return result
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)


def mrr_gain_check(ctx: Context, before: float | None, after: float | None) -> dict:
    """The sample run's dev MRR@10 rises by at least MRR_GAIN (1 less under --inject-fault); on a CPU the toy run
    is too short for that, and the rise is only recorded."""
    gain = None if before is None or after is None else round(after - before - (1.0 if ctx.fault else 0.0), 4)
    why = f"{ctx.sizes.train['steps']} steps of a toy run on a CPU; the rise is asserted on the 300-step GPU run"
    return compare("sample dev MRR@10 after - before", gain, ">=", MRR_GAIN, applies=ctx.device == "cuda",
                   why_not=why, before=before, after=after)  # fmt: skip


def dev_mrr(stdout: str) -> tuple[float | None, float | None]:
    """The "sample dev MRR@10: B before training, A after" line that train_max.py --sample prints."""
    found = re.findall(r"sample dev MRR@10: ([0-9.]+) before training, ([0-9.]+) after", stdout)
    return (float(found[-1][0]), float(found[-1][1])) if found else (None, None)


def reload_checks(ctx: Context, output_dir: str) -> list[dict]:
    """The run folder's final model loads with sentence-transformers' SparseEncoder; its query vectors are finite
    and not all zero (under --inject-fault: zeros and one NaN)."""
    from sentence_transformers import SparseEncoder

    if not (Path(output_dir) / "config.json").is_file():
        return [compare("final model loads with SparseEncoder", False, "==", True, error="no final model")]
    queries = ["what is the capital of france", "how long to boil an egg", "symptoms of the flu"]
    vectors = SparseEncoder(output_dir, device=ctx.device).encode_query(queries, convert_to_tensor=True)
    vectors = (vectors.to_dense() if vectors.is_sparse else vectors).float()
    if ctx.fault:
        vectors = torch.zeros_like(vectors)
        vectors[0, 0] = float("nan")
    active = (vectors > 0).sum(dim=1)
    return [
        compare("reloaded model: vectors finite", bool(torch.isfinite(vectors).all()), "==", True),
        compare("reloaded model: fewest active terms of 3 queries", int(active.min()), ">", 0,
                active_terms=active.tolist()),
    ]  # fmt: skip


# ---------------------------------------------------------------- 4. multiprocess: gpu_check_multiprocess.py
# ---------------------------------------------------------------- 5. corpus encoding


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
    from gpu_check_correctness import check

    import encoding as encoding_module
    from splade_module import load_splade

    sizes, device = ctx.sizes, ctx.device
    texts = realistic_passages(sizes.encode_docs)
    ours = load_splade(ctx.model_dir, max_seq_length=256)[0].to(device).eval()
    theirs = st_model(ctx.model_dir, 256, device).eval()
    precision = encoding_module.resolve_precision("auto", torch.device(device))  # what evaluate.py uses
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


# ---------------------------------------------------------------- driver: one process per section


def section_function(name: str):
    if name == "correctness":
        from gpu_check_correctness import correctness

        return correctness
    if name == "recipe":
        from gpu_check_recipe import recipe

        return recipe
    if name == "multiprocess":
        from gpu_check_multiprocess import multiprocess

        return multiprocess
    return {"setup": setup, "training": training, "encoding": encoding}[name]


def worker(args: argparse.Namespace) -> int:
    """One section in this process (started by run_section): its result JSON goes to --result as it grows."""
    import transformers

    transformers.logging.set_verbosity_error()
    if args.smoke:
        torch.set_num_threads(1)  # toy sizes gain nothing from threads, and a shared CPU loses to their spinning
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = SMOKE if args.smoke else GPU
    ctx = Context(sizes, device, args.model_dir, args.deadline, args.inject_fault, args.result)
    result = section_function(args.worker)(ctx)
    result["finished"] = True
    ctx.save(result)
    return 0


def status_of(result: dict) -> tuple[str, str]:
    """A finished section's status from its checks: failed (a comparison failed), passed, or error (no checks)."""
    checks = result.get("checks", [])
    failed = [c["name"] for c in checks if c["passed"] is False]
    if failed:
        return "failed", "failed: " + "; ".join(failed)
    if not checks:
        return "error", "the section made no comparison"
    return "passed", ""


def run_section(args: argparse.Namespace, name: str, limit: float, model_dir: str, scratch: str) -> dict:
    """Run one section in a fresh process under its time limit; a timeout kills its whole process group (torchrun
    and its workers with it). Status: passed, failed, error or timed out, with the reason."""
    result_path = Path(scratch) / f"{name}.json"
    deadline = time.time() + limit
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--model-dir", model_dir,
               "--result", str(result_path), "--deadline", str(deadline)]  # fmt: skip
    command += ["--smoke"] * args.smoke + ["--inject-fault"] * args.inject_fault
    start = time.monotonic()
    returncode, stdout, stderr = run_command(command, limit)
    seconds = round(time.monotonic() - start, 1)
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if returncode is None:
        status, reason = "timed out", f"killed at its limit of {limit:.0f} s"
    elif returncode != 0 or not result.get("finished"):
        status, reason = "error", f"exit status {returncode}: " + (stderr or stdout).strip()[-1500:]
    else:
        status, reason = status_of(result)
    result.update(status=status, seconds=seconds, limit_s=round(limit, 1))
    if reason:
        result["reason"] = reason
    print(f"[{name}] {status} in {seconds} s (limit {limit:.0f} s){': ' + reason[:300] if reason else ''}", flush=True)
    for check in result.get("checks", []):
        print(f"    {describe(check)}", flush=True)
    return result


def plan(sections: list[str], limits: dict, budget: float) -> tuple[list[str], dict]:
    """Which sections run: setup, then each selected one whose limit still fits in the budget together with the
    limits before it. Returns (sections to run, {skipped section: reason}); run together, their limits add up to
    at most the budget, so no section can be cut short by the budget itself."""
    run, skipped, committed = [], {}, 0.0
    for name in ["setup", *sections]:
        if skipped.get("setup"):
            skipped[name] = "setup did not run"
        elif committed + limits[name] <= budget:
            run.append(name)
            committed += limits[name]
        else:
            left = f"{budget - committed:.0f} s of {budget:.0f} s"
            skipped[name] = f"its limit ({limits[name]:.0f} s) does not fit in the budget left ({left})"
    return run, skipped


def multiprocess_untested(cuda: bool, gpus: int) -> str:
    """Why the multiprocess section cannot run here ("1 GPU"), or "" where it can: 2 GPUs, or a CPU (gloo)."""
    return f"{gpus} GPU" if cuda and gpus < 2 else ""


def markdown(report: dict) -> str:
    """The report as Markdown tables: sections with their status, recipe measurements, encoding."""
    lines = ["| section | status | seconds | notes |", "|---|---|---|---|"]
    for name, section in report["sections"].items():
        notes = section.get("reason", "")
        checks = section.get("checks", [])
        if checks and not notes:
            applied = [c for c in checks if c["passed"] is not None]
            notes = f"{sum(c['passed'] for c in applied)}/{len(applied)} comparisons passed"
            notes += f", {len(checks) - len(applied)} not applied here" if len(applied) < len(checks) else ""
        lines.append(f"| {name} | {section['status']} | {section.get('seconds', '')} | {notes[:300]} |")
    rows = report["sections"].get("recipe", {}).get("rows", [])
    if rows:
        header = "| recipe | side | lengths | batch x len | median step ms | peak GB | tokens/s | MFU | max batch |"
        lines += ["", header]
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
    lines += ["", f"**{report['verdict']}**"]
    return "\n".join(lines)


def exit_status(report: dict) -> int:
    """1 if a comparison failed; else 2 if a selected section did not pass (skipped, timed out, error); else 0."""
    statuses = [section["status"] for section in report["sections"].values()]
    if "failed" in statuses:
        return 1
    return 0 if statuses and all(status == "passed" for status in statuses) else 2


def verdict(report: dict, code: int) -> str:
    not_passed = [f"{name} {s['status']}" for name, s in report["sections"].items() if s["status"] != "passed"]
    line = {0: "PASSED", 1: "FAILED", 2: "INCOMPLETE"}[code] + (": " + ", ".join(not_passed) if not_passed else "")
    untested = report.get("not_tested", {})
    return line + "".join(f"; not tested: {name} ({why})" for name, why in untested.items())


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="where to write the JSON report")
    parser.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (or GPU)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, help="default: all (multiprocess: with >= 2 GPUs)")
    parser.add_argument("--budget", type=float, help=f"seconds for all sections (default {BUDGET}; --smoke "
                        f"{SMOKE_BUDGET}); sections whose limits do not fit are skipped: exit 2")  # fmt: skip
    parser.add_argument("--limit", nargs="+", default=[], metavar="SECTION=SECONDS", help="override section limits")
    parser.add_argument("--inject-fault", action="store_true",
                        help="testing: break our side of every comparison, each of which must then fail")  # fmt: skip
    parser.add_argument("--worker", choices=("setup", *SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    sizes = SMOKE if args.smoke else GPU
    default_budget = SMOKE_BUDGET if args.smoke else BUDGET
    assert sum(sizes.section_seconds.values()) <= default_budget, "the section limits exceed the default budget"
    budget = default_budget if args.budget is None else args.budget
    limits = dict(sizes.section_seconds)
    for item in args.limit:
        name, seconds = item.split("=")
        limits[name] = float(seconds)
    selected = list(args.sections or SECTIONS)
    to_run, skipped = plan(selected, limits, budget)
    committed = sum(limits[name] for name in to_run)
    assert committed <= budget, (committed, budget)  # the plan's promise: no limit is cut short by the budget
    print(f"gpu_check: budget {budget:.0f} s, section limits {limits}; running {to_run}", flush=True)
    report = {
        "config": {"smoke": args.smoke, "budget_s": budget, "limits_s": limits, "torch": torch.__version__,
                   "cuda": torch.version.cuda, "inject_fault": args.inject_fault},
        "sections": {},
        "not_tested": {},
    }  # fmt: skip
    scratch = tempfile.mkdtemp(prefix="gpu-check-")
    model_dir = str(Path(scratch) / "model")
    try:
        for name in ["setup", *selected]:
            gpus = report["sections"].get("setup", {}).get("gpus", 0)
            if name == "multiprocess" and name in to_run:
                untested = multiprocess_untested(torch.cuda.is_available(), gpus)
                if untested and args.sections is None:  # not asked for by name: listed as not tested
                    report["not_tested"][name] = untested
                    print(f"[{name}] not tested: {untested}", flush=True)
                    continue
                if untested:  # asked for by name, and it cannot run: the run is incomplete
                    skipped[name] = f"not tested: {untested} (it needs 2)"
            if name in skipped or name not in to_run:
                report["sections"][name] = {"status": "skipped", "reason": skipped.get(name, "setup failed")}
                print(f"[{name}] skipped: {report['sections'][name]['reason']}", flush=True)
            else:
                report["sections"][name] = run_section(args, name, limits[name], model_dir, scratch)
                if name == "setup" and report["sections"][name]["status"] != "passed":
                    skipped.update(dict.fromkeys(selected, "setup did not pass"))
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")  # what ran so far survives a kill
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    code = exit_status(report)
    report["verdict"] = verdict(report, code)
    report["exit_status"] = code
    print(markdown(report))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
