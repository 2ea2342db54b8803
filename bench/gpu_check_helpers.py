"""What bench/gpu_check.py's sections share: the sizes and context every section receives, device helpers, the
sample texts at realistic or worst-case lengths, and the recipes' losses on either side (ours or
sentence-transformers'). Imported by bench/gpu_check.py, which puts the repository and bench/ on sys.path."""

from __future__ import annotations

import json
import math
import operator
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import ROOT, sample_texts

from losses import MarginMSELossSplade, MultipleNegativesRankingLossSplade


@dataclass
class Sizes:
    """How big each section runs: the GPU sizes, or toy sizes for --smoke on a CPU."""

    model: dict  # DistilBertConfig overrides
    decoder_bias: float  # a trained SPLADE's sparsity (tens to hundreds of active terms per text)
    check_batch: int
    check_length: int
    recipes: dict  # name -> (batch, max_seq_length)
    warmup_steps: int
    measured_steps: int
    search_seconds: float  # per largest-batch search; 0 = no search
    train: dict  # train_max.py: steps, save_steps, resume_steps, extra flags
    torchrun_flags: list  # train_max.py under torchrun (multiprocess): the sample's data, no --sample evaluation
    encode_docs: int
    encode_batch: int
    exact_docs: int
    section_seconds: dict


class Context:
    """What every section needs: sizes, device, the model folder, its deadline (wall clock, time.time()), whether
    a fault is injected (--inject-fault), and where its result goes (written as it grows: a section killed at its
    limit still leaves what it measured)."""

    def __init__(self, sizes: Sizes, device: str, model_dir: str, deadline: float, fault: bool, result_path=None):
        self.sizes, self.device, self.model_dir, self.deadline = sizes, device, model_dir, deadline
        self.fault, self.result_path = fault, result_path

    def seconds_left(self) -> float:
        return self.deadline - time.time()

    def save(self, result: dict) -> None:
        if self.result_path:
            Path(self.result_path).write_text(json.dumps(result, indent=2) + "\n")


OPERATORS = {"<=": operator.le, ">=": operator.ge, "==": operator.eq, ">": operator.gt}


def compare(name: str, value, op: str, threshold, applies: bool = True, why_not: str = "", **details) -> dict:
    """One thresholded comparison: passed is True or False where it applies, None (with the reason) where it
    means nothing on this device; the value is recorded either way. A missing or non-finite value fails."""
    if not applies:
        passed = None
    elif value is None or (isinstance(value, float) and not math.isfinite(value)):
        passed = False
    else:
        passed = bool(OPERATORS[op](value, threshold))
    check = {"name": name, "value": value, "op": op, "threshold": threshold, "passed": passed, **details}
    if not applies:
        check["not_applied"] = why_not
    return check


def describe(check: dict) -> str:
    """One line per check: verdict, name, measured value against its threshold."""
    verdict = {True: "PASS", False: "FAIL", None: "N/A "}[check["passed"]]
    value = check["value"]
    shown = f"{value:.3g}" if isinstance(value, float) else str(value)
    line = f"{verdict} {check['name']}: {shown} (threshold {check['op']} {check['threshold']})"
    return line + (f" -- not applied: {check['not_applied']}" if check["passed"] is None else "")


def autocast(device: str, precision: str):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


def timing_precision(device: str) -> str:
    """bf16 autocast on the GPU, as the recipe trains; fp32 on a CPU, whose bf16 is emulated slowly or absent."""
    return "bf16" if device == "cuda" else "fp32"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def to_device(features: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}


def realistic_passages(count: int) -> list[str]:
    """Sample passages cut to MS MARCO-like lengths (40-99 words, mean ~70 tokens)."""
    passages = sample_texts("collection.tsv")
    texts = []
    for i in range(count):
        words = (passages[i % len(passages)] + " " + passages[(i + 1) % len(passages)]).split()
        texts.append(" ".join(words[: 40 + (i * 37) % 60]))
    return texts


