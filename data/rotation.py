"""Per-epoch rotation of positives and negatives that survives the sentence-transformers trainer.

As the original: in epoch e each query is visited once, in shuffled order, and takes positive pos[e mod |pos|]
and negative neg[e mod |neg|] (TrainingSet.rotation; a query without positives takes neg[2e] and neg[2e + 1]).
sentence-transformers >= 3 trains from a fixed `datasets.Dataset`, which would freeze one triple per query. So:

- make_train_dataset() builds a Dataset of E x N virtual rows (one int column, "row"); row j is query
  i = j % N in epoch e = j // N, and a transform turns it into {"query", "positive", "negative"[, "label"]}
  when the data loader reads it;
- EpochRotationBatchSampler, which the trainer builds and calls set_epoch(e) on at the start of every
  epoch, yields in epoch e the rows e*N + perm_e, perm_e a permutation of range(N) seeded by (seed, e).

Everything is a pure function of (seed, epoch, index): data-loader workers, several GPUs (accelerate
shards the batches of one sampler) and resuming mid-epoch all see the same examples. With N processes the
sampler yields global batches of N batches and spreads the last one over the processes (batch_bounds), so that
each query is visited once per epoch; accelerate's even_batches, which would pad it with the epoch's first rows,
must be off.

Trainer configuration:
    args = SparseEncoderTrainingArguments(..., num_train_epochs=E, batch_sampler=EpochRotationBatchSampler,
                                          accelerator_config={"even_batches": False})
    trainer = SparseEncoderTrainer(model, args, train_dataset=make_train_dataset(ts, E), loss=loss)
"""

import datasets
import numpy as np
import torch.distributed as dist
from sentence_transformers.base.sampler import DefaultBatchSampler

from errors import UserError


class RotationError(UserError, ValueError):
    """A training set or an epoch count that cannot be trained (e.g. --epochs 0)."""


class RotationTransform:
    """Maps a batch of virtual rows to texts. A plain class (not a closure) so that it pickles."""

    def __init__(self, training_set, with_labels):
        self.ts = training_set
        self.with_labels = with_labels

    def __call__(self, batch):
        rows = np.asarray(batch["row"], dtype=np.int64)
        epoch, query = np.divmod(rows, len(self.ts))
        pos_rows, pos_ce, neg_rows, neg_ce = self.ts.rotation(query, epoch)
        texts = self.ts.passages.text
        out = {
            "query": [self.ts.queries.text(i) for i in query.tolist()],
            "positive": [texts(k) for k in pos_rows.tolist()],
            "negative": [texts(k) for k in neg_rows.tolist()],
        }
        if self.with_labels:  # MarginMSE target: CE(query, pos) - CE(query, neg)
            out["label"] = (pos_ce.astype(np.float64) - neg_ce.astype(np.float64)).tolist()
        return out


def make_train_dataset(training_set, epochs, with_labels=False):
    """A datasets.Dataset of epochs x len(training_set) rows with columns query, positive, negative[, label].

    Train it with num_train_epochs=epochs and batch_sampler=EpochRotationBatchSampler.
    """
    n = len(training_set)
    if n == 0 or epochs < 1:
        raise RotationError(f"need at least one query and one epoch, got {n} queries and {epochs} epochs")
    dataset = datasets.Dataset.from_dict({"row": np.arange(epochs * n, dtype=np.int64)})
    dataset.set_transform(RotationTransform(training_set, with_labels))
    dataset.rotation_queries_per_epoch = n  # read by EpochRotationBatchSampler
    return dataset


class EpochRotationBatchSampler(DefaultBatchSampler):
    """In epoch e (set by the trainer through set_epoch), batches of rows e*N + perm_e, perm_e seeded by (seed, e)."""

    def __init__(self, dataset, batch_size, drop_last, valid_label_columns=None, generator=None, seed=0):
        super().__init__(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            valid_label_columns=valid_label_columns,
            # The order comes from numpy, seeded by (seed, epoch). A torch.Generator would also travel to every
            # data-loader worker (the dataset's set_epoch below holds this sampler), and under `spawn` torch
            # cannot share its state tensor ("unable to resize file"): keep none.
            generator=None,
            seed=seed,
        )
        self.queries_per_epoch = getattr(dataset, "rotation_queries_per_epoch", None)
        if self.queries_per_epoch is None:
            raise ValueError("EpochRotationBatchSampler needs the dataset made by data.rotation.make_train_dataset")
        self.num_epochs = len(dataset) // self.queries_per_epoch
        processes = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.batch_bounds = batch_bounds(self.queries_per_epoch, batch_size, processes, drop_last)
        self.seed = 0 if seed is None else seed
        # The trainer reaches this sampler's set_epoch through accelerate's wrappers, except when several
        # processes resume mid-epoch (SkipBatchSampler around BatchSamplerShard); DataLoaderShard.set_epoch
        # then falls back to dataset.set_epoch, so give the dataset one.
        dataset.set_epoch = self.set_epoch

    def __len__(self):
        return len(self.batch_bounds)

    def __iter__(self):
        if self.epoch >= self.num_epochs:
            raise ValueError(
                f"epoch {self.epoch} asked of a dataset made for {self.num_epochs} epochs: "
                f"make_train_dataset(ts, epochs) must get at least the trainer's num_train_epochs"
            )
        n = self.queries_per_epoch
        rows = np.random.default_rng([self.seed % 2**63, self.epoch]).permutation(n) + self.epoch * n
        for start, end in self.batch_bounds:
            yield rows[start:end].tolist()


def batch_bounds(queries: int, batch_size: int, processes: int, drop_last: bool) -> list[tuple[int, int]]:
    """(start, end) of each batch in an epoch's order, in global batches of `processes` batches (accelerate hands
    batch k to process k mod processes). Full batches, then, unless drop_last, the rest spread over the processes
    (sizes differing by at most one; with fewer rows left than processes, the last full global batch is spread
    with them), so that every query is visited exactly once. One process: the last batch is the smaller one.
    drop_last: the rows that do not fill a global batch are not visited in this epoch (one process: the
    original's drop_last, fewer than batch_size rows; N processes: fewer than N x batch_size).
    accelerate's even_batches would instead fill the last global batch with rows from the start of the epoch,
    training those queries twice, and sentence-transformers forces drop_last under DDP: train_max turns both off."""
    per_global = processes * batch_size
    full, left = divmod(queries, per_global)
    bounds = [(start, start + batch_size) for start in range(0, full * per_global, batch_size)]
    if drop_last or left == 0:
        return bounds
    if left < processes:
        if full == 0:
            raise RotationError(f"{queries} training queries for {processes} processes: each needs at least one")
        del bounds[-processes:]
        left += per_global
    start = queries - left
    for process in range(processes):
        size = left // processes + (process < left % processes)
        bounds.append((start, start + size))
        start += size
    return bounds
