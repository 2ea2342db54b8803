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
sparsity; texts come from data/sample. Exit status: 0 all passed, 1 a correctness check failed, 2 a section
raised an error (and no check failed).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # fewer fragmentation OOMs in bisection

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import build_random_distilbert, machine_name, peak_bf16_flops, sample_texts  # noqa: E402

from losses import MarginMSELossSplade, MultipleNegativesRankingLossSplade  # noqa: E402
from splade_module import SpladeMaxHead, load_splade, splade_max_naive  # noqa: E402

SECTIONS = ("correctness", "recipe", "training", "encoding")
BUDGET = 470  # seconds: 8 minutes on one H100 with the model build and the imports
LAMBDAS = {"max": (0.0008, 0.0006), "distill": (0.01, 0.008)}


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
    encode_docs: int
    encode_batch: int
    exact_docs: int
    section_seconds: dict


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
# Largest relative error allowed: values (max |a-b| / max |b|) and gradients (||a-b|| / ||b||).
TOLERANCE = {"fp32": {"value": 1e-4, "grad": 1e-4}, "bf16": {"value": 1e-2, "grad": 3e-2}}


class Context:
    """What every section needs: sizes, device, the model folder, the clock, and the checks so far."""

    def __init__(self, sizes: Sizes, device: str, model_dir: str, deadline: float, fault: float):
        self.sizes, self.device, self.model_dir, self.deadline, self.fault = sizes, device, model_dir, deadline, fault

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


# ---------------------------------------------------------------- helpers


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


def relative_error(ours: torch.Tensor, reference: torch.Tensor, kind: str) -> float:
    ours, reference = ours.detach().double(), reference.detach().double()
    if kind == "value":
        return float((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-12))
    return float((ours - reference).norm() / reference.norm().clamp(min=1e-12))


def check(ctx: Context, name: str, ours, reference, precision: str = "fp32", kind: str = "value") -> dict:
    """One comparison: ours (shifted by --inject-fault) against the reference, within TOLERANCE."""
    if not torch.is_tensor(ours):
        ours, reference = torch.tensor(float(ours)), torch.tensor(float(reference))
    ours = ours.detach() + ctx.fault * reference.detach().abs().max()
    error = relative_error(ours, reference, kind)
    tolerance = TOLERANCE[precision][kind]
    return {"name": name, "error": error, "tolerance": tolerance, "passed": math.isfinite(error) and error <= tolerance}


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


def without_dropout(model):
    """Train mode (sentence-transformers' pooling works in place in eval mode) with every dropout at 0, so that
    two forward passes are comparable."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def st_model(path: str, max_seq_length: int, device: str):
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(path, device=device)
    model.max_seq_length = max_seq_length
    return model


# ---------------------------------------------------------------- 1. correctness


def head_checks(ctx: Context, module, features: dict, precision: str) -> list[dict]:
    """SpladeMax's inference path and training head (through the module) against the naive formula."""
    mask = features["attention_mask"]
    with torch.no_grad(), autocast(ctx.device, precision):
        inference = module(dict(features))["sentence_embedding"]
        naive = splade_max_naive(module.model(**features).logits.float(), mask)
    checks = [check(ctx, f"inference values {precision}", inference, naive, precision)]

    coefficients = torch.randn(naive.shape, generator=torch.Generator().manual_seed(1)).to(ctx.device)
    runs = {}
    for side in ("ours", "naive"):
        module.model.zero_grad(set_to_none=True)
        with autocast(ctx.device, precision):
            if side == "ours":
                embedding = module(dict(features))["sentence_embedding"]
            else:  # the same bf16 logits, the formula in fp32: only the head differs between the two sides
                embedding = splade_max_naive(module.model(**features).logits.float(), mask)
        (embedding.float() * coefficients).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
        runs[side] = (embedding.detach(), torch.cat([g.flatten() for _, g in sorted(grads.items())]))
    checks.append(check(ctx, f"module head values {precision}", runs["ours"][0], runs["naive"][0], precision))
    checks.append(
        check(ctx, f"module head gradients {precision}", runs["ours"][1], runs["naive"][1], precision, "grad")
    )
    module.model.zero_grad(set_to_none=True)
    return checks


def bare_head_checks(ctx: Context, module, mask: torch.Tensor, precision: str) -> list[dict]:
    """SpladeMaxHead alone on random hidden states: its sparse backward (model's bias) and dense fallback (+10)."""
    checks = []
    generator = torch.Generator().manual_seed(2)
    hidden_size = module.decoder.weight.shape[1]
    hidden0 = torch.randn(*mask.shape, hidden_size, generator=generator).to(ctx.device)
    for backward, shift in (("sparse", 0.0), ("dense", 10.0)):
        results = {}
        for side in ("ours", "naive"):
            hidden = hidden0.clone().requires_grad_()
            weight = module.decoder.weight.detach().clone().requires_grad_()
            bias = (module.decoder.bias.detach() + shift).requires_grad_()
            with autocast(ctx.device, precision):
                if side == "ours":
                    embedding = SpladeMaxHead.apply(hidden, mask, weight, bias)
                else:
                    embedding = splade_max_naive(F.linear(hidden, weight, bias).float(), mask)
            coefficients = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(3)).to(ctx.device)
            (embedding.float() * coefficients).sum().backward()
            results[side] = {
                "values": embedding.detach(),
                "hidden": hidden.grad,
                "weight": weight.grad,
                "bias": bias.grad,
            }
        for what, ours in results["ours"].items():
            kind = "value" if what == "values" else "grad"
            name = f"head {backward} {what if kind == 'value' else 'grad ' + what} {precision}"
            checks.append(check(ctx, name, ours, results["naive"][what], precision, kind))
    return checks


