"""SPLADE max pooling over a masked language model, as a sentence-transformers module.

A text becomes one weight per vocabulary entry:

    w[v] = max over unmasked tokens t of log(1 + relu(logits[t, v]))

Because log1p and relu are monotonic this equals log1p(relu(max_t logits[t, v])) with padded
tokens at -inf, which is how it is computed here: the masked-LM projection runs over chunks of
tokens and only a running max (and, when training, its arg-max) per (text, term) is kept. The
B x L x V logits never exist at once; at inference, padded positions are not projected at all.

Training uses `SpladeMaxHead`, an autograd function whose backward exploits the gradient's
structure: after relu and the max, d loss / d logits is non-zero only at the arg-max token of each
(text, term) pair whose max is positive, i.e. at the few hundred active terms of a text. So the
backward gathers the decoder rows of those terms and costs O(active terms x hidden) instead of
O(tokens x vocabulary x hidden).

Saving writes the plain sentence-transformers SPLADE layout (Transformer fill-mask + SpladePooling
max), which loads with `SparseEncoder(path)`, `AutoModelForMaskedLM.from_pretrained(path)` and
`load_splade(path)`, none of them needing trust_remote_code.
"""

from __future__ import annotations

import json
import os
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from sentence_transformers import SparseEncoder
from sentence_transformers.base.modules import InputModule, Transformer
from sentence_transformers.sparse_encoder.modules import SpladePooling
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")

# Elements of one chunk of logits (texts x tokens x vocabulary): 2**25 floats = 128 MiB in fp32.
LOGITS_PER_CHUNK = 2**25
# Active (text, term) pairs whose decoder rows the sparse backward gathers at once.
ACTIVE_PER_CHUNK = 2**16
# Above this fraction of active (text, term) pairs the backward multiplies densely instead.
DENSE_BACKWARD_DENSITY = 0.5


