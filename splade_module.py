"""SPLADE max pooling over a masked language model, as a sentence-transformers module.

A text becomes one weight per vocabulary entry:

    w[v] = max over unmasked tokens t of log(1 + relu(logits[t, v]))

computed as log1p(relu(max_t logits[t, v])) (log1p and relu are monotonic), never holding the B x L x V logits.

  splade_module.py  this module: SpladeMax, SpladeEncoder, load_splade, saving and loading; splade_max_naive.
  splade_head.py    the max over real tokens only (training and inference skip padding); SpladeMaxHead to train.
  bf16_screen.py    exact fp32 inference from a bf16 screen, used where measured faster (screen_bf16).

Saving writes the plain sentence-transformers SPLADE layout (Transformer fill-mask + SpladePooling
max), which loads with `SparseEncoder(path)`, `AutoModelForMaskedLM.from_pretrained(path)` and
`load_splade(path)`, none of them needing trust_remote_code.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch
from sentence_transformers import SparseEncoder
from sentence_transformers.base.modules import InputModule, Transformer
from sentence_transformers.sparse_encoder.modules import SpladePooling
from torch import nn
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

from bf16_screen import bf16_decoder, bf16_matmul_is_native, faster_of, max_logits_screened
from splade_head import SpladeMaxHead, max_logits, max_logits_unpadded


def splade_max_naive(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The formula as written, with B x L x V activations. The reference that tests compare against."""
    activations = torch.log1p(torch.relu(logits)) * attention_mask.unsqueeze(-1).to(logits.dtype)
    return activations.max(dim=1).values


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
        screen_bf16: at inference in fp32, find the candidate terms with a bf16 projection and compute only those
            in fp32 (bf16_screen.py: the same vectors up to fp32 rounding). "auto": where bf16 matmul is
            native and the screen is measured faster than the plain path on the first batches (`faster_of`, once
            per process and shape); True/False: always/never. A runtime choice: not saved.
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
        screen_bf16: bool | str = "auto",
    ):
        super().__init__()
        if mlm is None:
            mlm, tokenizer, saved_length = _load_masked_lm(model_name_or_path)
            max_seq_length = max_seq_length or saved_length
        self.model = mlm
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length or _model_max_length(mlm, tokenizer)
        self.lean_head = lean_head
        self.screen_bf16 = screen_bf16
        self._screen_decoder = None  # (weight version key, bf16_decoder(weight)), rebuilt when the weight changes
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
            embedding = torch.log1p(torch.relu(self._inference_max_logits(hidden, attention_mask, weight, bias)))
        elif self.lean_head:
            embedding = SpladeMaxHead.apply(hidden, attention_mask, weight, bias)
        else:
            embedding = torch.log1p(torch.relu(max_logits(hidden, attention_mask, weight, bias)[0]))
        features["sentence_embedding"] = embedding
        return features

    def _inference_max_logits(self, hidden, attention_mask, weight, bias) -> torch.Tensor:
        # Under autocast the caller asked for bf16 values: the plain path gives them. Screening pays off only
        # where bf16 matmul is much faster than fp32: emulated bf16 never is; native bf16 is measured.
        screen = self.screen_bf16
        if screen == "auto":
            screen = bf16_matmul_is_native(hidden.device)
        plain = lambda: max_logits_unpadded(hidden, attention_mask, weight, bias)  # noqa: E731
        if not screen or hidden.dtype != torch.float32 or weight.dtype != torch.float32:
            return plain()
        if torch.is_autocast_enabled(hidden.device.type):
            return plain()
        key = (weight.data_ptr(), weight._version, weight.device)
        if self._screen_decoder is None or self._screen_decoder[0] != key:
            self._screen_decoder = key, bf16_decoder(weight)
        screened = lambda: max_logits_screened(hidden, attention_mask, weight, bias, self._screen_decoder[1])  # noqa: E731
        if self.screen_bf16 != "auto":
            return screened()
        return faster_of((str(hidden.device), *weight.shape), hidden.device, plain, screened)

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


def load_splade(
    model_name_or_path: str,
    max_seq_length: int | None = None,
    lean_head: bool = True,
    screen_bf16: bool | str = "auto",
) -> SpladeEncoder:
    """Load a model saved by this project, or any SPLADE / masked-LM checkpoint, for training or encoding.
    The arguments are SpladeMax's."""
    return SpladeEncoder(modules=[SpladeMax(model_name_or_path, max_seq_length, lean_head, screen_bf16=screen_bf16)])


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