# Our loss terms and sentence-transformers' names for them. MarginMSE runs without FLOPS: ours sums FLOPS(pos) and
# FLOPS(neg) as the original recipe did, sentence-transformers takes FLOPS of their concatenation.
LOSS_TERMS = {
    "max": ((0.3, 0.2), {"ranking_loss": "base_loss", "flops_q_loss": "query_regularizer_loss",
                         "flops_d_loss": "document_regularizer_loss"}),
    "distill": ((0.0, 0.0), {"mse_loss": "base_loss"}),
}  # fmt: skip


def loss_checks(ctx: Context, texts: dict[str, list[str]]) -> list[dict]:
    """fp32: our two losses and modules against SparseEncoder + SpladeLoss, loss terms and every gradient."""
    length = ctx.sizes.check_length
    models = {
        "ours": without_dropout(load_splade(ctx.model_dir, max_seq_length=length).to(ctx.device)),
        "st": without_dropout(st_model(ctx.model_dir, length, ctx.device)),
    }
    labels = torch.randn(len(texts["query"]), generator=torch.Generator().manual_seed(4)).to(ctx.device) * 3
    checks = []
    for recipe, (lambdas, term_names) in LOSS_TERMS.items():
        terms, grads = {}, {}
        for side, model in models.items():
            model.zero_grad(set_to_none=True)
            loss = recipe_loss(recipe, side, model, lambdas)
            terms[side] = loss(tokenised(model, texts, ctx.device), labels if recipe == "distill" else None)
            sum(terms[side].values()).backward()
            named = dict(model[0].model.named_parameters())
            grads[side] = torch.cat([named[n].grad.flatten() for n in sorted(named) if named[n].grad is not None])
        for ours, theirs in term_names.items():
            checks.append(check(ctx, f"{recipe} loss {ours} vs ST", terms["ours"][ours], terms["st"][theirs]))
        checks.append(check(ctx, f"{recipe} loss gradients vs ST", grads["ours"], grads["st"], kind="grad"))
    return checks


def _gather_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    """One rank of the gather check: its share of a global batch through MNRL + FLOPS over all ranks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    groups = [torch.relu(torch.randn(8, 50, generator=torch.Generator().manual_seed(k))) for k in range(3)]
    mine = [g.chunk(world)[rank].clone().requires_grad_() for g in groups]
    terms = MultipleNegativesRankingLossSplade(_GivenEmbeddings(), 0.3, 0.2)([{"embedding": g} for g in mine])
    sum(terms.values()).backward()
    torch.save(
        {"terms": {k: v.item() for k, v in terms.items()}, "grads": [g.grad for g in mine]}, f"{out_dir}/{rank}.pt"
    )
    dist.destroy_process_group()


class _GivenEmbeddings(torch.nn.Module):
    def forward(self, features):
        return {"sentence_embedding": features["embedding"]}


def gather_checks(ctx: Context) -> list[dict]:
    """MNRL + FLOPS on 2 ranks (gloo, CPU; what torchrun does with 2 GPUs) equals one process on the whole batch,
    each rank's gradient being world x the single-process one (DDP then averages)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_gather_rank, args=(2, port, out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}/{r}.pt") for r in range(2)]
    groups = [
        torch.relu(torch.randn(8, 50, generator=torch.Generator().manual_seed(k))).requires_grad_() for k in range(3)
    ]
    terms = MultipleNegativesRankingLossSplade(_GivenEmbeddings(), 0.3, 0.2)([{"embedding": g} for g in groups])
    sum(terms.values()).backward()
    checks = [
        check(ctx, f"2-rank {name} (mean over ranks)", statistics.mean(r["terms"][name] for r in ranks), value.item())
        for name, value in terms.items()
    ]
    rank_grads = torch.cat([torch.cat([r["grads"][k] for r in ranks]) for k in range(3)]) / 2
    checks.append(check(ctx, "2-rank gradients", rank_grads, torch.cat([g.grad for g in groups]), kind="grad"))
    return checks


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


# ---------------------------------------------------------------- 2. the recipe's configurations


