"""What bench/gpu_check.py's sections share: the sizes and context every section receives, device helpers, the
sample texts at realistic or worst-case lengths, and the recipes' losses on either side (ours or
sentence-transformers'). Imported by bench/gpu_check.py, which puts the repository and bench/ on sys.path."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from common import sample_texts

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
    encode_docs: int
    encode_batch: int
    exact_docs: int
    section_seconds: dict


class Context:
    """What every section needs: sizes, device, the model folder, the clock, and the checks so far."""

    def __init__(self, sizes: Sizes, device: str, model_dir: str, deadline: float, fault: float):
        self.sizes, self.device, self.model_dir, self.deadline, self.fault = sizes, device, model_dir, deadline, fault

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


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
