"""The SPLADE max over each text's real tokens, and the training head built on it.

max_t logits[t, v] is computed without ever holding the B x L x V logits: the texts' real tokens are packed into
the rows of one matrix (`pack_tokens`, so padding is never projected), projected a block of rows at a time, and
max-reduced into their text's row (`max_logits_packed`). Inference takes that max as is (`max_logits_unpadded`) or
screens it in bf16 first (bf16_screen.py).

Training uses `SpladeMaxHead`, an autograd function whose backward exploits the gradient's structure: after relu
and the max, d loss / d logits is non-zero only at the arg-max token of each (text, term) pair whose max is
positive, i.e. at the few hundred active terms of a text. So the backward finds the arg-max of those pairs only and
gathers their decoder rows, and costs O(active terms x tokens of the text x hidden) instead of
O(tokens x vocabulary x hidden).

`max_logits`, a chunked max over the padded batch, serves `lean_head=False`: plain autograd through it gives the
same values and gradients at a higher cost.
"""

from __future__ import annotations

import itertools
import warnings

import torch
import torch.nn.functional as F

# index_reduce_ (rows max-reduced into their text's row) warns that its API is in beta, once per process: noise.
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")

# Elements of one chunk of logits (texts x tokens x vocabulary): 2**25 floats = 128 MiB in fp32.
LOGITS_PER_CHUNK = 2**25
# Active (text, term) pairs whose decoder rows the sparse backward gathers at once.
ACTIVE_PER_CHUNK = 2**16
# Above this fraction of active (text, term) pairs the backward multiplies densely instead.
DENSE_BACKWARD_DENSITY = 0.5


def rows_per_block(vocab: int) -> int:
    """Packed token rows projected at once, so that one block of logits holds about LOGITS_PER_CHUNK elements.

    Read at call time, so that tests can shrink LOGITS_PER_CHUNK here for every user of the packed layout."""
    return max(1, LOGITS_PER_CHUNK // vocab)


def pack_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The real tokens of all texts as the rows of one matrix, text after text, and each text's token count.

    The counts come to the host here, once (one GPU sync, which the boolean indexing needs anyway), so that
    the loops over texts below are planned without another."""
    return hidden[attention_mask.bool()], attention_mask.sum(dim=1).tolist()


def packed_owners(lengths: list[int], device: torch.device) -> torch.Tensor:
    """For each packed row, the index of the text it belongs to: where index_reduce_ sends the row's values."""
    return torch.arange(len(lengths), device=device).repeat_interleave(torch.tensor(lengths, device=device))


def max_logits_packed(tokens: torch.Tensor, lengths: list[int], weight: torch.Tensor, bias) -> torch.Tensor:
    """Max over each text's packed rows of tokens @ weight.T + bias, projected a block of rows at a time.

    The max only: keeping its arg-max too (a masked fill and an indexed max over every logit) costs about ten
    times this amax reduction on CPU, so `argmax_rows` finds the arg-max in the backward, for active pairs only."""
    owner = packed_owners(lengths, tokens.device)
    rows = rows_per_block(weight.shape[0])
    best = tokens.new_full((len(lengths), weight.shape[0]), float("-inf"))  # kept if there is no token at all
    for start in range(0, len(tokens), rows):
        logits = F.linear(tokens[start : start + rows], weight, bias)
        if start == 0:  # the dtype the projection computes in: bf16 under autocast
            best = best.to(logits.dtype)
        best.index_reduce_(0, owner[start : start + rows], logits, "amax")
    return best


def max_logits_unpadded(
    hidden: torch.Tensor, attention_mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Inference: the max over each text's real tokens of hidden @ weight.T + bias; padding is not projected."""
    return max_logits_packed(*pack_tokens(hidden, attention_mask), weight, bias)


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
        return torch.log1p(torch.relu(best.float()))  # fp32 embeddings (and gradients) on any device, as on CUDA

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
    for first, last in _text_blocks(token_starts, rows_per_block(vocab)):
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


def max_logits(
    hidden: torch.Tensor, attention_mask: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over unmasked tokens of hidden @ weight.T + bias, and its arg-max, in chunks of tokens of the padded
    batch (padding is projected, then set to -inf).

    Differentiable by plain autograd (`lean_head=False`), which then keeps one chunk's worth of indices per chunk.
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
