"""Optimizer step time: LegacyAdamW (the original's update) against torch.optim.AdamW, on DistilBERT-shaped tensors.

    python bench/bench_optimizer.py                 # CPU or the visible GPU, DistilBERT's 66M parameters
    python bench/bench_optimizer.py --scale 0.1     # a tenth of each tensor's rows (a small CPU)

Prints the median step of each and the ratio ours / torch's, measured in the same run.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimizer import LegacyAdamW  # noqa: E402


def distilbert_shapes(scale: float):
    rows = lambda n: max(1, int(n * scale))  # noqa: E731
    shapes = [(rows(30522), 768), (rows(512), 768), (768,), (768,)]
    for _ in range(6):  # attention q, k, v, out; LayerNorm; FFN in, out; LayerNorm
        shapes += [(rows(768), 768), (768,)] * 4 + [(768,), (768,), (rows(3072), 768), (3072,), (rows(768), 3072)]
        shapes += [(768,), (768,), (768,)]
    return shapes + [(rows(768), 768), (768,), (768,), (768,), (30522,)]  # the MLM head


def median_step(make, shapes, device, steps):
    params = [torch.zeros(shape, device=device).normal_().requires_grad_() for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = make(params)
    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = distilbert_shapes(args.scale)
    count = sum(torch.Size(shape).numel() for shape in shapes)
    print(f"{device}: {len(shapes)} tensors, {count / 1e6:.1f}M parameters, median of {args.steps} steps")
    kwargs = dict(lr=2e-5, eps=1e-6, weight_decay=0.01)
    variants = {
        "LegacyAdamW foreach": lambda ps: LegacyAdamW(ps, foreach=True, **kwargs),
        "LegacyAdamW per tensor": lambda ps: LegacyAdamW(ps, foreach=False, **kwargs),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **kwargs),
    }
    if device == "cuda":
        variants["torch AdamW fused"] = lambda ps: torch.optim.AdamW(ps, fused=True, **kwargs)
    results = {name: median_step(make, shapes, device, args.steps) for name, make in variants.items()}
    reference = results["torch AdamW foreach"]
    for name, seconds in results.items():
        print(f"{name:24s} {1000 * seconds:9.2f} ms   {seconds / reference:5.2f}x torch AdamW foreach")


if __name__ == "__main__":
    main()
