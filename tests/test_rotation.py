"""data.rotation: per-epoch rotation of positives and negatives through sentence-transformers' trainer.

Every test builds its files in tmp_path in the real formats (or copies data/sample there): offline.
"""

import json
import os

import pytest

from conftest import passages_for, positives_of, write_files
from data.mining import mine_distill_examples, mine_max_examples
from data.rotation import EpochRotationBatchSampler, RotationError, batch_bounds, make_train_dataset


@pytest.fixture
def rotation_set(tmp_path):
    n = 10
    lines = [
        {"qid": q, "pos": [1000 + q, 2000 + q], "neg": {"s": [3000 + 10 * q + k for k in range(4)]}} for q in range(n)
    ]
    scores = {
        q: {**{1000 + q: 5.0, 2000 + q: 6.0}, **{3000 + 10 * q + k: float(-k) for k in range(4)}} for q in range(n)
    }
    pids = [p for line in lines for p in line["pos"] + line["neg"]["s"]]
    write_files(tmp_path, passages_for(pids), {q: f"query {q}" for q in range(n)}, lines, scores)
    return mine_max_examples(tmp_path, num_negs_per_system=4, seed=3, download=False)


def run_sampler(dataset, epoch, batch_size=3, drop_last=False, seed=11):
    sampler = EpochRotationBatchSampler(dataset, batch_size=batch_size, drop_last=drop_last, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def test_rotation_visits_every_query_once_and_changes_negatives(rotation_set):
    ts, n = rotation_set, len(rotation_set)
    ds = make_train_dataset(ts, epochs=4)
    seen = {}
    for epoch in range(4):
        batches = run_sampler(ds, epoch)
        assert len(batches) == 4 and [len(b) for b in batches] == [3, 3, 3, 1]
        rows = [r for b in batches for r in b]
        assert sorted(rows) == list(range(epoch * n, (epoch + 1) * n))  # every query once
        examples = {ds[r]["query"]: (ds[r]["positive"], ds[r]["negative"]) for r in rows}
        for i in range(n):
            query, pos, neg, _ = ts.example(i, epoch)
            assert examples[query] == (pos, neg)
            assert pos == f"passage number {positives_of(ts, i)[epoch % 2]}"  # positives in file order
        seen[epoch] = examples
    for query in seen[0]:  # four epochs, four different negatives: the whole shuffled list once
        assert len({seen[e][query][1] for e in range(4)}) == 4
        assert seen[1][query][0] != seen[0][query][0] and seen[2][query][0] == seen[0][query][0]

    def order(epoch):
        return [r % n for b in run_sampler(ds, epoch) for r in b]

    assert order(0) != order(1)  # a new query order every epoch
    assert run_sampler(ds, 1) == run_sampler(ds, 1)  # ... that is a pure function of (seed, epoch)
    assert len(EpochRotationBatchSampler(ds, batch_size=3, drop_last=True)) == 3
    assert [len(b) for b in run_sampler(ds, 0, drop_last=True)] == [3, 3, 3]
    with pytest.raises(ValueError, match="made for 4 epochs"):
        run_sampler(ds, 4)


def test_negative_order_is_shuffled_once_from_the_seed(rotation_set, tmp_path):
    ts = rotation_set
    order = [[int(ts.passages.ids[k]) for k in ts.neg_idx[ts.neg_ptr[i] : ts.neg_ptr[i + 1]]] for i in range(len(ts))]
    assert any(o != sorted(o) for o in order)  # not file order
    again = mine_max_examples(ts.report["data_dir"], num_negs_per_system=4, seed=3, download=False)
    assert [
        [int(again.passages.ids[k]) for k in again.neg_idx[again.neg_ptr[i] : again.neg_ptr[i + 1]]]
        for i in range(len(ts))
    ] == order
    other = mine_max_examples(ts.report["data_dir"], num_negs_per_system=4, seed=4, download=False)
    assert [
        [int(other.passages.ids[k]) for k in other.neg_idx[other.neg_ptr[i] : other.neg_ptr[i + 1]]]
        for i in range(len(ts))
    ] != order


class RecordingCollator:
    """Wraps the trainer's collator and appends every batch's texts to a file (works from worker processes)."""

    def __init__(self, inner, path):
        self.inner, self.path = inner, path

    def __getattr__(self, name):
        if name == "inner":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, features):
        with open(self.path, "a") as f:
            f.write(
                json.dumps({"pid": os.getpid(), "rows": [[x["query"], x["positive"], x["negative"]] for x in features]})
                + "\n"
            )
        return self.inner(features)