def long_texts(count: int, tokens: int) -> list[str]:
    """Distinct texts of more than `tokens` tokens (truncation then makes every text exactly max length)."""
    passages = sample_texts("collection.tsv")
    per_text = 2 + tokens // 30
    return [" ".join(passages[(i + k) % len(passages)] for k in range(per_text)) for i in range(count)]


def batch_texts(batch: int, max_length: int | None) -> dict[str, list[str]]:
    """query / positive / negative columns: realistic lengths (max_length None) or all at max_length."""
    if max_length is not None:
        texts = long_texts(3 * batch, max_length)
        return {"query": texts[:batch], "positive": texts[batch : 2 * batch], "negative": texts[2 * batch :]}
    queries = sample_texts("queries.train.tsv")
    passages = realistic_passages(2 * batch)
    return {
        "query": [queries[i % len(queries)] for i in range(batch)],
        "positive": passages[:batch],
        "negative": passages[batch:],
    }


def tokenised(model, texts: dict[str, list[str]], device: str) -> list[dict]:
    return [to_device(model.preprocess(texts[column]), device) for column in ("query", "positive", "negative")]


def recipe_loss(recipe: str, side: str, model, lambdas: tuple[float, float]):
    """train_max's or train_distill's loss: ours, or sentence-transformers' SpladeLoss around its own ("st")."""
    from sentence_transformers.sparse_encoder import losses as st_losses

    lambda_q, lambda_d = lambdas
    if side == "ours":
        ours = MultipleNegativesRankingLossSplade if recipe == "max" else MarginMSELossSplade
        return ours(model, lambda_q, lambda_d)
    if recipe == "max":
        base = st_losses.SparseMultipleNegativesRankingLoss(model, scale=1.0)
    else:
        base = st_losses.SparseMarginMSELoss(model)
    splade = st_losses.SpladeLoss(model, base, document_regularizer_weight=lambda_d, query_regularizer_weight=lambda_q)
    return splade.to(model.device)


def st_model(path: str, max_seq_length: int, device: str):
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(path, device=device)
    model.max_seq_length = max_seq_length
    return model


def run_command(command: list[str], seconds: float, env: dict | None = None) -> tuple[int | None, str, str]:
    """(exit status or None on timeout, stdout, stderr); on timeout the whole process group goes, so that
    torchrun's workers do not outlive it."""
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=max(1.0, seconds))
        return process.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        return None, stdout, stderr


def train_max(ctx: Context, flags: list[str], output_dir: str, model: str | None, processes: int = 0) -> dict:
    """Run train_max.py (on `model`, or --sample's own) directly with the sizes' training flags, or under torchrun
    with `processes` processes and its torchrun flags, within the section's time left: exit status, the losses
    its trainer logged, stdout."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes else []
    sized = ctx.sizes.torchrun_flags if processes else ctx.sizes.train["flags"]
    command = [sys.executable, *launcher, "train_max.py", *sized, "--output_dir", output_dir]
    command += ["--model_name", model] if model else []
    env = {"OMP_NUM_THREADS": "1"} if ctx.device == "cpu" else {}  # a shared CPU loses to idle threads' spinning
    returncode, stdout, stderr = run_command(command + flags, ctx.seconds_left() - 2, env)
    states = sorted(Path(output_dir).glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name[11:]))
    history = json.loads(states[-1].read_text())["log_history"] if states else []
    result = {
        "returncode": returncode,
        "last_step": history[-1].get("step") if history else None,
        "losses": [entry["loss"] for entry in history if "loss" in entry],
        "stdout": stdout,
    }
    if returncode is None:
        result["timed_out"] = True
    elif returncode != 0:
        result["error"] = (stderr or stdout)[-1500:]
    return result


def finite_losses_check(ctx: Context, what: str, run: dict) -> dict:
    """The run exited 0 and logged losses, every one finite (a NaN is appended under --inject-fault)."""
    losses = run.pop("losses") + ([float("nan")] if ctx.fault else [])
    ok = run["returncode"] == 0 and bool(losses) and all(math.isfinite(x) for x in losses)
    run.pop("stdout", None)
    return compare(f"{what}: exit 0, every logged loss finite", ok, "==", True, logged_losses=len(losses), **run)
