"""bench/gpu_check.py's correctness checks: SpladeMax and SpladeMaxHead against splade_max_naive (fp32 and bf16
autocast, values and gradients), our two losses against sentence-transformers' SpladeLoss. Each check is a
relative error against its tolerance (gpu_check_helpers.compare)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gpu_check_helpers import (
    Context,
    autocast,
    batch_texts,
    compare,
    long_texts,
    recipe_loss,
    st_model,
    to_device,
    tokenised,
)

from splade_head import SpladeMaxHead
from splade_module import load_splade, splade_max_naive

# Largest relative error allowed: values (max |a-b| / max |b|) and gradients (||a-b|| / ||b||).
TOLERANCE = {"fp32": {"value": 1e-4, "grad": 1e-4}, "bf16": {"value": 1e-2, "grad": 3e-2}}


def relative_error(ours: torch.Tensor, reference: torch.Tensor, kind: str) -> float:
    ours, reference = ours.detach().double(), reference.detach().double()
    if kind == "value":
        return float((ours - reference).abs().max() / reference.abs().max().clamp(min=1e-12))
    return float((ours - reference).norm() / reference.norm().clamp(min=1e-12))


def check(ctx: Context, name: str, ours, reference, precision: str = "fp32", kind: str = "value") -> dict:
    """One comparison: ours (shifted by 1 % of the reference's largest value under --inject-fault) against the
    reference, relative error within TOLERANCE."""
    if not torch.is_tensor(ours):
        ours, reference = torch.tensor(float(ours)), torch.tensor(float(reference))
    ours = ours.detach() + (0.01 if ctx.fault else 0.0) * reference.detach().abs().max()
    error = relative_error(ours, reference, kind)
    return compare(name, error, "<=", TOLERANCE[precision][kind], measure=f"relative error ({kind})")


def without_dropout(model):
    """Train mode (sentence-transformers' pooling works in place in eval mode) with every dropout at 0, so that
    two forward passes are comparable."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


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


def correctness(ctx: Context) -> dict:
    module = load_splade(ctx.model_dir, max_seq_length=ctx.sizes.check_length)[0].to(ctx.device).eval()
    count = ctx.sizes.check_batch
    texts = batch_texts(count, None)
    mixed = texts["query"][: count // 2] + texts["positive"][: count - count // 2] + long_texts(1, 1000)
    features = to_device(module.preprocess(mixed), ctx.device)
    result = {"checks": []}
    for precision in ("fp32", "bf16"):
        result["checks"] += head_checks(ctx, module, features, precision)
        result["checks"] += bare_head_checks(ctx, module, features["attention_mask"], precision)
        ctx.save(result)
    result["checks"] += loss_checks(ctx, texts)
    return result