def test_sentence_transformers_trainer_sees_the_rotation(rotation_set, splade_tiny_path, tmp_path):
    """A real SparseEncoderTrainer, 2 epochs, 2 data-loader workers: the collator gets epoch e's texts."""
    from sentence_transformers import SparseEncoder, SparseEncoderTrainer, SparseEncoderTrainingArguments
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    ts = rotation_set
    model = SparseEncoder(splade_tiny_path)
    model.max_seq_length = 16
    loss = SpladeLoss(
        model, SparseMultipleNegativesRankingLoss(model), query_regularizer_weight=0, document_regularizer_weight=0
    )
    args = SparseEncoderTrainingArguments(
        output_dir=str(tmp_path / "out"),
        num_train_epochs=2,
        per_device_train_batch_size=5,
        batch_sampler=EpochRotationBatchSampler,
        dataloader_num_workers=2,
        report_to="none",
        save_strategy="no",
        seed=7,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SparseEncoderTrainer(model=model, args=args, train_dataset=make_train_dataset(ts, epochs=2), loss=loss)
    record = tmp_path / "batches.jsonl"
    trainer.data_collator = RecordingCollator(trainer.data_collator, record)
    trainer.train()

    batches = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(batches) == 4 and len({b["pid"] for b in batches}) > 1  # two batches per epoch, from workers
    for epoch in range(2):
        got = sorted(tuple(row) for b in batches[2 * epoch : 2 * epoch + 2] for row in b["rows"])
        assert got == sorted(ts.example(i, epoch)[:3] for i in range(len(ts)))
    first = {row[0]: row[2] for b in batches[:2] for row in b["rows"]}
    second = {row[0]: row[2] for b in batches[2:] for row in b["rows"]}
    assert all(first[q] != second[q] for q in first)  # epoch 2 brings each query a new negative


def test_epoch_reaches_the_sampler_through_accelerate_wrappers(rotation_set):
    """Multi-GPU resume: accelerate wraps the sampler in BatchSamplerShard, then SkipBatchSampler."""
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard, skip_first_batches

    ds = make_train_dataset(rotation_set, epochs=4)
    sampler = EpochRotationBatchSampler(ds, batch_size=2, drop_last=True, seed=5)
    loader = DataLoaderShard(ds, batch_sampler=BatchSamplerShard(sampler, num_processes=2, process_index=1))
    resumed = skip_first_batches(loader, 1)
    resumed.set_epoch(3)
    assert sampler.epoch == 3
    rows = [r for batch in resumed.batch_sampler for r in batch]
    assert all(30 <= r < 40 for r in rows)  # epoch 3's rows, this rank's share after the skipped batch


def test_batch_bounds_visit_every_query_once_for_any_number_of_processes():
    for processes in range(1, 5):
        for batch_size in range(1, 6):
            for queries in range(1, 41):
                if queries < processes:
                    with pytest.raises(RotationError, match="each needs at least one"):
                        batch_bounds(queries, batch_size, processes, drop_last=False)
                    continue
                bounds = batch_bounds(queries, batch_size, processes, drop_last=False)
                case = (queries, batch_size, processes)
                assert [start for start, _ in bounds] == [0] + [end for _, end in bounds[:-1]], case  # contiguous
                assert bounds[-1][1] == queries, case  # ... to the end: every query once
                assert len(bounds) % processes == 0, case  # every process takes the same number of steps
                for first in range(0, len(bounds), processes):  # one global batch: shares differ by at most one
                    sizes = [end - start for start, end in bounds[first : first + processes]]
                    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= (first + processes == len(bounds)), case
                assert max(end - start for start, end in bounds) <= batch_size + 1, case
                if processes == 1:  # one process: the original's batches, the last one smaller
                    assert bounds == [(s, min(s + batch_size, queries)) for s in range(0, queries, batch_size)]
                dropped = batch_bounds(queries, batch_size, processes, drop_last=True)
                global_batches = queries // (processes * batch_size)
                assert dropped == [
                    (s, s + batch_size) for s in range(0, global_batches * processes * batch_size, batch_size)
                ]


def test_accelerate_without_even_batches_hands_each_process_its_share_once(rotation_set):
    """accelerate's BatchSamplerShard as torchrun uses it: batch k to process k mod N. The sampler's global batches
    without even_batches: each query once, the same number of steps everywhere (also when fewer rows than processes
    are left: 10 queries, batches of 3, 3 processes). What it replaces, one process's batches with even_batches
    (accelerate's default): the last global batch is padded with the epoch's first rows, trained twice."""
    from accelerate.data_loader import BatchSamplerShard

    def shards(batch_size, processes, bounds_for, even_batches):
        sampler = EpochRotationBatchSampler(make_train_dataset(rotation_set, 1), batch_size, drop_last=False, seed=5)
        sampler.batch_bounds = batch_bounds(10, batch_size, bounds_for, drop_last=False)
        return [list(BatchSamplerShard(sampler, processes, i, even_batches=even_batches)) for i in range(processes)]

    for batch_size, processes in ((3, 2), (4, 2), (3, 3)):
        ours = shards(batch_size, processes, bounds_for=processes, even_batches=False)
        assert len({len(shard) for shard in ours}) == 1, (batch_size, processes)
        assert sorted(row for shard in ours for batch in shard for row in batch) == list(range(10))
        padded = shards(batch_size, processes, bounds_for=1, even_batches=True)
        rows = [row for shard in padded for batch in shard for row in batch]
        assert len(rows) > len(set(rows)) == 10, (batch_size, processes)


def test_resuming_mid_epoch_replays_the_same_examples(rotation_set, splade_tiny_path, tmp_path):
    from sentence_transformers import SparseEncoder, SparseEncoderTrainer, SparseEncoderTrainingArguments
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    def run(record, resume=None):
        model = SparseEncoder(splade_tiny_path)
        model.max_seq_length = 16
        loss = SpladeLoss(
            model, SparseMultipleNegativesRankingLoss(model), query_regularizer_weight=0, document_regularizer_weight=0
        )
        args = SparseEncoderTrainingArguments(
            output_dir=str(tmp_path / "out"),
            num_train_epochs=2,
            per_device_train_batch_size=5,
            batch_sampler=EpochRotationBatchSampler,
            report_to="none",
            save_strategy="steps",
            save_steps=3,
            seed=7,
            use_cpu=True,
            disable_tqdm=True,
        )
        trainer = SparseEncoderTrainer(
            model=model, args=args, train_dataset=make_train_dataset(rotation_set, 2), loss=loss
        )
        trainer.data_collator = RecordingCollator(trainer.data_collator, record)
        trainer.train(resume_from_checkpoint=resume)
        return [json.loads(line)["rows"] for line in record.read_text().splitlines()]

    full = run(tmp_path / "full.jsonl")
    resumed = run(tmp_path / "resumed.jsonl", resume=str(tmp_path / "out" / "checkpoint-3"))
    assert len(full) == 4 and resumed == full[3:]  # step 4 = epoch 2's second batch, same texts


def original_rotation(ts, epochs):
    """The original scripts' stateful __getitem__, replayed: each visit pops the first entry of a list and appends
    it at the end; a query without positives pops two negatives (train_distill --use_all_queries)."""

    def entries(idx, ce, ptr, i):
        return list(zip(idx[ptr[i] : ptr[i + 1]].tolist(), ce[ptr[i] : ptr[i + 1]].tolist()))

    pos = [entries(ts.pos_idx, ts.pos_ce, ts.pos_ptr, i) for i in range(len(ts))]
    neg = [entries(ts.neg_idx, ts.neg_ce, ts.neg_ptr, i) for i in range(len(ts))]

    def pop_append(items):
        items.append(items.pop(0))
        return items[-1]

    seen = []
    for _ in range(epochs):
        for i in range(len(ts)):
            p, p_ce = pop_append(pos[i]) if pos[i] else pop_append(neg[i])
            n, n_ce = pop_append(neg[i])
            seen.append((ts.passages.text(p), ts.passages.text(n), p_ce - n_ce))
    return seen


def test_distill_query_without_positives_takes_two_negatives_per_epoch(tmp_path):
    lines = [
        {"qid": 1, "pos": [], "neg": {"s": [11, 12, 13]}},
        {"qid": 2, "pos": [20, 21], "neg": {"s": [22, 23, 24]}},
        {"qid": 3, "pos": [], "neg": {"s": [31]}},  # one negative: "positive" and negative are the same passage
    ]
    scores = {1: {11: 1.0, 12: 2.0, 13: 4.0}, 2: {20: 9.0, 21: 8.0, 22: 1.0, 23: 2.0, 24: 3.0}, 3: {31: 0.5}}
    pids = [11, 12, 13, 20, 21, 22, 23, 24, 31]
    write_files(tmp_path, passages_for(pids), {1: "q1", 2: "q2", 3: "q3"}, lines, scores)
    ts = mine_distill_examples(tmp_path, use_all_queries=True, download=False)
    assert positives_of(ts, 0) == [] and positives_of(ts, 2) == []

    def shuffled(i):
        return [int(ts.passages.ids[k]) for k in ts.neg_idx[ts.neg_ptr[i] : ts.neg_ptr[i + 1]]]

    o, ce = shuffled(0), scores[1]
    # Query 1, two negatives per epoch from its shuffled list [o0, o1, o2]: (o0, o1), (o2, o0), (o1, o2), (o0, o1).
    for epoch, (a, b) in enumerate([(0, 1), (2, 0), (1, 2), (0, 1)]):
        query, pos, neg, label = ts.example(0, epoch)
        assert (query, pos, neg) == ("q1", f"passage number {o[a]}", f"passage number {o[b]}")
        assert label == pytest.approx(ce[o[a]] - ce[o[b]])
    # Query 2 has positives: unchanged, pos[e mod 2] and neg[e mod 3].
    o2 = shuffled(1)
    for epoch in range(4):
        pos_id, neg_id = (20, 21)[epoch % 2], o2[epoch % 3]
        assert ts.example(1, epoch) == (
            "q2",
            f"passage number {pos_id}",
            f"passage number {neg_id}",
            pytest.approx(scores[2][pos_id] - scores[2][neg_id]),
        )
    assert ts.example(2, 3) == ("q3", "passage number 31", "passage number 31", 0.0)

    epochs = 5
    ds = make_train_dataset(ts, epochs, with_labels=True)  # the rows the trainer reads, in query order
    rows = [ds[r] for r in range(epochs * len(ts))]
    assert [(r["positive"], r["negative"], pytest.approx(r["label"])) for r in rows] == original_rotation(ts, epochs)
