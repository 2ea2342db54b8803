"""SpladeMax against sentence-transformers' SparseEncoder, the naive formula, and its own saved copies."""

import collections
import json

import pytest
import torch
from sentence_transformers import SparseEncoder
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertModel

import splade_head
from conftest import BEIR
from splade_head import SpladeMaxHead, max_logits, max_logits_unpadded
from splade_module import SpladeMax, load_splade, splade_max_naive

QUERY = "what is the capital of france"


def cranfield_texts(n):
    with open(BEIR / "cranfield" / "corpus.jsonl") as f:
        return [json.loads(next(f))["text"] for _ in range(n)]


@pytest.fixture(scope="module")
def model(splade_tiny_path):
    return load_splade(splade_tiny_path)


def embed(model, texts):
    return model[0](model[0].preprocess(texts))["sentence_embedding"]


def test_vectors_equal_sparse_encoder_on_real_texts(model, splade_tiny_path):
    texts = [QUERY] + cranfield_texts(24)  # lengths differ, so most rows are padded
    reference = SparseEncoder(splade_tiny_path).encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False)
    with torch.inference_mode():
        ours = embed(model, texts)
    assert ours.shape == (25, 30522)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert (ours > 0).sum(1).min() > 5


def test_query_expands_to_sensible_terms(model):
    with torch.inference_mode():
        weights = embed(model, [QUERY])[0]
    top = model[0].tokenizer.convert_ids_to_tokens(weights.topk(10).indices)
    assert {"capital", "france"} <= set(top[:3])


def test_tokenisation_strips_pads_and_truncates(model):
    features = model[0].preprocess(["  hello world \n", "a much longer text " * 400])
    assert features["input_ids"].shape == (2, 512)  # padded to the longest, truncated at max_seq_length
    assert features["attention_mask"][0].sum() == 4  # [CLS] hello world [SEP]: whitespace stripped
    short = SpladeMax(mlm=model[0].model, tokenizer=model[0].tokenizer, max_seq_length=16)
    assert short.preprocess(["word " * 100])["input_ids"].shape == (1, 16)


def random_head_inputs(batch, length, hidden=16, vocab=50, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden_states = torch.randn(batch, length, hidden, generator=generator, dtype=dtype)
    weight = torch.randn(vocab, hidden, generator=generator, dtype=dtype) * 0.5
    bias = torch.randn(vocab, generator=generator, dtype=dtype) * 0.5 - 1.0  # many terms inactive
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(1, batch):
        mask[i, length - i * (length // batch) :] = 0  # padded tails of different lengths
    return hidden_states, mask, weight, bias


def naive(hidden_states, mask, weight, bias):
    return splade_max_naive(torch.nn.functional.linear(hidden_states, weight, bias), mask)


def values_and_grads(fn, hidden_states, mask, weight, bias, upstream):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden_states, weight, bias)]
    out = fn(leaves[0], mask, leaves[1], leaves[2])
    (out * upstream).sum().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("batch,length", [(1, 7), (4, 12), (6, 33)])
@pytest.mark.parametrize("backward", ["sparse", "dense"])
def test_lean_head_equals_naive_formula(monkeypatch, batch, length, backward):
    monkeypatch.setattr(splade_head, "LOGITS_PER_CHUNK", 3 * 50 * batch)  # several token chunks
    monkeypatch.setattr(splade_head, "ACTIVE_PER_CHUNK", 7)  # several gather slices
    monkeypatch.setattr(splade_head, "DENSE_BACKWARD_DENSITY", 2.0 if backward == "sparse" else -1.0)
    inputs = random_head_inputs(batch, length)
    upstream = torch.rand(batch, 50, generator=torch.Generator().manual_seed(1))
    expected = values_and_grads(naive, *inputs, upstream)
    lean = values_and_grads(SpladeMaxHead.apply, *inputs, upstream)
    autograd_chunked = values_and_grads(lambda *a: torch.log1p(torch.relu(max_logits(*a)[0])), *inputs, upstream)
    assert 0 < (expected[0] > 0).float().mean() < 1  # both active and inactive terms occur
    for got in (lean, autograd_chunked):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def uneven_head_inputs(vocab=50, hidden=16):
    """One 40-token text, seven of 1-3 tokens, and one with no unmasked token at all: mostly padding."""
    hidden_states, mask, weight, bias = random_head_inputs(9, 40, hidden=hidden, vocab=vocab, seed=4)
    mask.zero_()
    for text, length in enumerate([3, 40, 1, 2, 0, 3, 1, 2, 3]):
        mask[text, :length] = 1
    return hidden_states, mask, weight, bias


@pytest.mark.parametrize("backward", ["sparse", "dense"])
@pytest.mark.parametrize("rows_per_block", [2, 7, 1000])
def test_lean_head_on_very_uneven_lengths_equals_naive(monkeypatch, backward, rows_per_block):
    monkeypatch.setattr(splade_head, "LOGITS_PER_CHUNK", 50 * rows_per_block)  # blocks cut through texts
    monkeypatch.setattr(splade_head, "ACTIVE_PER_CHUNK", 5)
    monkeypatch.setattr(splade_head, "DENSE_BACKWARD_DENSITY", 2.0 if backward == "sparse" else -1.0)
    inputs = uneven_head_inputs()
    upstream = torch.rand(9, 50, generator=torch.Generator().manual_seed(5))
    expected = values_and_grads(naive, *inputs, upstream)
    got = values_and_grads(SpladeMaxHead.apply, *inputs, upstream)
    assert expected[0][4].abs().sum() == 0 and expected[1][4].abs().sum() == 0  # the empty text: no value, no grad
    assert (expected[1][0, 3:] == 0).all() and expected[1][0, :3].abs().sum() > 0
    for g, e, name in zip(got, expected, ("values", "hidden", "weight", "bias")):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=name)


