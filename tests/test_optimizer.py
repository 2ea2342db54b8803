"""LegacyAdamW against the update of transformers' legacy AdamW, written out here in float64."""

import math

import pytest
import torch

from optimizer import LegacyAdamW

STEPS = 20
BETAS, EPS = (0.9, 0.999), 1e-6
# Gradients of mixed scale (rows of 1e-5 ... 1e-2), fixed in advance: at 1e-5, sqrt(v) is below eps, so where eps
# goes matters. lr and weight decay are large enough that decaying before or after the step shows above rounding.
SCALES = torch.tensor([1e-5, 1e-4, 1e-3, 1e-2], dtype=torch.float64)


def fixed_gradients(shape, seed):
    generator = torch.Generator().manual_seed(seed)
    rows = SCALES.repeat_interleave(shape[0] // len(SCALES)).unsqueeze(1)
    return [(torch.randn(shape, generator=generator, dtype=torch.float64) * rows) for _ in range(STEPS)]


def legacy_adamw_reference(p0, gradients, lr, weight_decay):
    """transformers.AdamW(correct_bias=True).step(), one tensor, float64."""
    b1, b2 = BETAS
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    trajectory = []
    for t, g in enumerate(gradients, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + EPS)  # eps before the bias correction
        p = p - lr * weight_decay * p  # decay after the step, of the updated weights
        trajectory.append(p)
    return trajectory


def drive(optimizer_factory, params, gradients_per_param):
    optimizer = optimizer_factory(params)
    trajectory = []
    for t in range(STEPS):
        for param, gradients in zip(params, gradients_per_param):
            param.grad = gradients[t].to(param.dtype)
        optimizer.step()
        trajectory.append([param.detach().clone() for param in params])
    return trajectory


def make_params():
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator).requires_grad_() for shape in [(8, 6), (4, 3), (12,)]]


def within_float32_rounding(actual, expected, lr):
    # float32 rounds the parameter (relative 2**-24 of |p|) and the update (of |lr * m / sqrt(v)| <= ~10 lr) a few
    # times per step: allow 4 such roundings per step, accumulated over the 20 steps.
    bound = 4 * STEPS * 2**-24 * (expected.abs() + 10 * lr)
    return bool(((actual.double() - expected).abs() <= bound).all())


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("lr, weight_decay", [(1e-3, 0.01), (5e-2, 0.5)])
def test_twenty_steps_equal_the_legacy_formula_to_float32_rounding(foreach, lr, weight_decay):
    params = make_params()
    p0 = [p.detach().clone() for p in params]
    gradients = [fixed_gradients(p.shape if p.dim() == 2 else (p.shape[0], 1), seed=i) for i, p in enumerate(params)]
    gradients = [[g.reshape(p.shape) for g in gs] for p, gs in zip(params, gradients)]
    groups = [{"params": params[:2], "weight_decay": weight_decay}, {"params": params[2:], "weight_decay": 0.0}]
    ours = drive(lambda _: LegacyAdamW(groups, lr=lr, betas=BETAS, eps=EPS, foreach=foreach), params, gradients)
    for i, (start, grads) in enumerate(zip(p0, gradients)):
        reference = legacy_adamw_reference(start, grads, lr, weight_decay if i < 2 else 0.0)
        for t in range(STEPS):
            assert within_float32_rounding(ours[t][i], reference[t], lr), (i, t)


@pytest.mark.parametrize("lr, weight_decay", [(1e-3, 0.01), (5e-2, 0.5)])
def test_torch_adamw_is_not_that_update(lr, weight_decay):
    """The flag --optimizer torch_adamw changes the numbers: torch adds eps after the correction, decays before."""
    params = make_params()
    p0 = [p.detach().clone() for p in params]
    gradients = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(t)).double() * 1e-5
                  for t in range(STEPS)] for p in params]  # fmt: skip
    theirs = drive(lambda ps: torch.optim.AdamW(ps, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay),
                   params, gradients)  # fmt: skip
    reference = legacy_adamw_reference(p0[0], gradients[0], lr, weight_decay)
    assert not within_float32_rounding(theirs[-1][0], reference[-1], lr)


def test_on_tiny_gradients_the_original_steps_four_times_less_than_torch():
    """The original's eps is 31.6x torch's at step 1 (after the correction): on gradients of 1e-5 its first step
    is 0.24 lr where torch's is 0.91 lr."""
    params = make_params()
    p0 = params[0].detach().clone()
    gradient = torch.full(p0.shape, 1e-5)
    ours, theirs = p0.clone().requires_grad_(), p0.clone().requires_grad_()
    ours.grad, theirs.grad = gradient.clone(), gradient.clone()
    LegacyAdamW([ours], lr=1e-3, eps=EPS).step()
    torch.optim.AdamW([theirs], lr=1e-3, eps=EPS, weight_decay=0.0).step()
    ours_step, theirs_step = ((p0 - p.detach()).mean().item() / 1e-3 for p in (ours, theirs))
    assert ours_step == pytest.approx(math.sqrt(1e-3) * 1e-5 / (math.sqrt(1e-3) * 1e-5 + EPS), rel=1e-4)
    assert theirs_step == pytest.approx(1e-5 / (1e-5 + EPS), rel=1e-4)


def test_foreach_and_per_tensor_paths_are_identical_and_a_param_without_grad_lags():
    def run(foreach):
        params = make_params()
        optimizer = LegacyAdamW(params, lr=1e-2, weight_decay=0.1, foreach=foreach)
        for t in range(5):
            for i, p in enumerate(params):
                skip = i == 1 and t % 2 == 0  # this one gets a gradient only on odd steps: its step count lags
                p.grad = None if skip else torch.full_like(p, 10.0 ** -(t + 1))
            optimizer.step()
        return params, optimizer

    (fast, fast_opt), (slow, _) = run(True), run(False)
    for a, b in zip(fast, slow):
        assert torch.equal(a, b)
    assert [fast_opt.state[p]["step"] for p in fast] == [5, 2, 5]


def test_state_dict_round_trip_resumes_to_the_same_weights():
    params = make_params()
    gradients = [[torch.randn(p.shape, generator=torch.Generator().manual_seed(t)) for t in range(STEPS)]
                 for p in params]  # fmt: skip
    straight = drive(lambda ps: LegacyAdamW(ps, lr=1e-2, weight_decay=0.1), params, gradients)[-1]

    params = make_params()
    first = LegacyAdamW(params, lr=1e-2, weight_decay=0.1)
    for t in range(10):
        for p, gs in zip(params, gradients):
            p.grad = gs[t]
        first.step()
    saved = first.state_dict()
    resumed = LegacyAdamW(params, lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(saved)
    for t in range(10, STEPS):
        for p, gs in zip(params, gradients):
            p.grad = gs[t]
        resumed.step()
    for a, b in zip(params, straight):
        assert torch.equal(a.detach(), b)