def splade_max_naive(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The formula as written, with B x L x V activations. The reference that tests compare against."""
    activations = torch.log1p(torch.relu(logits)) * attention_mask.unsqueeze(-1).to(logits.dtype)
    return activations.max(dim=1).values


def max_logits(
    hidden: torch.Tensor, attention_mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over unmasked tokens of hidden @ weight.T + bias, and its arg-max, in chunks of tokens.

    Differentiable by plain autograd too, which then keeps one chunk's worth of indices per chunk.
    """
    batch, length, _ = hidden.shape
    step = max(1, LOGITS_PER_CHUNK // (batch * weight.shape[0]))
    padding = attention_mask == 0
    best = best_token = None
    for start in range(0, length, step):
        logits = F.linear(hidden[:, start : start + step], weight, bias)
        logits = logits.masked_fill(padding[:, start : start + step, None], float("-inf"))
        value, token = logits.max(dim=1)
        if best is None:
            best, best_token = value, token
        else:
            better = value > best
            best = torch.where(better, value, best)
            best_token = torch.where(better, token + start, best_token)
    return best, best_token


def max_logits_unpadded(
    hidden: torch.Tensor, attention_mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Inference: the same max, without projecting padding. The texts' real tokens are packed into the
    rows of one matrix, projected a block of rows at a time, and max-reduced into their text's row."""
    tokens = hidden[attention_mask.bool()]
    owner = torch.arange(len(hidden), device=hidden.device).repeat_interleave(attention_mask.sum(dim=1))
    rows = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    best = None
    for start in range(0, len(tokens), rows):
        logits = F.linear(tokens[start : start + rows], weight, bias)
        if best is None:
            best = logits.new_full((len(hidden), weight.shape[0]), float("-inf"))
        best.index_reduce_(0, owner[start : start + rows], logits, "amax")
    return best


class SpladeMaxHead(torch.autograd.Function):
    """log1p(relu(max_t (hidden @ weight.T + bias))) with a backward through the active terms only."""

    @staticmethod
    def forward(ctx, hidden, attention_mask, weight, bias):
        best, best_token = max_logits(hidden, attention_mask, weight, bias)
        ctx.save_for_backward(hidden, weight, best, best_token)
        ctx.has_bias = bias is not None
        return torch.log1p(torch.relu(best))

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, best, best_token = ctx.saved_tensors
        # d w / d max = 1 / (1 + max) where the max is positive, 0 where relu cut it.
        best = best.float()
        grad_max = torch.where(best > 0, grad_output.float() / (1 + best.clamp(min=0)), 0.0)
        density = (grad_max != 0).float().mean().item()
        backward = _dense_backward if density > DENSE_BACKWARD_DENSITY else _sparse_backward
        grad_hidden, grad_weight = backward(grad_max, best_token, hidden, weight)
        grad_bias = grad_max.sum(0).to(weight.dtype) if ctx.has_bias else None
        return grad_hidden.to(hidden.dtype), None, grad_weight.to(weight.dtype), grad_bias


def _sparse_backward(grad_max, best_token, hidden, weight):
    """Route each active (text, term) gradient to its arg-max token: O(active terms x hidden)."""
    batch, length, dim = hidden.shape
    text, term = grad_max.nonzero(as_tuple=True)
    coef = grad_max[text, term].unsqueeze(1)
    row = text * length + best_token[text, term]  # the arg-max token's row in the flattened hidden
    hidden_rows = hidden.reshape(batch * length, dim)
    grad_hidden = torch.zeros(batch * length, dim, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, len(coef), ACTIVE_PER_CHUNK):
        part = slice(start, start + ACTIVE_PER_CHUNK)
        grad_hidden.index_add_(0, row[part], coef[part] * weight[term[part]].float())
        grad_weight.index_add_(0, term[part], coef[part] * hidden_rows[row[part]].float())
    return grad_hidden.view(batch, length, dim), grad_weight


def _dense_backward(grad_max, best_token, hidden, weight):
    """Scatter the gradient into chunks of dense logits and multiply: faster when most terms are active."""
    batch, length, dim = hidden.shape
    vocab = weight.shape[0]
    texts_per_chunk = max(1, LOGITS_PER_CHUNK // (length * vocab))
    grad_hidden = torch.empty(batch, length, dim, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    weight32 = weight.float()
    for start in range(0, batch, texts_per_chunk):
        part = slice(start, start + texts_per_chunk)
        grad_logits = torch.zeros(grad_max[part].shape[0], length, vocab, device=hidden.device)
        grad_logits.scatter_(1, best_token[part].unsqueeze(1), grad_max[part].unsqueeze(1))
        grad_hidden[part] = grad_logits @ weight32
        grad_weight += grad_logits.flatten(0, 1).T @ hidden[part].flatten(0, 1).float()
    return grad_hidden, grad_weight


def _identity(x):
    return x


@contextmanager
def _projection_skipped(decoder: nn.Module):
    """Make the masked-LM return the hidden states that feed its vocabulary projection."""
    decoder.forward = _identity
    try:
        yield
    finally:
        del decoder.forward


class SpladeMax(InputModule):
    """Masked-LM + SPLADE max pooling: texts in, vocabulary-sized vectors out (`sentence_embedding`).

    Args:
        model_name_or_path: a local directory or hub id of a masked-LM checkpoint (or of a model saved here).
        max_seq_length: truncation length in tokens; default: the saved value, else the model's limit.
        lean_head: in training, use `SpladeMaxHead` (sparse backward); False = plain autograd through the
            chunked max, the same values and gradients at a higher cost.
        mlm, tokenizer: an already built masked-LM and tokenizer instead of a path (e.g. randomly initialised).
    """

    save_in_root = True

    def __init__(
        self,
        model_name_or_path: str | None = None,
        max_seq_length: int | None = None,
        lean_head: bool = True,
        *,
        mlm: nn.Module | None = None,
        tokenizer=None,
    ):
        super().__init__()
        if mlm is None:
            mlm, tokenizer, saved_length = _load_masked_lm(model_name_or_path)
            max_seq_length = max_seq_length or saved_length
        self.model = mlm
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length or _model_max_length(mlm, tokenizer)
        self.lean_head = lean_head
        if not isinstance(mlm.get_output_embeddings(), nn.Linear):
            raise ValueError(f"{model_name_or_path or type(mlm).__name__}: no linear vocabulary projection")

    @property
    def decoder(self) -> nn.Linear:
        """The vocabulary projection, looked up in the masked-LM so that the state dict keeps its keys."""
        return self.model.get_output_embeddings()

    def preprocess(self, inputs, prompt: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise TypeError(f"SpladeMax encodes strings; input {i} is a {type(text).__name__}: {text!r:.80}")
        texts = [(prompt or "") + text.strip() for text in inputs]
        return dict(
            self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_seq_length,
                return_tensors="pt",
                return_token_type_ids=False,
            )
        )

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        attention_mask = features["attention_mask"]
        with _projection_skipped(self.decoder):
            hidden = self.model(input_ids=features["input_ids"], attention_mask=attention_mask).logits
        weight, bias = self.decoder.weight, self.decoder.bias
        if not torch.is_grad_enabled():
            embedding = torch.log1p(torch.relu(max_logits_unpadded(hidden, attention_mask, weight, bias)))
        elif self.lean_head:
            embedding = SpladeMaxHead.apply(hidden, attention_mask, weight, bias)
        else:
            embedding = torch.log1p(torch.relu(max_logits(hidden, attention_mask, weight, bias)[0]))
        features["sentence_embedding"] = embedding
        return features

    def get_embedding_dimension(self) -> int:
        return self.decoder.weight.shape[0]

    def get_config_dict(self) -> dict:
        return {"max_seq_length": self.max_seq_length, "lean_head": self.lean_head}

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """Write the layout of sentence-transformers' own Transformer(fill-mask) module."""
        self.model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.tokenizer.save_pretrained(output_path)
        with open(os.path.join(output_path, Transformer.config_file_name), "w") as f:
            json.dump(
                {
                    "transformer_task": "fill-mask",
                    "modality_config": {"text": {"method": "forward", "method_output_name": "logits"}},
                    "module_output_name": "token_embeddings",
                    "max_seq_length": self.max_seq_length,
                },
                f,
                indent=2,
            )

    def __repr__(self) -> str:
        return f"SpladeMax({self.model.config.architectures or type(self.model).__name__}, {self.get_config_dict()})"


class SpladeEncoder(SparseEncoder):
    """A SparseEncoder around one SpladeMax module whose save() writes the native SPLADE layout."""

    def save(self, path: str, *args, **kwargs) -> None:
        super().save(path, *args, **kwargs)
        (splade,) = self._modules.values()
        pooling_dir = os.path.join(path, "1_SpladePooling")
        os.makedirs(pooling_dir, exist_ok=True)
        SpladePooling("max", "relu", splade.get_embedding_dimension()).save(pooling_dir)
        native = [
            {"idx": 0, "name": "0", "path": "", "type": _class_path(Transformer)},
            {"idx": 1, "name": "1", "path": "1_SpladePooling", "type": _class_path(SpladePooling)},
        ]
        with open(os.path.join(path, "modules.json"), "w") as f:
            json.dump(native, f, indent=2)


def load_splade(model_name_or_path: str, max_seq_length: int | None = None, lean_head: bool = True) -> SpladeEncoder:
    """Load a model saved by this project, or any SPLADE / masked-LM checkpoint, for training or encoding."""
    return SpladeEncoder(modules=[SpladeMax(model_name_or_path, max_seq_length, lean_head)])


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _load_masked_lm(name: str):
    """Masked-LM, tokenizer and saved max_seq_length, with errors a user can act on."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model_name_or_path must be a non-empty string, got {name!r}")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise OSError(
            f"Cannot load a model from {name!r}: it is not a directory with a config.json, and it could not be "
            f"fetched from the Hugging Face hub (offline, or no such model). Details: {error}"
        ) from None
    try:
        mlm, info = AutoModelForMaskedLM.from_pretrained(name, config=config, output_loading_info=True)
    except ValueError as error:
        raise ValueError(f"{name!r} ({config.model_type}) has no masked-LM architecture: {error}") from None
    missing_head = [key for key in info["missing_keys"] if not key.startswith(_backbone_prefixes(mlm))]
    if missing_head:
        raise ValueError(
            f"{name!r} has no masked-LM head: {', '.join(sorted(missing_head)[:4])} would be randomly "
            "initialised. SPLADE needs the MLM head's vocabulary logits; use a masked-LM checkpoint."
        )
    tokenizer = AutoTokenizer.from_pretrained(name)
    saved_length = None
    config_path = os.path.join(name, Transformer.config_file_name)
    if os.path.isfile(config_path):
        with open(config_path) as f:
            saved_length = json.load(f).get("max_seq_length")
    return mlm, tokenizer, saved_length


def _backbone_prefixes(mlm: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes of the encoder below the MLM head (missing ones are a different problem)."""
    base = getattr(mlm, "base_model_prefix", "")
    return (f"{base}.",) if base else ("\0",)


def _model_max_length(mlm: nn.Module, tokenizer) -> int:
    length = getattr(tokenizer, "model_max_length", None)
    positions = getattr(mlm.config, "max_position_embeddings", 512)
    return length if length and length <= positions else positions
