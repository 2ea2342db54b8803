"""Exact fp32 SPLADE vectors at inference from a bf16 screen, where bf16 matmul is native.

Most (text, term) maxima are negative, and relu zeroes them. A bf16 projection of all tokens, with a proven bound on
how far each bf16 logit lies from the fp32 one (`bf16_logit_slack`), rules most of them out (`bf16_screen`); the
pairs that remain are recomputed in fp32 (`max_logits_screened`). The vectors then equal the plain fp32 path's
(`max_logits_unpadded`) up to fp32 rounding. SpladeMax's "auto" screens where bf16 matmul is native and the screen is
measured faster than the plain fp32 path (`faster_of`: both timed on the first batches, once per process and shape).
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from splade_head import max_logits_packed, max_logits_unpadded, pack_tokens, packed_owners

# bf16 keeps 8 significant bits: unit roundoff 2^-8 when rounding to nearest. For fp32 accumulation, 2^-23
# (twice fp32's unit roundoff) also covers accumulators that truncate, as GPU tensor cores do.
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
    tokens, lengths = pack_tokens(hidden, attention_mask)
    with _full_precision_reduction(hidden.device):
        best = max_logits_packed(tokens.to(torch.bfloat16), lengths, weight_bf16, None)  # texts x vocabulary, bf16
    token_norm = torch.zeros(len(hidden), dtype=torch.float64, device=hidden.device)
    token_norms = torch.linalg.vector_norm(tokens, dim=1, dtype=torch.float64)
    token_norm.index_reduce_(0, packed_owners(lengths, hidden.device), token_norms, "amax")
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


# (device, vocabulary, hidden size) -> the choice once measured (True: screen); [plain s, screened s, batches] before.
_screen_timings: dict = {}
# Batches on which both paths run and are timed; the first of them is a warm-up and does not count.
TIMED_BATCHES = 3


def faster_of(key, device: torch.device, plain, screened) -> torch.Tensor:
    """plain() or screened(), two ways to the same values: the first TIMED_BATCHES calls for `key` run and time both
    (and return plain's), later calls run the one that took less time in all. "Native" is not "faster": on an Intel
    Xeon with AVX512-BF16 the screen measured 0.70x plain fp32, on an AMD EPYC with it 2.2x (README)."""
    state = _screen_timings.get(key)
    if isinstance(state, bool):
        return screened() if state else plain()
    state = state or [0.0, 0.0, 0]
    plain_s, result = _timed(device, plain)
    screened_s, _ = _timed(device, screened)
    if state[2] > 0:
        state[0], state[1] = state[0] + plain_s, state[1] + screened_s
    state[2] += 1
    _screen_timings[key] = state[1] < state[0] if state[2] >= TIMED_BATCHES else state
    return result


def _timed(device: torch.device, work) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


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
    tokens, lengths = pack_tokens(hidden, attention_mask)
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
