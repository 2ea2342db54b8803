"""bench/gpu_check.py's recipe section: train_max's and train_distill's configurations, ours against
SparseEncoder + SpladeLoss, at realistic and worst-case text lengths: median step, peak memory, tokens/s, MFU and,
on a GPU, the largest batch that fits."""

from __future__ import annotations

import gc
import statistics
import time

import torch
from common import machine_name, peak_bf16_flops
from gpu_check_helpers import (
    Context,
    autocast,
    batch_texts,
    compare,
    recipe_loss,
    st_model,
    sync,
    timing_precision,
    tokenised,
)

from splade_module import load_splade

LAMBDAS = {"max": (0.0008, 0.0006), "distill": (0.01, 0.008)}
STEP_RATIO = 0.6  # ours at most this fraction of sentence-transformers' median step time (bf16, GPU)
MEMORY_RATIO = 0.5  # ours at most this fraction of sentence-transformers' peak GPU memory


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
    """Every (recipe, lengths, side) measured first, with the thresholds checked at the recipe's configuration (all
    texts at max length); then, on a GPU, the largest batches in the time left."""
    result = {"rows": [], "checks": []}
    rows = result["rows"]
    for name in ctx.sizes.recipes:
        for lengths in ("realistic", "worst"):
            for side in ("ours", "st"):
                what = {"recipe": name, "side": side, "lengths": lengths}
                try:
                    rows.append(measure_recipe(ctx, name, side, lengths == "worst"))
                except torch.cuda.OutOfMemoryError:
                    rows.append({**what, "oom": True})
                release_memory(ctx.device)
                ctx.save(result)
        result["checks"] += recipe_checks(ctx, name, rows)
        ctx.save(result)
    searches = [r for r in rows if r.get("lengths") == "worst" and "median_step_ms" in r]
    for i, row in enumerate(searches if ctx.device == "cuda" and ctx.sizes.search_seconds else []):
        seconds = min(ctx.sizes.search_seconds, (ctx.seconds_left() - 10) / (len(searches) - i))
        model, loss, optimizer = trainable(ctx, row["recipe"], row["side"])
        row.update(largest_batch(loss, optimizer, model, row["recipe"], row["batch"], row["max_seq_length"], seconds))
        del model, loss, optimizer
        release_memory(ctx.device)
        ctx.save(result)
    return result


def recipe_checks(ctx: Context, name: str, rows: list[dict]) -> list[dict]:
    """At the recipe's batch with every text at max length: ours runs without running out of memory, and takes
    at most STEP_RATIO of sentence-transformers' step time and MEMORY_RATIO of its peak memory. Under
    --inject-fault ours counts as out of memory and 100x slower and larger. The ratios are measured on a CPU too,
    but mean nothing there (fp32, a toy model; no GPU memory to read)."""
    batch, length = ctx.sizes.recipes[name]
    found = {r["side"]: r for r in rows if r["recipe"] == name and r["lengths"] == "worst"}
    ours, theirs = found.get("ours", {}), found.get("st", {})
    gpu = ctx.device == "cuda"
    checks = [compare(f"{name} ours at batch {batch} x {length}: no out-of-memory",
                      "median_step_ms" in ours and not ctx.fault, "==", True)]  # fmt: skip
    thresholds = (("median_step_ms", STEP_RATIO, "step time"), ("peak_memory_gb", MEMORY_RATIO, "peak memory"))
    for key, limit, what in thresholds:
        ratio = None
        if ours.get(key) is not None and theirs.get(key):
            ratio = round(ours[key] * (100 if ctx.fault else 1) / theirs[key], 3)
        why = "fp32 on a CPU at toy sizes" if key == "median_step_ms" else "no GPU memory to read on a CPU"
        checks.append(compare(f"{name} {what} ours / sentence-transformers at {batch} x {length}", ratio, "<=",
                              limit, applies=gpu, why_not=why))  # fmt: skip
    return checks


def release_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
