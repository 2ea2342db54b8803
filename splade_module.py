"""SPLADE max pooling over a masked language model, as a sentence-transformers module.

A text becomes one weight per vocabulary entry:

    w[v] = max over unmasked tokens t of log(1 + relu(logits[t, v]))

Because log1p and relu are monotonic this equals log1p(relu(max_t logits[t, v])) with padded
tokens at -inf, which is how it is computed here: the masked-LM projection runs over chunks of
tokens and only a running max per (text, term) is kept. The B x L x V logits never exist at once,
and (training and inference alike) padded positions are not projected at all.

Training uses `SpladeMaxHead`, an autograd function whose backward exploits the gradient's
structure: after relu and the max, d loss / d logits is non-zero only at the arg-max token of each
(text, term) pair whose max is positive, i.e. at the few hundred active terms of a text. So the
backward finds the arg-max of those pairs only and gathers their decoder rows, and costs
O(active terms x tokens of the text x hidden) instead of O(tokens x vocabulary x hidden).

Saving writes the plain sentence-transformers SPLADE layout (Transformer fill-mask + SpladePooling
max), which loads with `SparseEncoder(path)`, `AutoModelForMaskedLM.from_pretrained(path)` and
`load_splade(path)`, none of them needing trust_remote_code.
"""

from __future__ import annotations

import itertools
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


# The bf16 screen (inference). bf16 keeps 8 significant bits: unit roundoff 2^-8 when rounding to nearest. For fp32
# accumulation, 2^-23 (twice fp32's unit roundoff) also covers accumulators that truncate, as GPU tensor cores do.
BF16_ROUNDOFF = 2.0**-8
FP32_ACCUMULATION_UNIT = 2.0**-23
# Added to every norm in the bound: covers flushed subnormals (below).
NORM_FLOOR = 2.0**-50
# Above this fraction of candidate pairs the exact recomputation would cost about as much as the plain path.
SCREEN_MAX_CANDIDATES = 0.5


def bf16_logit_slack(screened, token_norm, term_norm, bias, dim: int) -> torch.Tensor:
    """How far an fp32 logit h.w + b can lie from `screened + b`, where `screened` is the bf16 matmul's output.

    Derivation (u = 2^-8, gamma_n = n 2^-23 / (1 - n 2^-23), h~ = bf16(h), w~ = bf16(w), all for one token h and
    one decoder row w of length `dim`):
      1. rounding the inputs: |h~_k w~_k - h_k w_k| <= (2u + u^2)|h_k||w_k|, summed by Cauchy-Schwarz
         <= (2u + u^2) |h| |w|;
      2. the matmul accumulates the exact products h~_k w~_k (8 x 8 bits fit fp32) in fp32, in any order or
         blocking (oneDNN/AMX, the ATen fallback, cuBLAS without reduced-precision reduction):
         <= gamma_dim sum |h~_k w~_k| <= gamma_dim (1 + u)^2 |h| |w|;
      3. it rounds the result S to bf16: |P - S| <= u |S| <= u / (1 - u) |P|;
      4. the fp32 path's own error, so that every pair it makes positive stays a candidate:
         <= gamma_(dim+1) (|h| |w| + |b|).
    Subnormals that bf16 conversion, AVX512-BF16 or AMX flush to zero add at most 2^-126 per element and per
    addition; the 2^-50 added to both norms adds more than that (2^-57 (|h| + |w|) + 2^-107) for dim < 2^18.
    The arithmetic is in float64, and the 2^-10 margin covers its rounding.

    screened, token_norm, term_norm, bias: broadcastable tensors (bias may be None). Returns float64."""
    gamma = (dim + 1) * FP32_ACCUMULATION_UNIT / (1 - (dim + 1) * FP32_ACCUMULATION_UNIT)
    u = BF16_ROUNDOFF
    per_norms = 2 * u + u**2 + gamma * (1 + u) ** 2 + gamma
    norms = (token_norm.double() + NORM_FLOOR) * (term_norm.double() + NORM_FLOOR)
    slack = u / (1 - u) * screened.double().abs() + per_norms * norms
    if bias is not None:
        slack = slack + gamma * bias.double().abs()
    return slack * (1 + 2.0**-10)


