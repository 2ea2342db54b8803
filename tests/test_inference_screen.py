"""The bf16 screen at inference (max_logits_screened): fp32 vectors from a bf16 projection plus exact recomputation.

References: the plain fp32 path (max_logits_unpadded), the naive formula, float64 logits, and sentence-transformers'
SparseEncoder on the real splade-tiny checkpoint."""

import json
import time

import pytest
import torch
import torch.nn.functional as F
from sentence_transformers import SparseEncoder

import bf16_screen as screen_module
import splade_head
import splade_module
from bf16_screen import bf16_logit_slack, bf16_screen, max_logits_screened
from conftest import BEIR
from splade_head import max_logits_unpadded
from splade_module import load_splade, splade_max_naive

VOCAB, DIM = 3000, 96


def wide_range_inputs(batch=6, length=40, seed=0, bias_shift=-4.0):
    """Hidden states whose norms span five orders of magnitude and decoder rows two, right padding, and one text
    that is a single token. The bias makes a few per cent of the (text, term) maxima positive."""
    generator = torch.Generator().manual_seed(seed)
    token_scale = 10 ** torch.empty(batch, length, 1).uniform_(-4, 1, generator=generator)
    hidden = torch.randn(batch, length, DIM, generator=generator) * token_scale
    row_scale = 10 ** torch.empty(VOCAB, 1).uniform_(-2, 0, generator=generator)
    weight = torch.randn(VOCAB, DIM, generator=generator) * row_scale / DIM**0.5
    bias = torch.randn(VOCAB, generator=generator) + bias_shift
    lengths = torch.randint(2, length + 1, (batch,), generator=generator)
    lengths[-1] = 1
    mask = (torch.arange(length) < lengths[:, None]).long()
    return hidden, mask, weight, bias


def splade(max_logits):
    return torch.log1p(torch.relu(max_logits))


def assert_same_vectors(got, expected, atol=1e-5):
    assert torch.equal(got > 0, expected > 0), f"{int(((got > 0) ^ (expected > 0)).sum())} pairs differ in activity"
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-5)


def test_bound_holds_for_every_token_and_term():
    hidden, mask, weight, bias = wide_range_inputs(seed=1)
    tokens = hidden[mask.bool()]
    screened = F.linear(tokens.bfloat16(), weight.bfloat16())  # what bf16_screen computes, before the max
    slack = bf16_logit_slack(
        screened, torch.linalg.vector_norm(tokens.double(), dim=1)[:, None], weight.double().norm(dim=1), bias, DIM
    )
    approximation = screened.double() + bias.double()
    fp32 = F.linear(tokens, weight, bias).double()
    exact = F.linear(tokens.double(), weight.double(), bias.double())
    assert ((fp32 - approximation).abs() <= slack).all()
    assert ((exact - approximation).abs() <= slack).all()
    # Not vacuous: within a few bf16 roundings of |h| |w|, far below the typical logit.
    norms = tokens.double().norm(dim=1)[:, None] * weight.double().norm(dim=1)
    assert (slack <= 0.02 * (norms + screened.double().abs() + bias.double().abs())).all()


@pytest.mark.parametrize("rows_per_block", [7, 1000])
def test_screened_equals_plain_fp32_and_naive_formula(monkeypatch, rows_per_block):
    monkeypatch.setattr(splade_head, "LOGITS_PER_CHUNK", VOCAB * rows_per_block)  # blocks cut through texts
    hidden, mask, weight, bias = wide_range_inputs()
    candidates = bf16_screen(hidden, mask, weight, bias)
    plain = splade(max_logits_unpadded(hidden, mask, weight, bias))
    got = splade(max_logits_screened(hidden, mask, weight, bias))
    naive = splade_max_naive(F.linear(hidden, weight, bias), mask)

    assert 0.001 < (plain > 0).float().mean() < 0.2  # realistic sparsity: few active terms
    assert candidates.float().mean() < 0.5  # the screen prunes, so the screened path really ran
    assert (candidates >= (plain > 0)).all()  # a superset of the active pairs
    assert_same_vectors(got, plain)
    assert_same_vectors(got, naive)


def test_left_padding_and_no_bias():
    hidden, mask, weight, _ = wide_range_inputs(seed=2)
    mask = mask.flip(1)  # real tokens at the end, as left-padding tokenizers do
    plain = splade(max_logits_unpadded(hidden, mask, weight, None))
    assert_same_vectors(splade(max_logits_screened(hidden, mask, weight, None)), plain)


