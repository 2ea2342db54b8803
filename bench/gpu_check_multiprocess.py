"""bench/gpu_check.py's multiprocess section: 2 processes (NCCL, one GPU each; gloo on a CPU for --smoke) compute
both losses with the cross-rank gather and its backward, each on its share of a global batch, and are compared
with one process on the whole batch; then train_max.py runs a few steps under torchrun with 2 processes.

torchrun starts this file as a script, once per rank:
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/gpu_check_multiprocess.py OUT BATCH VOCAB
Each rank first computes the one-process reference (before the process group exists, so nothing is gathered),
then its share under the process group, and saves both to OUT/RANK.pt; the section compares them.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from losses import MarginMSELossSplade, MultipleNegativesRankingLossSplade  # noqa: E402

LOSSES = {"max": MultipleNegativesRankingLossSplade, "distill": MarginMSELossSplade}
STEPS = 3  # train_max.py under torchrun


class GivenEmbeddings(torch.nn.Module):
    def forward(self, features):
        return {"sentence_embedding": features["embedding"]}


def global_batch(batch: int, vocab: int, device: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Query, positive and negative embeddings (non-negative, about 1 % active, as SPLADE's) and CE margins."""
    generator = torch.Generator().manual_seed(0)
    groups = []
    for _ in range(3):
        values = torch.rand(batch, vocab, generator=generator)
        groups.append((values * (torch.rand(batch, vocab, generator=generator) < 0.01)).to(device))
    return groups, (torch.randn(batch, generator=generator) * 3).to(device)


def losses_on(groups: list[torch.Tensor], labels: torch.Tensor) -> dict:
    """Both losses' terms and the gradients of their sum with respect to each group's rows."""
    out = {}
    for name, loss_class in LOSSES.items():
        leaves = [g.clone().requires_grad_() for g in groups]
        terms = loss_class(GivenEmbeddings(), 0.3, 0.2)([{"embedding": g} for g in leaves], labels)
        sum(terms.values()).backward()
        out[name] = {"terms": {k: v.item() for k, v in terms.items()}, "grads": [g.grad.cpu() for g in leaves]}
    return out


def rank_main(out_dir: str, batch: int, vocab: int) -> None:
    import torch.distributed as dist

    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(local)
    groups, labels = global_batch(batch, vocab, device)
    reference = losses_on(groups, labels)  # no process group yet: one process, the whole batch
    dist.init_process_group("nccl" if cuda else "gloo")
    distributed = losses_on([g.chunk(world)[rank] for g in groups], labels.chunk(world)[rank])
    torch.save({"reference": reference, "distributed": distributed, "backend": dist.get_backend()},
               f"{out_dir}/{rank}.pt")  # fmt: skip
    dist.destroy_process_group()


def gather_checks(ctx, ranks: list[dict]) -> list[dict]:
    """Per loss: each term's mean over ranks equals the one-process term; each rank's gradient, divided by the
    number of ranks (what DDP's average does), equals the one-process gradient of its rows."""
    from gpu_check_correctness import check

    world, checks = len(ranks), []
    for name in LOSSES:
        reference = ranks[0]["reference"][name]
        for term, value in reference["terms"].items():
            mean = statistics.mean(r["distributed"][name]["terms"][term] for r in ranks)
            checks.append(check(ctx, f"{world}-process {name} {term} (mean over ranks) vs 1 process", mean, value))
        ours = torch.cat([torch.cat([r["distributed"][name]["grads"][k] for r in ranks]) for k in range(3)]) / world
        theirs = torch.cat(reference["grads"])
        checks.append(check(ctx, f"{world}-process {name} gradients vs 1 process", ours, theirs, kind="grad"))
    return checks


def multiprocess(ctx) -> dict:
    from gpu_check_helpers import finite_losses_check, run_command, train_max

    batch, vocab = (16, 30522) if ctx.device == "cuda" else (8, 64)
    result = {"processes": 2, "checks": []}
    with tempfile.TemporaryDirectory(prefix="gpu-check-gather-") as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(Path(__file__).resolve()), out, str(batch), str(vocab)]  # fmt: skip
        returncode, stdout, stderr = run_command(command, ctx.seconds_left() / 2, {"OMP_NUM_THREADS": "1"})
        files = sorted(Path(out).glob("*.pt"))
        if returncode != 0 or len(files) != 2:
            why = "timed out" if returncode is None else f"exit status {returncode}: {(stderr or stdout)[-1500:]}"
            raise RuntimeError(f"the 2-process gather run failed ({why})")
        ranks = [torch.load(path) for path in files]
    result["backend"] = ranks[0]["backend"]
    result["checks"] += gather_checks(ctx, ranks)
    ctx.save(result)
    with tempfile.TemporaryDirectory(prefix="gpu-check-torchrun-") as output_dir:
        steps = ["--max_steps", str(STEPS), "--save_steps", str(STEPS)]
        run = train_max(ctx, steps, output_dir, model=ctx.model_dir, processes=2)
    result["checks"].append(finite_losses_check(ctx, f"torchrun 2 processes, train_max {STEPS} steps", run))
    return result


if __name__ == "__main__":
    rank_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
