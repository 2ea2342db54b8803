"""The losses against the formulas computed by hand, and against sentence-transformers' own losses."""

import math

import numpy as np
import pytest
import torch
from sentence_transformers.sparse_encoder.losses import (
    SparseMarginMSELoss,
    SparseMultipleNegativesRankingLoss,
    SpladeLoss,
)

from gloo import run_ranks
from losses import MarginMSELossSplade, MultipleNegativesRankingLossSplade, flops, warmed_up
from splade_module import load_splade


class GivenEmbeddings(torch.nn.Module):
    """A stand-in model: each feature dict carries its embeddings."""

    def forward(self, features):
        return {"sentence_embedding": features["embedding"]}


def random_groups(n_groups, batch=5, vocab=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    # SPLADE vectors are non-negative and sparse
    return [torch.relu(torch.randn(batch, vocab, generator=generator)) for _ in range(n_groups)]


def hand_flops(x):
    x = np.abs(x.numpy().astype(np.float64))
    return sum((sum(x[i, v] for i in range(x.shape[0])) / x.shape[0]) ** 2 for v in range(x.shape[1]))


def test_flops_by_hand():
    (x,) = random_groups(1)
    x[0] *= -1  # |x| matters, not the sign
    assert flops(x).item() == pytest.approx(hand_flops(x), rel=1e-6)


def test_mnrl_by_hand():
    queries, positives, negatives = random_groups(3)
    loss = MultipleNegativesRankingLossSplade(GivenEmbeddings(), lambda_q=0.3, lambda_d=0.2)
    terms = loss([{"embedding": g} for g in (queries, positives, negatives)], None)

    q, candidates = queries.double().numpy(), torch.cat([positives, negatives]).double().numpy()
    cross_entropy = 0.0
    for i in range(len(q)):
        scores = [float(q[i] @ c) for c in candidates]  # scale 1
        cross_entropy += math.log(sum(math.exp(s) for s in scores)) - scores[i]
    cross_entropy /= len(q)
    assert terms["ranking_loss"].item() == pytest.approx(cross_entropy, rel=1e-5)
    assert terms["flops_d_loss"].item() == pytest.approx(0.2 * hand_flops(torch.cat([positives, negatives])), rel=1e-5)
    assert terms["flops_q_loss"].item() == pytest.approx(0.3 * hand_flops(queries), rel=1e-5)


def test_margin_mse_by_hand():
    queries, positives, negatives = random_groups(3)
    labels = torch.randn(len(queries))
    loss = MarginMSELossSplade(GivenEmbeddings(), lambda_q=0.1, lambda_d=0.08)
    terms = loss([{"embedding": g} for g in (queries, positives, negatives)], labels)

    q, p, n = (g.double().numpy() for g in (queries, positives, negatives))
    mse = np.mean([(q[i] @ p[i] - q[i] @ n[i] - labels[i].item()) ** 2 for i in range(len(q))])
    assert terms["mse_loss"].item() == pytest.approx(mse, rel=1e-5)
    # the two document terms summed, as the original did (not FLOPS of their concatenation)
    assert terms["flops_d_loss"].item() == pytest.approx(
        0.08 * (hand_flops(positives) + hand_flops(negatives)), rel=1e-5
    )
    assert terms["flops_q_loss"].item() == pytest.approx(0.1 * hand_flops(queries), rel=1e-5)


def test_quadratic_lambda_warmup():
    assert warmed_up(0.5, 0, 0) == 0.5  # T = 0: constant, the original recipe
    assert warmed_up(0.5, 0, 100) == 0.0
    assert warmed_up(0.5, 50, 100) == pytest.approx(0.125)
    assert warmed_up(0.5, 250, 100) == 0.5
    queries, positives, negatives = random_groups(3)
    loss = MultipleNegativesRankingLossSplade(GivenEmbeddings(), 0.4, 0.2, lambda_warmup_steps=10)
    loss.step = 5
    terms = loss([{"embedding": g} for g in (queries, positives, negatives)], None)
    assert terms["flops_q_loss"].item() == pytest.approx(0.4 * 0.25 * hand_flops(queries), rel=1e-5)
    stats = loss.pop_stats()
    assert stats["lambda_q"] == pytest.approx(0.1) and stats["lambda_d"] == pytest.approx(0.05)
    assert stats["active_dims_q"] == pytest.approx((queries > 0).sum(1).float().mean().item())


def both_losses(groups, labels):
    """Every term of both losses on the same embeddings (queries, positives, negatives)."""
    columns = [{"embedding": g} for g in groups]
    mnrl = MultipleNegativesRankingLossSplade(GivenEmbeddings(), lambda_q=0.3, lambda_d=0.2)(columns, None)
    mse = MarginMSELossSplade(GivenEmbeddings(), lambda_q=0.1, lambda_d=0.08)(columns, labels)
    return {**{f"mnrl {k}": v for k, v in mnrl.items()}, **{f"margin-mse {k}": v for k, v in mse.items()}}


def test_loss_arithmetic_is_fp32_under_bf16_autocast():
    """Scores, margins and FLOPS in fp32 under autocast (the GPU training path; the original's scores were fp16): the
    same terms as without autocast, where bf16 products would be off by ~1e-3."""
    groups = [g * 0.3 for g in random_groups(3, batch=16, vocab=3000, seed=1)]  # scores of a few units
    labels = torch.randn(16, generator=torch.Generator().manual_seed(2))
    reference = both_losses(groups, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = both_losses(groups, labels)
        # A model under autocast may hand over bf16 embeddings: the arithmetic on them is fp32 too.
        from_bf16 = both_losses([g.bfloat16() for g in groups], labels)
    rounded = both_losses([g.bfloat16().float() for g in groups], labels)
    for name, value in reference.items():
        assert under_autocast[name].dtype == torch.float32, name
        assert under_autocast[name].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7), name
        assert from_bf16[name].item() == pytest.approx(rounded[name].item(), rel=1e-6, abs=1e-7), name
    # What the test guards against: the ranking loss from bf16 scores is measurably different.
    q, p, n = groups
    bf16_scores = (q.bfloat16() @ torch.cat([p, n]).bfloat16().T).float()
    bf16_ranking = torch.nn.functional.cross_entropy(bf16_scores, torch.arange(16))
    assert abs(bf16_ranking.item() - reference["mnrl ranking_loss"].item()) > 1e-4


def _ranks_share(rank, world, groups, labels):
    """One rank's share of the batch through both losses, counting the all-gathers."""
    calls = []
    gather = torch.distributed.nn.functional.all_gather
    counting = lambda tensor, *args, **kwargs: calls.append(1) or gather(tensor, *args, **kwargs)
    torch.distributed.nn.functional.all_gather = counting
    mine = [g.chunk(world)[rank].clone().requires_grad_() for g in groups]
    terms, grads, gathers = {}, {}, {}
    for name, loss, own_labels in (
        ("mnrl", MultipleNegativesRankingLossSplade(GivenEmbeddings(), 0.3, 0.2), None),
        ("margin-mse", MarginMSELossSplade(GivenEmbeddings(), 0.1, 0.08), labels.chunk(world)[rank]),
    ):
        calls.clear()
        for g in mine:
            g.grad = None
        values = loss([{"embedding": g} for g in mine], own_labels)
        sum(values.values()).backward()
        terms[name] = {k: v.item() for k, v in values.items()}
        grads[name] = [g.grad.clone() for g in mine]
        gathers[name] = len(calls)
    return terms, grads, gathers


@pytest.mark.parametrize("batch", [8, 7])
def test_two_ranks_gather_once_per_step_and_equal_one_process(batch):
    """Under torchrun each rank gathers its queries and documents once per step (scores and FLOPS share it); the
    terms averaged over ranks, and each rank's gradients / world, equal one process on the whole batch. Also with
    unequal shares (7 rows: 4 and 3), as in the last global batch of an epoch (data.rotation.batch_bounds)."""
    groups = random_groups(3, batch=batch, vocab=50, seed=3)
    labels = torch.randn(batch, generator=torch.Generator().manual_seed(4))
    ranks = run_ranks(_ranks_share, groups, labels)
    single = [g.clone().requires_grad_() for g in groups]
    for name, loss, own_labels in (
        ("mnrl", MultipleNegativesRankingLossSplade(GivenEmbeddings(), 0.3, 0.2), None),
        ("margin-mse", MarginMSELossSplade(GivenEmbeddings(), 0.1, 0.08), labels),
    ):
        for g in single:
            g.grad = None
        values = loss([{"embedding": g} for g in single], own_labels)
        sum(values.values()).backward()
        for term, value in values.items():
            mean_over_ranks = np.mean([terms[name][term] for terms, _, _ in ranks])
            assert mean_over_ranks == pytest.approx(value.item(), rel=1e-6), (name, term)
        for k, g in enumerate(single):
            rank_grads = torch.cat([grads[name][k] for _, grads, _ in ranks]) / 2  # DDP averages over ranks
            torch.testing.assert_close(rank_grads, g.grad, rtol=1e-5, atol=1e-7, msg=f"{name} group {k}")
        assert [gathers[name] for _, _, gathers in ranks] == [1, 1], name


def test_negative_lambda_refused():
    with pytest.raises(ValueError, match="lambda_q and lambda_d must be >= 0"):
        MarginMSELossSplade(GivenEmbeddings(), -0.1, 0.1)


# Positives that share few words with their queries, so that the ranking loss is far from 0 (float32 can't
# compare two cross-entropies of 1e-7).
TEXTS = {
    "query": ["what is the capital of france", "boundary layer transition", "heat transfer in hypersonic flow"],
    "positive": [
        "the city where the french government sits",
        "turbulence onset near a wall",
        "the history of aviation",
    ],
    "negative": ["france capital paris", "transition of the laminar boundary layer", "hypersonic heat transfer"],
}


@pytest.fixture(scope="module")
def model(splade_tiny_path):
    return load_splade(splade_tiny_path, max_seq_length=32)


def features(model):
    return [model[0].preprocess(TEXTS[column]) for column in ("query", "positive", "negative")]


def gradients(model, loss, labels=None):
    model.zero_grad()
    terms = loss(features(model), labels)
    sum(terms.values()).backward()
    return terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mnrl_equals_sentence_transformers_splade_loss(model):
    ours = MultipleNegativesRankingLossSplade(model, lambda_q=0.0008, lambda_d=0.0006)
    theirs = SpladeLoss(
        model,
        SparseMultipleNegativesRankingLoss(model, scale=1.0),
        document_regularizer_weight=0.0006,
        query_regularizer_weight=0.0008,
    )
    our_terms, our_grads = gradients(model, ours)
    their_terms, their_grads = gradients(model, theirs)
    assert our_terms["ranking_loss"].item() == pytest.approx(their_terms["base_loss"].item(), rel=1e-5)
    assert our_terms["flops_d_loss"].item() == pytest.approx(their_terms["document_regularizer_loss"].item(), rel=1e-5)
    assert our_terms["flops_q_loss"].item() == pytest.approx(their_terms["query_regularizer_loss"].item(), rel=1e-5)
    assert our_grads.keys() == their_grads.keys()
    for name in our_grads:
        torch.testing.assert_close(our_grads[name], their_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_margin_mse_term_equals_sentence_transformers(model):
    labels = torch.tensor([3.0, -1.0, 0.5])
    ours = MarginMSELossSplade(model, lambda_q=0.0, lambda_d=0.0)
    theirs = SpladeLoss(
        model, SparseMarginMSELoss(model), document_regularizer_weight=0.0, query_regularizer_weight=0.0
    )
    with torch.no_grad():
        our_terms = ours(features(model), labels)
        their_terms = theirs(features(model), labels)
    assert our_terms["mse_loss"].item() == pytest.approx(their_terms["base_loss"].item(), rel=1e-5)