def test_lean_head_without_bias_equals_naive():
    hidden_states, mask, weight, _ = uneven_head_inputs()
    upstream = torch.rand(9, 50, generator=torch.Generator().manual_seed(6))
    results = []
    for fn in (naive, SpladeMaxHead.apply):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden_states, weight)]
        out = fn(leaves[0], mask, leaves[1], None)
        (out * upstream).sum().backward()
        results.append([out.detach()] + [leaf.grad for leaf in leaves])
    for g, e in zip(*reversed(results)):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_lean_head_projects_real_tokens_only():
    hidden_states, mask, weight, bias = uneven_head_inputs(vocab=64, hidden=32)
    with FlopCounterMode(display=False) as counter:
        SpladeMaxHead.apply(hidden_states, mask, weight, bias)
    assert counter.get_total_flops() == 2 * int(mask.sum()) * 32 * 64  # 55 tokens of the 9 x 40 positions


@pytest.mark.parametrize("rows_per_block", [1, 5, 1000])
def test_inference_path_skips_padding_and_equals_naive_formula(monkeypatch, rows_per_block):
    monkeypatch.setattr(splade_head, "LOGITS_PER_CHUNK", 50 * rows_per_block)  # blocks cut through texts
    hidden_states, mask, weight, bias = random_head_inputs(5, 13)
    expected = naive(hidden_states, mask, weight, bias)
    got = torch.log1p(torch.relu(max_logits_unpadded(hidden_states, mask, weight, bias)))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_lean_head_under_bf16_autocast_with_fp32_weights_equals_the_formula():
    """The GPU training path on CPU: fp32 weights and hidden states, bf16 autocast. The reference is the formula in
    float64 on what autocast hands the projection (the bf16-rounded inputs), its logits rounded to bf16 as the
    projection's output is, ties broken by the first token: values to 1 bf16 unit, gradients to fp32 rounding, so
    a gradient sent to another token, a missing bias or a wrong coefficient fails."""
    hidden_states, mask, weight, bias = random_head_inputs(6, 20, hidden=32, vocab=64, seed=5)
    upstream = torch.rand(6, 64, generator=torch.Generator().manual_seed(2))
    leaves = [t.clone().requires_grad_() for t in (hidden_states, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward only, as the trainer does
        out = SpladeMaxHead.apply(leaves[0], mask, leaves[1], leaves[2])
    (out * upstream).sum().backward()
    got = [out.detach()] + [leaf.grad for leaf in leaves]
    assert [t.dtype for t in got[1:]] == [torch.float32] * 3  # the weights' and hidden states' dtype
    h, w, b = (t.bfloat16().double() for t in (hidden_states, weight, bias))
    logits = (h @ w.T + b).bfloat16().double().masked_fill(mask[:, :, None] == 0, float("-inf"))
    best, token = logits.max(dim=1)
    assert torch.equal(token, logits.argmax(dim=1))  # first token on ties
    values = torch.log1p(torch.relu(best))
    torch.testing.assert_close(got[0].double(), values, rtol=2**-7, atol=1e-12)
    coef = torch.where(best > 0, upstream.double() / (1 + best.clamp(min=0)), 0.0)
    chosen = (torch.arange(20)[None, :, None] == token[:, None, :]).double()  # texts x tokens x vocabulary
    expected = [
        torch.einsum("blv,bv,vh->blh", chosen, coef, w),
        torch.einsum("blv,bv,blh->vh", chosen, coef, h),
        coef.sum(0),
    ]
    scale = [
        torch.einsum("blv,bv,vh->blh", chosen, coef.abs(), w.abs()),
        torch.einsum("blv,bv,blh->vh", chosen, coef.abs(), h.abs()),
        coef.abs().sum(0),
    ]
    for name, g, e, s in zip(("hidden", "weight", "bias"), got[1:], expected, scale):
        assert ((g.double() - e).abs() <= 1e-5 * s + 1e-9).all(), name


@pytest.mark.parametrize("lean_head", [True, False])
def test_gradients_on_real_checkpoint_equal_naive(splade_tiny_path, lean_head):
    # "" is [CLS] [SEP] only: a text of special tokens; the Cranfield texts are long, the others padded.
    texts = [QUERY, "", "aerodynamic heating of a blunt body in hypersonic flow"] + cranfield_texts(2)
    model = load_splade(splade_tiny_path, max_seq_length=64, lean_head=lean_head)
    reference = AutoModelForMaskedLM.from_pretrained(splade_tiny_path)
    features = model[0].preprocess(texts)
    upstream = torch.rand(len(texts), 30522, generator=torch.Generator().manual_seed(3))

    ours = model[0](dict(features))["sentence_embedding"]
    (ours * upstream).sum().backward()
    logits = reference(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).logits
    theirs = splade_max_naive(logits, features["attention_mask"])
    (theirs * upstream).sum().backward()

    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    grads = dict(reference.named_parameters())
    for name, parameter in model[0].model.named_parameters():
        torch.testing.assert_close(parameter.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_save_reloads_three_ways_with_identical_vectors(model, tmp_path):
    texts = [QUERY] + cranfield_texts(5)
    path = str(tmp_path / "saved")
    model.save(path)
    with torch.inference_mode():
        original = embed(model, texts)
        ours = embed(load_splade(path), texts)
        sparse_encoder = SparseEncoder(path).encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False)
        tokenizer = AutoTokenizer.from_pretrained(path)
        features = tokenizer(texts, padding=True, truncation=True, max_length=512, return_tensors="pt")
        logits = AutoModelForMaskedLM.from_pretrained(path)(**features).logits
        transformers_only = splade_max_naive(logits, features["attention_mask"])
    for reloaded in (ours, sparse_encoder, transformers_only):
        torch.testing.assert_close(reloaded, original, atol=1e-5, rtol=0)


def test_saved_max_seq_length_survives(splade_tiny_path, tmp_path):
    load_splade(splade_tiny_path, max_seq_length=96).save(str(tmp_path))
    assert load_splade(str(tmp_path))[0].max_seq_length == 96
    assert SparseEncoder(str(tmp_path)).max_seq_length == 96


def test_no_hidden_data_parallel(model):
    assert not any(isinstance(m, torch.nn.DataParallel) for m in model.modules())


def test_bad_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(OSError, match="Cannot load a model from"):
        load_splade(str(tmp_path / "no-such-model"))


def test_model_without_mlm_head_is_refused(tmp_path, splade_tiny_path):
    BertModel(BertConfig.from_pretrained(splade_tiny_path)).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(splade_tiny_path).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no masked-LM head"):
        load_splade(str(tmp_path))


def test_texts_must_be_strings(model):
    with pytest.raises(TypeError, match="input 1 is a int"):
        model[0].preprocess(["fine", 42])


# aten operations that make the host wait for the device: a result's size depends on values, or a value is read.
SYNC_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "repeat_interleave", "unique", "_unique2"}


class CountHostSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name in ("index", "index_put", "index_put_") else ()
        if name in SYNC_OPS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.count[name] += 1  # boolean indexing runs a nonzero inside
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("sparse", [True, False])
def test_lean_head_host_syncs_do_not_grow_with_the_batch(monkeypatch, sparse):
    """Forward and backward of SpladeMaxHead: the operations that make the host wait for the GPU, counted on CPU
    (aten ops whose output size depends on values, and tolist/item), are the same few for 4 texts and for 48."""
    counts = []
    for batch in (4, 48):
        hidden_states, mask, weight, bias = random_head_inputs(batch, 20, hidden=32, vocab=64, seed=5)
        leaves = [t.clone().requires_grad_() for t in (hidden_states, weight, bias - (4.0 if sparse else 0.0))]
        reads = collections.Counter()
        for method in ("tolist", "item"):
            original = getattr(torch.Tensor, method)
            counted = lambda self, *a, _m=method, _o=original, _r=reads: _r.update([_m]) or _o(self, *a)
            monkeypatch.setattr(torch.Tensor, method, counted)
        with CountHostSyncs() as syncs:
            out = SpladeMaxHead.apply(leaves[0], mask, leaves[1], leaves[2])
            out.sum().backward()
        monkeypatch.undo()
        counts.append(syncs.count + reads)
    assert counts[0] == counts[1]
    assert sum(counts[0].values()) <= 6, counts[0]
