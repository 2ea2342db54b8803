"""The two SPLADE training objectives of the recipe, with FLOPS regularisation.

    FLOPS(X) = sum over v of (mean over the batch of |X[:, v]|)^2       for a batch X of shape (batch, vocab)
    Splade_max:   CE(q . [pos; neg]^T, own positive) + lambda_d FLOPS([pos; neg]) + lambda_q FLOPS(q)
    DistilSplade: MSE(q.pos - q.neg, CE(q, pos) - CE(q, neg)) + lambda_d (FLOPS(pos) + FLOPS(neg)) + lambda_q FLOPS(q)
    lambda warm-up (optional, --lambda_warmup_steps T): lambda_t = lambda * min(1, t / T)^2; T = 0: constant

Both follow the sentence-transformers loss interface, `forward(sentence_features, labels)`, and return
a dict of the weighted terms, which the trainer sums for backward and logs one by one. What a
researcher watches besides them (the current lambdas, the raw FLOPS values, active dimensions per
query and per document) accumulates in the loss until `pop_stats()` hands the averages to the logs.
The lambda warm-up follows `loss.step`, which the trainer sets to its optimizer step.

Under autocast, the scores, margins and FLOPS are computed in fp32 from fp32 embeddings (the original's scores, a
matrix product, were fp16 under its fp16 autocast). Under torchrun, every rank's queries and documents are
all-gathered once per step, for the scores and the FLOPS together; in the last global batch of an epoch the ranks
may hold unequal shares, and each rank's mean is weighted so that DDP's average of the gradients is the mean over
the global batch.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401  (all_gather with a backward: `import torch.distributed` does not load it)
import torch.nn.functional as F
from torch import nn


def flops(x: torch.Tensor) -> torch.Tensor:
    """FLOPS regulariser: sum over the vocabulary of (mean over the batch of |x[:, v]|)^2."""
    return (x.abs().mean(dim=0) ** 2).sum()


def warmed_up(value: float, step: int, warmup_steps: int) -> float:
    """lambda_t = lambda * min(1, t / T)^2; T = 0 keeps lambda constant (the original recipe)."""
    if warmup_steps <= 0:
        return value
    return value * min(1.0, step / warmup_steps) ** 2


def rows_per_rank(local_rows: int, device: torch.device) -> list[int]:
    """Every rank's batch size, rank after rank: they differ in the last global batch of an epoch, which
    data.rotation spreads over the ranks so that no query is trained twice. [local_rows] on one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local_rows]
    everyone = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, torch.tensor([local_rows], dtype=torch.int64, device=device))
    return torch.cat(everyone).tolist()