def test_adversarial_maxima_next_to_zero(monkeypatch):
    """A bias that puts every (text, term) max of the first text within 1e-3 of 0 (half above, half below): the
    screen must keep every positive one and cannot rule out most negative ones; the exact recomputation then
    decides each sign as fp32 does."""
    monkeypatch.setattr("bf16_screen.SCREEN_MAX_CANDIDATES", 1.0)  # no fallback to the plain path
    hidden, mask, weight, bias = wide_range_inputs(batch=3, seed=3)
    hidden = hidden / hidden.norm(dim=-1, keepdim=True) * 10  # moderate norms, so that 1e-3 is below the bound
    generator = torch.Generator().manual_seed(4)
    offset = torch.empty(VOCAB).uniform_(1e-5, 1e-3, generator=generator)
    offset *= torch.where(torch.rand(VOCAB, generator=generator) < 0.5, -1.0, 1.0)
    maxima_without_bias = max_logits_unpadded(hidden.double(), mask, weight.double(), None)[0]
    bias = (offset.double() - maxima_without_bias).float()
    plain = max_logits_unpadded(hidden, mask, weight, bias)
    assert (plain[0].abs() < 1.1e-3).all()

    got = max_logits_screened(hidden, mask, weight, bias)
    candidates = bf16_screen(hidden, mask, weight, bias)[0]
    assert (candidates >= (plain[0] > 0)).all() and candidates.float().mean() > 0.9
    assert 0.4 < (got[0] > 0).float().mean() < 0.6
    assert_same_vectors(splade(got), splade(plain), atol=1e-6)


def test_non_finite_hidden_states_fall_back_to_plain_path():
    hidden, mask, weight, bias = wide_range_inputs(seed=5)
    hidden[0, 0, 0] = float("inf")
    got, plain = max_logits_screened(hidden, mask, weight, bias), max_logits_unpadded(hidden, mask, weight, bias)
    torch.testing.assert_close(got, plain, equal_nan=True)


def beir_texts(name: str, file: str, count: int) -> list[str]:
    path = BEIR / name / file
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    with open(path) as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(count))]


@pytest.mark.slow  # bf16 matmul is emulated (slow) on CPUs without AVX512-BF16/AMX
def test_splade_tiny_screened_equals_fp32_and_sentence_transformers(splade_tiny_path):
    texts = beir_texts("cranfield", "corpus.jsonl", 6) + beir_texts("cisi", "corpus.jsonl", 6)
    texts += beir_texts("cisi", "queries.jsonl", 4)
    screened = load_splade(splade_tiny_path, max_seq_length=128, screen_bf16=True)
    plain = load_splade(splade_tiny_path, max_seq_length=128, screen_bf16=False)
    reference = SparseEncoder(splade_tiny_path)
    reference.max_seq_length = 128

    with torch.inference_mode():
        features = screened[0].preprocess(texts)
        hidden_mask = _hidden_states(screened[0], features)
        got = screened[0](dict(features))["sentence_embedding"]
        expected = plain[0](dict(features))["sentence_embedding"]
    theirs = reference.encode_document(texts, convert_to_sparse_tensor=False, convert_to_tensor=True)

    candidates = bf16_screen(*hidden_mask, screened[0].decoder.weight, screened[0].decoder.bias)
    assert candidates.float().mean() < 0.05  # on a real model the screen keeps a few per cent of the pairs
    assert 20 < (expected > 0).sum(1).float().mean() < 1000
    assert_same_vectors(got, expected)
    assert_same_vectors(got, theirs.float())


@pytest.mark.parametrize("slower", ["screened", "plain"])
def test_auto_mode_screens_where_measured_faster_never_under_autocast(monkeypatch, splade_tiny_path, slower):
    """ "auto": nothing where bf16 is emulated; where it is native, both paths timed on the first 3 batches and the
    faster one kept (here made slower by a sleep); never under autocast; the choice is not saved."""
    model = load_splade(splade_tiny_path, max_seq_length=32)
    module = model[0]
    calls = {"screened": 0, "plain": 0}

    def counted(name, work):
        def run(*args):
            calls[name] += 1
            time.sleep(0.2 if name == slower else 0)
            return work(*args)

        return run

    monkeypatch.setattr(screen_module, "_screen_timings", {})
    monkeypatch.setattr(splade_module, "max_logits_screened", counted("screened", max_logits_screened))
    monkeypatch.setattr(splade_module, "max_logits_unpadded", counted("plain", max_logits_unpadded))
    features = module.preprocess(["flow over a flat plate"])
    with torch.inference_mode():
        monkeypatch.setattr(splade_module, "bf16_matmul_is_native", lambda device: False)
        module(dict(features))
        assert calls == {"screened": 0, "plain": 1}
        monkeypatch.setattr(splade_module, "bf16_matmul_is_native", lambda device: True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            module(dict(features))
        assert calls == {"screened": 0, "plain": 2}
        for _ in range(3):  # timed: both paths
            module(dict(features))
        assert calls == {"screened": 3, "plain": 5}
        for _ in range(2):  # decided
            module(dict(features))
    faster = "plain" if slower == "screened" else "screened"
    assert calls[faster] == {"screened": 5, "plain": 7}[faster] and calls[slower] == {"screened": 3, "plain": 5}[slower]
    assert "screen_bf16" not in module.get_config_dict()


def _hidden_states(module, features):
    with splade_module._projection_skipped(module.decoder):
        hidden = module.model(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).logits
    return hidden, features["attention_mask"]