def train_step(loss, optimizer, features, labels, device: str) -> None:
    with autocast(device, timing_precision(device)):
        terms = loss([dict(f) for f in features], labels)  # fresh dicts: the modules write into them
        total = sum(terms.values())
    total.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fits(loss, optimizer, model, recipe: str, batch: int, length: int) -> bool:
    """Whether one training step at this batch (all texts at max length) fits in GPU memory."""
    out_of_memory = False
    try:
        features = tokenised(model, batch_texts(batch, length), "cuda")
        labels = torch.randn(batch, device="cuda") if recipe == "distill" else None
        train_step(loss, optimizer, features, labels, "cuda")
        sync("cuda")
    except torch.cuda.OutOfMemoryError:
        out_of_memory = True  # memory is released below, once the handler has dropped the traceback's frames
    features = labels = None
    optimizer.zero_grad(set_to_none=True)
    release_memory("cuda")
    return not out_of_memory


def largest_batch(loss, optimizer, model, recipe: str, start: int, length: int, seconds: float) -> dict:
    """Double from the recipe's batch (which fits) until out of memory, then bisect to ~6 %, within `seconds`."""
    deadline = time.monotonic() + seconds
    good, bad = start, None
    while bad is None and time.monotonic() < deadline:
        good, bad = (2 * good, None) if fits(loss, optimizer, model, recipe, 2 * good, length) else (good, 2 * good)
    while bad is not None and bad - good > max(1, good // 16) and time.monotonic() < deadline:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(loss, optimizer, model, recipe, middle, length) else (good, middle)
    return {"max_batch": good, "first_oom": bad, "search_complete": time.monotonic() < deadline}


def trainable(ctx: Context, recipe: str, side: str):
    """(model, loss, optimizer) of one implementation: ours, or SparseEncoder + SpladeLoss ("st")."""
    length = ctx.sizes.recipes[recipe][1]
    if side == "ours":
        model = load_splade(ctx.model_dir, max_seq_length=length).to(ctx.device)
    else:
        model = st_model(ctx.model_dir, length, ctx.device)
    loss = recipe_loss(recipe, side, model, LAMBDAS[recipe])
    return model.train(), loss, torch.optim.AdamW(model.parameters(), lr=2e-5)


def measure_recipe(ctx: Context, recipe: str, side: str, worst_case: bool) -> dict:
    """Median step, peak memory, tokens/s and MFU of one (recipe, implementation, text lengths)."""
    batch, length = ctx.sizes.recipes[recipe]
    model, loss, optimizer = trainable(ctx, recipe, side)
    features = tokenised(model, batch_texts(batch, length if worst_case else None), ctx.device)
    labels = torch.randn(batch, device=ctx.device) * 3 if recipe == "distill" else None
    for _ in range(ctx.sizes.warmup_steps):  # kernels, AdamW state, allocator
        train_step(loss, optimizer, features, labels, ctx.device)
    times = []
    if ctx.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(ctx.sizes.measured_steps):
        sync(ctx.device)
        start = time.perf_counter()
        train_step(loss, optimizer, features, labels, ctx.device)
        sync(ctx.device)
        times.append(time.perf_counter() - start)
    step = statistics.median(times)
    tokens = sum(int(f["attention_mask"].sum()) for f in features)  # real tokens, padding excluded
    params = sum(p.numel() for p in model[0].model.parameters())  # tied embeddings counted once
    peak = peak_bf16_flops(machine_name(ctx.device)) if ctx.device == "cuda" else None
    return {
        "recipe": recipe, "side": side, "lengths": "worst" if worst_case else "realistic", "batch": batch,
        "max_seq_length": length, "precision": timing_precision(ctx.device), "tokens": tokens,
        "mean_tokens_per_text": round(tokens / (3 * batch), 1), "median_step_ms": round(step * 1000, 2),
        "tokens_per_s": round(tokens / step),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if ctx.device == "cuda" else None,
        "mfu": round(6 * params * tokens / step / peak, 4) if peak else None,
    }  # fmt: skip


def recipe(ctx: Context) -> dict:
    """Every (recipe, lengths, side) measured first; then, on a GPU, the largest batches in the time left."""
    rows = []
    for name in ctx.sizes.recipes:
        for lengths in ("realistic", "worst"):
            for side in ("ours", "st"):
                what = {"recipe": name, "side": side, "lengths": lengths}
                if ctx.seconds_left() < 10:
                    rows.append({**what, "skipped": "time budget"})
                    continue
                try:
                    rows.append(measure_recipe(ctx, name, side, lengths == "worst"))
                except torch.cuda.OutOfMemoryError:
                    rows.append({**what, "oom": True})
                release_memory(ctx.device)
    searches = [r for r in rows if r.get("lengths") == "worst" and "median_step_ms" in r]
    for i, row in enumerate(searches if ctx.device == "cuda" and ctx.sizes.search_seconds else []):
        seconds = min(ctx.sizes.search_seconds, (ctx.seconds_left() - 5) / (len(searches) - i))
        model, loss, optimizer = trainable(ctx, row["recipe"], row["side"])
        row.update(largest_batch(loss, optimizer, model, row["recipe"], row["batch"], row["max_seq_length"], seconds))
        del model, loss, optimizer
        release_memory(ctx.device)
    return {"rows": rows}


def release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


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