def gather_across_ranks(*groups: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
    """Each group's rows from all ranks, rank after rank, keeping this rank's gradient path (torchrun/DDP), in one
    all-gather for all groups; the groups themselves on one process. On rank r every group has rows[r] rows."""
    if len(rows) == 1:
        return list(groups)
    local = torch.cat(groups)
    widest = max(rows) * len(groups)
    if len(local) < widest:  # all_gather needs one shape: pad, then cut each rank's padding off
        local = F.pad(local, (0, 0, 0, widest - len(local)))
    everyone = torch.distributed.nn.functional.all_gather(local)
    parts = [rank_rows[: n * len(groups)].split(n) for rank_rows, n in zip(everyone, rows)]
    return [torch.cat(group) for group in zip(*parts)]


def share_of_global_batch(rows: list[int]) -> float:
    """DDP averages the ranks' gradients: a rank's mean over its rows, times this, makes that average the mean over
    the global batch's rows also when the ranks hold unequal shares (1.0 when they are equal)."""
    return len(rows) * rows[_rank()] / sum(rows)


@contextmanager
def fp32_arithmetic(device: torch.device):
    """Scores, margins and FLOPS in fp32 even under autocast, where a matrix product would run in bf16 (8-bit
    mantissa) or fp16: the embeddings are fp32 already, and these few products cost nothing next to the encoder."""
    with torch.autocast(device.type, enabled=False):
        yield


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _SpladeLoss(nn.Module):
    """Shared mechanics: lambdas with warm-up, encoding, statistics for the logs."""

    def __init__(self, model: nn.Module, lambda_q: float, lambda_d: float, lambda_warmup_steps: int = 0):
        super().__init__()
        if lambda_q < 0 or lambda_d < 0:
            raise ValueError(f"lambda_q and lambda_d must be >= 0, got {lambda_q} and {lambda_d}")
        self.model = model
        self.lambda_q = lambda_q
        self.lambda_d = lambda_d
        self.lambda_warmup_steps = lambda_warmup_steps
        self.step = 0  # the optimizer step, set by the trainer so that a resumed run continues the warm-up
        self.stats = defaultdict(float)
        self.calls = 0

    def current_lambdas(self) -> tuple[float, float]:
        return (
            warmed_up(self.lambda_q, self.step, self.lambda_warmup_steps),
            warmed_up(self.lambda_d, self.step, self.lambda_warmup_steps),
        )

    def embed(self, sentence_features) -> list[torch.Tensor]:
        """The embeddings of each column, in fp32 (the loss arithmetic's precision; see fp32_arithmetic)."""
        return [self.model(features)["sentence_embedding"].float() for features in sentence_features]

    def regularise(self, queries: torch.Tensor, *documents: torch.Tensor) -> dict[str, torch.Tensor]:
        """lambda_q * FLOPS(queries) + lambda_d * sum of FLOPS over the document groups, all ranks' rows given."""
        lambda_q, lambda_d = self.current_lambdas()
        flops_q = flops(queries)
        flops_d = sum(flops(group) for group in documents)
        self.calls += 1
        with torch.no_grad():
            self.record(
                lambda_q=lambda_q,
                lambda_d=lambda_d,
                flops_q=flops_q,
                flops_d=flops_d,
                active_dims_q=(queries > 0).sum(dim=1).float().mean(),
                active_dims_d=torch.cat(documents).gt(0).sum(dim=1).float().mean(),
            )
        return {"flops_q_loss": lambda_q * flops_q, "flops_d_loss": lambda_d * flops_d}

    def record(self, **values) -> None:
        # Tensors stay on their device until pop_stats: no GPU sync on every step.
        for name, value in values.items():
            self.stats[name] = self.stats[name] + (value.detach() if torch.is_tensor(value) else value)

    def pop_stats(self) -> dict[str, float]:
        """Averages over the forward calls since the last pop, for the logs."""
        averages = {name: float(value) / max(1, self.calls) for name, value in self.stats.items()}
        self.stats.clear()
        self.calls = 0
        return averages


class MultipleNegativesRankingLossSplade(_SpladeLoss):
    """Splade_max: in-batch cross-entropy on dot products (scale 1) + lambda_d FLOPS(candidates) + lambda_q FLOPS(q).

    Inputs: (query, positive, negative_1, ..., negative_n). The candidates of query i are all positives,
    then all negatives, of the batch (gathered across ranks under torchrun); its target is its own positive.
    """

    def forward(self, sentence_features, labels=None) -> dict[str, torch.Tensor]:
        queries, *documents = self.embed(sentence_features)
        with fp32_arithmetic(queries.device):
            rows = rows_per_rank(len(queries), queries.device)
            all_queries, *all_documents = gather_across_ranks(queries, *documents, rows=rows)
            candidates = torch.cat(all_documents)
            scores = queries @ candidates.T
            positives_before_this_rank = sum(rows[: _rank()])
            targets = torch.arange(len(queries), device=scores.device) + positives_before_this_rank
            ranking = F.cross_entropy(scores, targets) * share_of_global_batch(rows)
            self.record(ranking_loss=ranking)
            return {"ranking_loss": ranking, **self.regularise(all_queries, candidates)}


class MarginMSELossSplade(_SpladeLoss):
    """DistilSplade: MSE of (q.pos - q.neg) against the cross-encoder margin
    + lambda_d (FLOPS(pos) + FLOPS(neg)) + lambda_q FLOPS(q).

    Inputs: (query, positive, negative) and labels = CE(q, pos) - CE(q, neg).
    """

    def forward(self, sentence_features, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        queries, positives, negatives = self.embed(sentence_features)
        with fp32_arithmetic(queries.device):
            margins = (queries * positives).sum(dim=1) - (queries * negatives).sum(dim=1)
            rows = rows_per_rank(len(queries), queries.device)
            mse = F.mse_loss(margins, labels.to(margins.dtype)) * share_of_global_batch(rows)
            self.record(mse_loss=mse)
            return {"mse_loss": mse, **self.regularise(*gather_across_ranks(queries, positives, negatives, rows=rows))}
