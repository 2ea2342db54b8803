"""The original's optimizer: transformers' legacy `AdamW` (removed from transformers), which
sentence-transformers 2.1's fit() used with eps 1e-6, weight decay 0.01 and correct_bias=True.

It differs from torch.optim.AdamW in two places, both kept here:
- eps is added to sqrt(v) *before* the bias correction: p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps),
  an effective eps 1 / sqrt(1 - b2^t) times torch's at step t (31.6x at step 1, 1.26x at step 1000);
- the weight decay is applied *after* the Adam step, to the updated weights: p -= lr * wd * p.

`foreach` (default: on when every parameter is on a GPU, as torch's optimizers choose) updates all tensors of a
group with torch._foreach_* kernels, a few launches per step instead of a few per tensor; the numbers are the same.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


class LegacyAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, foreach: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}, wd={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LegacyAdamW does not support sparse gradients")
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
            foreach = group["foreach"]
            if foreach is None:
                foreach = bool(params) and all(p.is_cuda for p in params)
            if foreach:
                self._foreach_update(group, params)
            else:
                for p in params:
                    self._update(group, p)
        return loss

    def _update(self, group, p):
        state = self.state[p]
        beta1, beta2 = group["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        p.addcdiv_(exp_avg, denom, value=-self._step_size(group, state["step"]))
        if group["weight_decay"] > 0.0:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _foreach_update(self, group, params):
        beta1, beta2 = group["betas"]
        # One kernel call per (device, dtype, step): a parameter that had no gradient on some step lags behind.
        buckets = defaultdict(list)
        for p in params:
            buckets[p.device, p.dtype, self.state[p]["step"]].append(p)
        for (_, _, step), ps in buckets.items():
            grads = [p.grad for p in ps]
            exp_avgs = [self.state[p]["exp_avg"] for p in ps]
            exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in ps]
            torch._foreach_mul_(exp_avgs, beta1)
            torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
            torch._foreach_mul_(exp_avg_sqs, beta2)
            torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
            denoms = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_add_(denoms, group["eps"])
            torch._foreach_addcdiv_(ps, exp_avgs, denoms, value=-self._step_size(group, step))
            if group["weight_decay"] > 0.0:
                torch._foreach_add_(ps, ps, alpha=-group["lr"] * group["weight_decay"])

    @staticmethod
    def _step_size(group, step: int) -> float:
        beta1, beta2 = group["betas"]
        return group["lr"] * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