def bf16_decoder(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the screen needs of the decoder: its bf16 copy and its rows' norms (float64), once per weight version."""
    return weight.to(torch.bfloat16), torch.linalg.vector_norm(weight, dim=1, dtype=torch.float64)


def bf16_screen(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    decoder: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The (text, term) pairs whose max logit can be positive, from a bf16 projection: a superset of the pairs that
    max_logits_unpadded makes positive (bf16_logit_slack bounds the difference). Texts x vocabulary, bool.

    Per text, max_t (P_t + u'|P_t| + c |h_t| |w|) <= f(max_t P_t) + c (max_t |h_t|) |w| with f(x) = x + u'|x|
    increasing, so only the bf16 max per (text, term) and the largest token norm per text are needed."""
    weight_bf16, term_norm = decoder or bf16_decoder(weight)
    tokens = hidden[attention_mask.bool()]
    owner = torch.arange(len(hidden), device=hidden.device).repeat_interleave(attention_mask.sum(dim=1))
    rows = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    best = torch.full((len(hidden), weight.shape[0]), float("-inf"), dtype=torch.bfloat16, device=hidden.device)
    with _full_precision_reduction(hidden.device):
        for start in range(0, len(tokens), rows):
            logits = F.linear(tokens[start : start + rows].to(torch.bfloat16), weight_bf16)
            best.index_reduce_(0, owner[start : start + rows], logits, "amax")
    token_norm = torch.zeros(len(hidden), dtype=torch.float64, device=hidden.device)
    token_norm.index_reduce_(0, owner, torch.linalg.vector_norm(tokens, dim=1, dtype=torch.float64), "amax")
    # The bias is the same for all of a text's tokens, so it is added after the max, in float64.
    slack = bf16_logit_slack(best, token_norm[:, None], term_norm, bias, weight.shape[1])
    upper = best.double() + slack
    if bias is not None:
        upper = upper + bias.double()
    return upper > 0  # a text without tokens: -inf + inf = nan here, not > 0, so no candidate (as relu(-inf) = 0)


def bf16_matmul_is_native(device: torch.device) -> bool:
    """Whether bf16 matmul runs on bf16 hardware here (AMX or AVX512-BF16 CPUs, Ampere+ GPUs). Without it, CPU bf16
    matmul is emulated and several times slower than fp32 (measured: 4.5x on an AVX2-only EPYC)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private but stable since torch 2.1
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    return False


@contextmanager
def _full_precision_reduction(device: torch.device):
    """cuBLAS may reduce split-K partial sums in bf16 by default; the bound assumes fp32 accumulation throughout."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    saved = flags.allow_bf16_reduced_precision_reduction
    flags.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        flags.allow_bf16_reduced_precision_reduction = saved


def max_logits_screened(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    decoder: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """max_logits_unpadded wherever it is positive, in fp32, and 0 where bf16_screen proves it is not.

    After log1p(relu(.)) the vectors equal the plain path's up to fp32 rounding, at the cost of a bf16 projection
    plus, per text, an fp32 product of its tokens with the decoder rows of its candidate terms only. Falls back to
    the plain path when the inputs are not finite (the bound assumes finite values) or most pairs are candidates.
    `decoder`: bf16_decoder(weight), when the caller keeps it between calls."""
    if not torch.isfinite(hidden).all():
        return max_logits_unpadded(hidden, attention_mask, weight, bias)
    candidate = bf16_screen(hidden, attention_mask, weight, bias, decoder)
    if candidate.float().mean() > SCREEN_MAX_CANDIDATES:
        return max_logits_unpadded(hidden, attention_mask, weight, bias)
    # Two host syncs in all (the token and pair counts); the loop then only slices.
    tokens, lengths = hidden[attention_mask.bool()], attention_mask.sum(dim=1).tolist()
    text, term = candidate.nonzero(as_tuple=True)
    pairs_per_text = torch.bincount(text, minlength=len(hidden)).tolist()
    maxima = [
        F.linear(own_tokens, weight[own_terms], None if bias is None else bias[own_terms]).amax(dim=0)
        for own_tokens, own_terms in zip(tokens.split(lengths), term.split(pairs_per_text))
        if len(own_terms) and len(own_tokens)
    ]
    best = torch.zeros(candidate.shape, dtype=hidden.dtype, device=hidden.device)
    if maxima:
        best[text, term] = torch.cat(maxima)
    return best


def pack_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The real tokens of all texts as the rows of one matrix, text after text, and each text's token count.

    The counts come to the host here, once (one GPU sync, which the boolean indexing needs anyway), so that
    the loops over texts below are planned without another."""
    return hidden[attention_mask.bool()], attention_mask.sum(dim=1).tolist()


def max_logits_packed(tokens: torch.Tensor, lengths: list[int], weight: torch.Tensor, bias) -> torch.Tensor:
    """Max over each text's packed rows of tokens @ weight.T + bias, projected a block of rows at a time.

    The max only: keeping its arg-max too (a masked fill and an indexed max over every logit) costs about ten
    times this amax reduction on CPU, so `argmax_rows` finds the arg-max in the backward, for active pairs only."""
    lengths_tensor = torch.tensor(lengths, device=tokens.device)
    owner = torch.arange(len(lengths), device=tokens.device).repeat_interleave(lengths_tensor)
    rows = max(1, LOGITS_PER_CHUNK // weight.shape[0])
    best = tokens.new_full((len(lengths), weight.shape[0]), float("-inf"))  # kept if there is no token at all
    for start in range(0, len(tokens), rows):
        logits = F.linear(tokens[start : start + rows], weight, bias)
        if start == 0:  # the dtype the projection computes in: bf16 under autocast
            best = best.to(logits.dtype)
        best.index_reduce_(0, owner[start : start + rows], logits, "amax")
    return best


def argmax_rows(tokens, token_starts: list[int], text, term, pair_starts: list[int], weight, bias) -> torch.Tensor:
    """For each active (text, term) pair, the packed row of the text's first token with the largest logit.

    One small product per text: its tokens against the decoder rows of its active terms, or against the whole
    decoder when most terms are active (gathering would copy the decoder). Logits are recomputed in the dtype
    the forward used, so that ties break as in the naive formula (first token); two products of different
    shapes may still differ in the last bit, and then a near-tied token gets the gradient, a valid one too."""
    rows = torch.empty_like(term)
    for index in range(len(token_starts) - 1):
        pairs = slice(pair_starts[index], pair_starts[index + 1])
        if pairs.start == pairs.stop:
            continue
        own_tokens = tokens[token_starts[index] : token_starts[index + 1]]
        own_terms = term[pairs]
        if len(own_terms) > DENSE_BACKWARD_DENSITY * weight.shape[0]:
            best = F.linear(own_tokens, weight, bias).argmax(dim=0)[own_terms]
        else:
            best = F.linear(own_tokens, weight[own_terms], None if bias is None else bias[own_terms]).argmax(dim=0)
        rows[pairs] = best + token_starts[index]
    return rows


class SpladeMaxHead(torch.autograd.Function):
    """log1p(relu(max_t (hidden @ weight.T + bias))) over the real tokens only (padding is never projected),
    with a backward through the active terms only."""

    @staticmethod
    def forward(ctx, hidden, attention_mask, weight, bias):
        tokens, lengths = pack_tokens(hidden, attention_mask)
        best = max_logits_packed(tokens, lengths, weight, bias)
        ctx.save_for_backward(tokens, attention_mask, weight, bias, best)
        ctx.token_starts = [0, *itertools.accumulate(lengths)]
        ctx.hidden_dtype = hidden.dtype
        return torch.log1p(torch.relu(best))

    @staticmethod
    def backward(ctx, grad_output):
        tokens, attention_mask, weight, bias, best = ctx.saved_tensors
        weight_dtype, bias_dtype = weight.dtype, None if bias is None else bias.dtype
        # The arg-max logits are recomputed in the dtype the forward projected in (bf16 under autocast); casting
        # here rather than saving cast copies keeps the decoder's copy out of memory between forward and backward.
        tokens, weight = tokens.to(best.dtype), weight.to(best.dtype)
        bias = None if bias is None else bias.to(best.dtype)
        # d w / d max = 1 / (1 + max) where the max is positive, 0 where relu cut it.
        best = best.float()
        grad_max = torch.where(best > 0, grad_output.float() / (1 + best.clamp(min=0)), 0.0)
        # nonzero must sync (its size sizes all that follows); the counts then wait on one tiny kernel only.
        # The density is known on the host from here on, so the dense-or-sparse choice costs no sync.
        text, term = grad_max.nonzero(as_tuple=True)
        pair_starts = [0, *itertools.accumulate(torch.bincount(text, minlength=len(best)).tolist())]
        row = argmax_rows(tokens, ctx.token_starts, text, term, pair_starts, weight, bias)
        coef = grad_max[text, term]
        if len(text) > DENSE_BACKWARD_DENSITY * grad_max.numel():
            grad_tokens, grad_weight = _dense_backward(coef, row, term, tokens, weight, ctx.token_starts, pair_starts)
        else:
            grad_tokens, grad_weight = _sparse_backward(coef, row, term, tokens, weight)
        grad_hidden = grad_tokens.new_zeros((*attention_mask.shape, tokens.shape[1]), dtype=ctx.hidden_dtype)
        grad_hidden[attention_mask.bool()] = grad_tokens.to(ctx.hidden_dtype)
        grad_bias = None if bias is None else grad_max.sum(0).to(bias_dtype)
        return grad_hidden, None, grad_weight.to(weight_dtype), grad_bias


def _sparse_backward(coef, row, term, tokens, weight):
    """Route each active pair's gradient to its arg-max row: O(active pairs x hidden)."""
    coef = coef.unsqueeze(1)
    grad_tokens = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for start in range(0, len(coef), ACTIVE_PER_CHUNK):
        part = slice(start, start + ACTIVE_PER_CHUNK)
        grad_tokens.index_add_(0, row[part], coef[part] * weight[term[part]].float())
        grad_weight.index_add_(0, term[part], coef[part] * tokens[row[part]].float())
    return grad_tokens, grad_weight


def _dense_backward(coef, row, term, tokens, weight, token_starts, pair_starts):
    """Scatter the gradient into blocks of dense logits and multiply: faster when most terms are active.

    A block holds whole texts (a text longer than the budget alone), so that its pairs are one slice of the
    pairs, which `nonzero` lists text by text."""
    vocab = weight.shape[0]
    grad_tokens = torch.empty(tokens.shape, dtype=torch.float32, device=tokens.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    weight32 = weight.float()
    for first, last in _text_blocks(token_starts, max(1, LOGITS_PER_CHUNK // vocab)):
        start, stop = token_starts[first], token_starts[last]
        pairs = slice(pair_starts[first], pair_starts[last])
        grad_logits = torch.zeros(stop - start, vocab, device=tokens.device)
        grad_logits[row[pairs] - start, term[pairs]] = coef[pairs]
        grad_tokens[start:stop] = grad_logits @ weight32
        grad_weight += grad_logits.T @ tokens[start:stop].float()
    return grad_tokens, grad_weight


def _text_blocks(token_starts: list[int], rows: int):
    """(first, end) text ranges, each of whole texts with at most `rows` tokens, or a single longer text."""
    first = 0
    for end in range(1, len(token_starts)):
        if end == len(token_starts) - 1 or token_starts[end + 1] - token_starts[first] > rows:
            yield first, end
            first = end


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
            in fp32 (`max_logits_screened`: the same vectors up to fp32 rounding). "auto": where bf16 matmul is
            native (`bf16_matmul_is_native`); True/False: always/never. A runtime choice: not saved.
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
        # where bf16 matmul is much faster than fp32.
        screen = self.screen_bf16
        if screen == "auto":
            screen = bf16_matmul_is_native(hidden.device)
        if not screen or hidden.dtype != torch.float32 or weight.dtype != torch.float32:
            return max_logits_unpadded(hidden, attention_mask, weight, bias)
        if torch.is_autocast_enabled(hidden.device.type):
            return max_logits_unpadded(hidden, attention_mask, weight, bias)
        key = (weight.data_ptr(), weight._version, weight.device)
        if self._screen_decoder is None or self._screen_decoder[0] != key:
            self._screen_decoder = key, bf16_decoder(weight)
        return max_logits_screened(hidden, attention_mask, weight, bias, self._screen_decoder[1])

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
