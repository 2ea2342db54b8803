"""data/: downloads, readers, the safe CE-score loader, example mining, per-epoch rotation, the sample.

Every test builds its files in tmp_path in the real formats (or copies data/sample there): offline.
"""

import gzip
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import data.download as download
from data.ce_scores import UnsafePickleError, load_ce_scores
from data.mining import mine_distill_examples, mine_max_examples
from data.readers import DataError
from data.rotation import EpochRotationBatchSampler, make_train_dataset

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample"
CE = "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"
HN = "msmarco-hard-negatives.jsonl.gz"


# ---------------------------------------------------------------- building files in the real formats


def write_files(d, passages, queries, lines, scores, *, raw_lines=None, scores_bytes=None):
    """collection.tsv, queries.train.tsv, msmarco-hard-negatives.jsonl.gz, the CE-scores gzip pickle."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "collection.tsv").write_text("".join(f"{pid}\t{text}\n" for pid, text in passages.items()))
    (d / "queries.train.tsv").write_text("".join(f"{qid}\t{text}\n" for qid, text in queries.items()))
    text = raw_lines if raw_lines is not None else "".join(json.dumps(line) + "\n" for line in lines)
    (d / HN).write_bytes(gzip.compress(text.encode()))
    (d / CE).write_bytes(gzip.compress(scores_bytes if scores_bytes is not None else pickle.dumps(scores)))
    return d


def passages_for(*pid_lists):
    return {pid: f"passage number {pid}" for pids in pid_lists for pid in pids}


@pytest.fixture
def filter_case(tmp_path):
    """One query, two positives (CE 5 and 3: threshold = 3 - margin 3 = 0), two systems."""
    neg = {"sysA": [20, 21, 22, 23, 24, 25], "sysB": [21, 30, 31, 32], "sysC": [40, 41]}
    scores = {1: {10: 5.0, 11: 3.0, 20: 4.0, 21: -1.0, 22: 0.0, 23: -2.0, 24: -3.0, 25: -4.0,
                  30: 0.5, 31: -0.5, 32: -0.75, 40: -5.0, 41: -6.0}}
    lines = [{"qid": 1, "pos": [10, 11], "neg": neg}]
    write_files(tmp_path, passages_for([10, 11, 20, 21, 22, 23, 24, 25, 30, 31, 32, 40, 41]),
                {1: "what is one"}, lines, scores)
    return tmp_path


def negatives_of(ts, i=0):
    return {int(ts.passages.ids[k]) for k in ts.neg_idx[ts.neg_ptr[i] : ts.neg_ptr[i + 1]]}


def positives_of(ts, i=0):
    return [int(ts.passages.ids[k]) for k in ts.pos_idx[ts.pos_ptr[i] : ts.pos_ptr[i + 1]]]


# ---------------------------------------------------------------- mining (SPEC.md, train_max / train_distill)


def test_max_filter_and_per_system_counts(filter_case):
    ts = mine_max_examples(filter_case, num_negs_per_system=2, ce_score_margin=3.0, download=False)
    # sysA: 20 (CE 4.0 > 0) skipped; 21, 22 (CE 0.0 = threshold is kept) chosen.
    # sysB: 21 already chosen, 30 (0.5 > 0) skipped, 31 and 32 chosen. sysC: 40, 41.
    assert negatives_of(ts) == {21, 22, 31, 32, 40, 41}
    assert positives_of(ts) == [10, 11]
    r = ts.report
    assert r["negatives_per_system"] == {"sysA": 2, "sysB": 2, "sysC": 2}
    assert r["negatives_skipped"] == {"above_ce_threshold": 2, "already_chosen": 1}
    assert r["systems_used"] == ["sysA", "sysB", "sysC"]
    assert r["queries_read"] == 1 and r["queries_kept"] == 1 and r["passages_referenced"] == 8

    # An explicit list, in its order: sysB takes 21; then sysA skips 20 (CE) and 21 (chosen) and takes 22.
    for negs_to_use in ("sysB,sysA", ["sysB", "sysA"]):
        ts = mine_max_examples(filter_case, num_negs_per_system=1, negs_to_use=negs_to_use, download=False)
        assert negatives_of(ts) == {21, 22}
        assert ts.report["negatives_per_system"] == {"sysB": 1, "sysA": 1}
        assert ts.report["systems_used"] == ["sysB", "sysA"]

    with pytest.raises(ValueError, match="sysZ"):
        mine_max_examples(filter_case, negs_to_use="sysA,sysZ", download=False)


def test_systems_default_to_the_union_over_the_file(tmp_path):
    lines = [{"qid": 1, "pos": [1], "neg": {"bm25": [2]}},
             {"qid": 2, "pos": [3], "neg": {"bm25": [4], "tas-b": [5]}}]
    scores = {1: {1: 9.0, 2: 0.0}, 2: {3: 9.0, 4: 0.0, 5: 0.0}}
    write_files(tmp_path, passages_for(range(1, 6)), {1: "a", 2: "b"}, lines, scores)
    ts = mine_max_examples(tmp_path, download=False)
    assert ts.report["systems_used"] == ["bm25", "tas-b"]  # the original took the first line's: bm25 only
    assert ts.report["negatives_per_system"] == {"bm25": 2, "tas-b": 1}
    assert negatives_of(ts, 1) == {4, 5}


def test_use_all_queries_keeps_queries_without_negatives(tmp_path):
    lines = [{"qid": 1, "pos": [1], "neg": {"s": [2, 3, 4]}},
             {"qid": 2, "pos": [5], "neg": {"s": [6, 1]}}]  # query 2: every negative above threshold
    scores = {1: {1: 5.0, 2: 0.0, 3: 0.0, 4: 0.0}, 2: {5: 5.0, 6: 4.0, 1: 4.5}}
    write_files(tmp_path, passages_for(range(1, 7)), {1: "a", 2: "b"}, lines, scores)

    ts = mine_max_examples(tmp_path, download=False)
    assert list(ts.qids) == [1]
    assert ts.report["queries_dropped"] == {"no_negative_after_ce_filter": 1}

    ts = mine_max_examples(tmp_path, use_all_queries=True, num_negs_per_system=2, download=False)
    assert list(ts.qids) == [1, 2]
    assert ts.report["queries_with_random_negatives"] == 1
    random_negs = negatives_of(ts, 1)
    assert len(random_negs) == 2 and random_negs <= {2, 3, 4} and 5 not in random_negs
    for epoch in range(3):  # it trains without the original's IndexError
        assert ts.example(1, epoch)[1] == "passage number 5"


def test_distill_labels_no_filter_and_max_passages(tmp_path):
    lines = [{"qid": q, "pos": [100 + q], "neg": {"s": [200 + q, 300 + q]}} for q in range(1, 5)]
    scores = {q: {100 + q: 2.0 + q, 200 + q: 9.0, 300 + q: -1.5} for q in range(1, 5)}
    write_files(tmp_path, passages_for(range(100, 400)), {q: f"query {q}" for q in range(1, 5)}, lines, scores)

    ts = mine_distill_examples(tmp_path, max_passages=3, download=False)
    assert list(ts.qids) == [1, 2, 3] and ts.report["queries_read"] == 3
    assert negatives_of(ts, 0) == {201, 301}  # no CE filter: 201 scores above the positive and stays
    labels = {ts.example(0, e)[2]: ts.example(0, e)[3] for e in range(2)}
    assert labels == {"passage number 201": pytest.approx(3.0 - 9.0), "passage number 301": pytest.approx(3.0 + 1.5)}

    ds = make_train_dataset(ts, epochs=2, with_labels=True)
    assert list(ds[0].keys()) == ["query", "positive", "negative", "label"]
    row = ds[4]  # epoch 1, query 1
    assert row["query"] == "query 2" and row["label"] == pytest.approx(ts.example(1, 1)[3])
    assert list(make_train_dataset(ts, epochs=1)[0].keys()) == ["query", "positive", "negative"]


# ---------------------------------------------------------------- rotation (SPEC.md, per-epoch sampling)


@pytest.fixture
def rotation_set(tmp_path):
    n = 10
    lines = [{"qid": q, "pos": [1000 + q, 2000 + q], "neg": {"s": [3000 + 10 * q + k for k in range(4)]}}
             for q in range(n)]
    scores = {q: {**{1000 + q: 5.0, 2000 + q: 6.0}, **{3000 + 10 * q + k: float(-k) for k in range(4)}}
              for q in range(n)}
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
    assert [[int(again.passages.ids[k]) for k in again.neg_idx[again.neg_ptr[i] : again.neg_ptr[i + 1]]]
            for i in range(len(ts))] == order
    other = mine_max_examples(ts.report["data_dir"], num_negs_per_system=4, seed=4, download=False)
    assert [[int(other.passages.ids[k]) for k in other.neg_idx[other.neg_ptr[i] : other.neg_ptr[i + 1]]]
            for i in range(len(ts))] != order


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
            f.write(json.dumps({"pid": os.getpid(), "rows": [[x["query"], x["positive"], x["negative"]]
                                                              for x in features]}) + "\n")
        return self.inner(features)


def test_sentence_transformers_trainer_sees_the_rotation(rotation_set, splade_tiny_path, tmp_path):
    """A real SparseEncoderTrainer, 2 epochs, 2 data-loader workers: the collator gets epoch e's texts."""
    from sentence_transformers import SparseEncoder, SparseEncoderTrainer, SparseEncoderTrainingArguments
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    ts = rotation_set
    model = SparseEncoder(splade_tiny_path)
    model.max_seq_length = 16
    loss = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), query_regularizer_weight=0,
                      document_regularizer_weight=0)
    args = SparseEncoderTrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=5,
        batch_sampler=EpochRotationBatchSampler, dataloader_num_workers=2, report_to="none",
        save_strategy="no", seed=7, use_cpu=True, disable_tqdm=True,
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


def test_resuming_mid_epoch_replays_the_same_examples(rotation_set, splade_tiny_path, tmp_path):
    from sentence_transformers import SparseEncoder, SparseEncoderTrainer, SparseEncoderTrainingArguments
    from sentence_transformers.sparse_encoder.losses import SparseMultipleNegativesRankingLoss, SpladeLoss

    def run(record, resume=None):
        model = SparseEncoder(splade_tiny_path)
        model.max_seq_length = 16
        loss = SpladeLoss(model, SparseMultipleNegativesRankingLoss(model), query_regularizer_weight=0,
                          document_regularizer_weight=0)
        args = SparseEncoderTrainingArguments(
            output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=5,
            batch_sampler=EpochRotationBatchSampler, report_to="none", save_strategy="steps", save_steps=3,
            seed=7, use_cpu=True, disable_tqdm=True,
        )
        trainer = SparseEncoderTrainer(model=model, args=args, train_dataset=make_train_dataset(rotation_set, 2),
                                       loss=loss)
        trainer.data_collator = RecordingCollator(trainer.data_collator, record)
        trainer.train(resume_from_checkpoint=resume)
        return [json.loads(line)["rows"] for line in record.read_text().splitlines()]

    full = run(tmp_path / "full.jsonl")
    resumed = run(tmp_path / "resumed.jsonl", resume=str(tmp_path / "out" / "checkpoint-3"))
    assert len(full) == 4 and resumed == full[3:]  # step 4 = epoch 2's second batch, same texts


# ---------------------------------------------------------------- bad input: a clear error or a counted skip


def test_missing_file_names_it_and_the_download_command(filter_case):
    (filter_case / HN).unlink()
    with pytest.raises(FileNotFoundError) as err:
        mine_max_examples(filter_case, download=False)
    assert HN in str(err.value) and f"python -m data.download train --data_dir {filter_case}" in str(err.value)


def test_truncated_gzip_is_an_error(filter_case):
    blob = gzip.compress(("".join(json.dumps({"qid": q, "pos": [10], "neg": {"s": [21]}}) + "\n"
                                  for q in range(2000))).encode())
    (filter_case / HN).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=f"{HN}: truncated or corrupt gzip"):
        mine_max_examples(filter_case, download=False)


def test_truncated_scores_pickle_is_an_error(filter_case):
    blob = (filter_case / CE).read_bytes()
    (filter_case / CE).write_bytes(blob[:-12])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        mine_max_examples(filter_case, download=False)


def test_malformed_json_line_names_file_and_line(tmp_path):
    good = json.dumps({"qid": 1, "pos": [1], "neg": {"s": [2]}})
    write_files(tmp_path, passages_for([1, 2]), {1: "a"}, None, {1: {1: 1.0, 2: 0.0}},
                raw_lines=good + "\n" + '{"qid": 2, "pos": [1], "neg": {"s": [2}\n')
    with pytest.raises(DataError, match=rf"{HN}:2: malformed JSON"):
        mine_max_examples(tmp_path, download=False)
    write_files(tmp_path, passages_for([1, 2]), {1: "a"}, None, {1: {1: 1.0, 2: 0.0}},
                raw_lines=good + "\n" + json.dumps({"qid": 2, "pos": ["1"], "neg": {}}) + "\n")
    with pytest.raises(DataError, match=rf'{HN}:2: "pos" holds \'1\''):
        mine_max_examples(tmp_path, download=False)


def test_missing_ids_and_empty_positives_are_counted_skips(tmp_path):
    lines = [
        {"qid": 1, "pos": [1], "neg": {"s": [2, 3]}},  # good; negative 3 is not in the collection
        {"qid": 2, "pos": [], "neg": {"s": [2]}},  # empty pos
        {"qid": 3, "pos": [1], "neg": {"s": [2]}},  # not in queries.train.tsv
        {"qid": 4, "pos": [1], "neg": {"s": [2]}},  # not in the CE scores
        {"qid": 5, "pos": [9], "neg": {"s": [2]}},  # positive not in the collection
        {"qid": 6, "pos": [1], "neg": {"s": [2, 7]}},  # negative 7 has no CE score
    ]
    scores = {1: {1: 5.0, 2: 0.0, 3: 0.0}, 2: {2: 0.0}, 3: {1: 5.0, 2: 0.0}, 5: {9: 5.0, 2: 0.0},
              6: {1: 5.0, 2: 0.0}}
    write_files(tmp_path, passages_for([1, 2]), {q: f"q{q}" for q in (1, 2, 4, 5, 6)}, lines, scores)
    for ts in (mine_max_examples(tmp_path, download=False), mine_distill_examples(tmp_path, download=False)):
        r = ts.report
        assert list(ts.qids) == [1, 6]
        assert r["queries_read"] == 6
        assert r["queries_dropped"] == {"no_positive": 1, "qid_not_in_queries_file": 1, "qid_not_in_ce_scores": 1,
                                        "positives_not_in_collection": 1}
        assert r["negatives_skipped"] == {"no_ce_score": 1, "not_in_collection": 1}
        assert r["positives_skipped"] == {"not_in_collection": 1}
        assert negatives_of(ts, 0) == {2} and negatives_of(ts, 1) == {2}
        assert "dropped, qid_not_in_ce_scores: 1" in ts.format_report()


def test_bad_collection_line_names_file_and_line(filter_case):
    with open(filter_case / "collection.tsv", "a") as f:
        f.write("not-a-number\tsome text\n")
    with pytest.raises(DataError, match=r"collection.tsv:14: id b'not-a-number' is not an integer"):
        mine_max_examples(filter_case, download=False)


@pytest.mark.parametrize("payload, message", [
    ({1: {1: "5.0"}}, "holds '5.0'"),
    ({1: {"1": 5.0}}, "has key '1'"),
    ({1: [5.0]}, "is a list, not a dict"),
    ({1: {1: True}}, "holds True"),
    ([(1, 1, 5.0)], "found list"),
    ({"1": {1: 5.0}}, "query id '1'"),
])
def test_scores_pickle_with_other_types_is_refused(filter_case, payload, message):
    (filter_case / CE).write_bytes(gzip.compress(pickle.dumps(payload)))
    with pytest.raises(UnsafePickleError, match=message):
        mine_max_examples(filter_case, download=False)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_run(filter_case, tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({1: {10: 5.0, 11: Payload(marker)}})
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))  # the payload does run when unpickled plainly
    assert (tmp_path / "control").exists()
    (filter_case / CE).write_bytes(gzip.compress(evil))
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os)\.system"):
        mine_max_examples(filter_case, download=False)
    assert not marker.exists()
    evil = pickle.dumps({1: {10: 5.0}, 2: Payload(marker)}, protocol=0)  # the text protocol, same refusal
    (filter_case / CE).write_bytes(gzip.compress(evil))
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        load_ce_scores(filter_case / CE)
    assert not marker.exists()


def test_scores_are_cached_and_the_cache_follows_the_file(filter_case, monkeypatch):
    import data.ce_scores as ce_scores

    first = load_ce_scores(filter_case / CE)
    assert len(list(filter_case.glob(f"{CE}.cache-*.npz"))) == 1
    monkeypatch.setattr(ce_scores, "safe_load_pickle_gz", lambda path: pytest.fail("unpickled again"))
    second = load_ce_scores(filter_case / CE)
    assert second.row(1) == first.row(1) == {10: 5.0, 11: 3.0, 20: 4.0, 21: -1.0, 22: 0.0, 23: -2.0, 24: -3.0,
                                             25: -4.0, 30: 0.5, 31: -0.5, 32: -0.75, 40: -5.0, 41: -6.0}
    monkeypatch.undo()
    (filter_case / CE).write_bytes(gzip.compress(pickle.dumps({1: {10: 1.0}})))
    os.utime(filter_case / CE, ns=(1, 1))  # a new file (size and mtime): a new cache, the old one removed
    assert load_ce_scores(filter_case / CE).row(1) == {10: 1.0}
    assert len(list(filter_case.glob(f"{CE}.cache-*.npz"))) == 1


# ---------------------------------------------------------------- the bundled sample


def test_sample_loads_through_the_real_code_path(tmp_path):
    data_dir = shutil.copytree(SAMPLE, tmp_path / "sample")
    ts = mine_max_examples(data_dir, download=False)
    r = ts.report
    assert r["queries_read"] == r["queries_kept"] == len(ts) == 1200
    assert r["negatives_skipped"]["above_ce_threshold"] > 50  # the planted false negatives are filtered
    assert r["negatives_per_query"]["min"] == 20  # 4 systems x 5
    ts.save_report(tmp_path / "run" / "mining_report.json")
    assert json.loads((tmp_path / "run" / "mining_report.json").read_text()) == r
    query, pos, neg, _ = ts.example(0, 0)
    assert query and pos != neg

    ts = mine_distill_examples(data_dir, max_passages=100, download=False)
    assert len(ts) == 100
    labels = [ts.example(i, 0)[3] for i in range(len(ts))]
    assert np.mean(labels) > 3  # the CE-like scores rank positives above negatives

    from data.mining import main

    main(["distill", "--data_dir", str(data_dir), "--max_passages", "7", "--no_download",
          "--report", str(tmp_path / "report.json")])
    assert json.loads((tmp_path / "report.json").read_text())["queries_kept"] == 7


def test_sample_is_what_make_sample_writes(tmp_path):
    from data.make_sample import write_sample

    write_sample(tmp_path)
    for name in ("collection.tsv", "queries.train.tsv", HN, CE, "queries.dev.small.tsv", "qrels.dev.small.tsv"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name
    assert sum(f.stat().st_size for f in SAMPLE.iterdir()) < 2_000_000
    qrels = [line.split("\t") for line in (SAMPLE / "qrels.dev.small.tsv").read_text().splitlines()]
    collection = {line.split("\t")[0] for line in (SAMPLE / "collection.tsv").read_text().splitlines()}
    assert len(qrels) == 150 and all(q[1] == "0" and q[3] == "1" and q[2] in collection for q in qrels)


# ---------------------------------------------------------------- downloads (a local HTTP server)


class FileServer:
    """Serves {path: bytes} on 127.0.0.1 with HTTP Range; can cut the first response after N bytes."""

    def __init__(self, files):
        self.files, self.cut_after, self.ranges = files, None, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng := self.headers.get("Range"):
                    server.ranges.append(rng)
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                if server.cut_after is not None:  # announce everything, send part, hang up
                    self.wfile.write(body[start : start + server.cut_after])
                    server.cut_after = None
                    self.close_connection = True
                    return
                self.wfile.write(body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer({})
    yield s
    s.close()


def test_download_resumes_an_interrupted_transfer(server, tmp_path):
    body = gzip.compress(os.urandom(300_000))  # incompressible: the file stays ~300 kB
    server.files["/f.gz"] = body
    server.cut_after = 100_000
    dest = tmp_path / "f.gz"
    md5 = hashlib.md5(body).hexdigest()
    with pytest.raises(RuntimeError, match="run the same command again to resume"):
        download.download_file(server.url + "/f.gz", dest, len(body), md5)
    assert not dest.exists() and (tmp_path / "f.gz.part").stat().st_size == 100_000
    download.download_file(server.url + "/f.gz", dest, len(body), md5)
    assert server.ranges == ["bytes=100000-"] and dest.read_bytes() == body
    assert not (tmp_path / "f.gz.part").exists()


def test_download_checks_size_md5_and_gzip(server, tmp_path):
    body = gzip.compress(b"x" * 1000)
    server.files["/a.gz"] = body
    with pytest.raises(RuntimeError, match="announces"):
        download.download_file(server.url + "/a.gz", tmp_path / "a.gz", len(body) + 1)
    with pytest.raises(RuntimeError, match="md5"):
        download.download_file(server.url + "/a.gz", tmp_path / "a.gz", len(body), "0" * 32)
    assert not (tmp_path / "a.gz.part").exists()  # a wrong complete file is deleted, not resumed
    server.files["/b.gz"] = body[:-10]  # truncated gzip, size unknown upstream
    with pytest.raises(RuntimeError, match="not a complete gzip file"):
        download.download_file(server.url + "/b.gz", tmp_path / "b.gz")
    assert not (tmp_path / "b.gz").exists()
    with pytest.raises(RuntimeError, match="HTTP 404"):
        download.download_file(server.url + "/nothing", tmp_path / "c")


def tar_gz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_download_train_then_mine(server, tmp_path, monkeypatch):
    """download=True fetches the four files (tarballs extracted, sizes and line counts checked), then mines."""
    src = shutil.copytree(SAMPLE, tmp_path / "src")
    collection = (src / "collection.tsv").read_bytes()
    queries = (src / "queries.train.tsv").read_bytes()
    server.files.update({
        "/collection.tar.gz": tar_gz({"collection.tsv": collection}),
        "/queries.tar.gz": tar_gz({"queries.train.tsv": queries, "queries.dev.tsv": b"1\tq\n",
                                   "queries.eval.tsv": b"2\tq\n", "../../evil.tsv": b"x"}),
        f"/{HN}": (src / HN).read_bytes(),
        f"/{CE}": (src / CE).read_bytes(),
    })
    sources = {path[1:]: download.Source(server.url + path, None, None) for path in server.files}
    sources["queries.tar.gz"] = download.Source(server.url + "/queries.tar.gz",
                                                len(server.files["/queries.tar.gz"]), None)  # a known size
    monkeypatch.setattr(download, "SOURCES", sources)
    monkeypatch.setattr(download, "LINE_COUNTS", {"collection.tsv": collection.count(b"\n"),
                                                  "queries.train.tsv": queries.count(b"\n")})
    data_dir = tmp_path / "msmarco-data"
    ts = mine_max_examples(data_dir, download=True)
    assert len(ts) == 1200
    assert sorted(p.name for p in data_dir.iterdir() if not p.name.endswith((".npz", ".lock"))) == sorted(
        ["collection.tar.gz", "collection.tsv", "queries.tar.gz", "queries.train.tsv", "queries.dev.tsv",
         "queries.eval.tsv", HN, CE])
    assert not (tmp_path / "evil.tsv").exists()

    monkeypatch.setattr(download, "LINE_COUNTS", {"collection.tsv": 5})
    (data_dir / "collection.tsv").unlink()
    with pytest.raises(RuntimeError, match="lines, expected 5"):
        download.download_collection(data_dir)
    assert not (data_dir / "collection.tsv").exists()


def test_download_eval_files(server, tmp_path, monkeypatch):
    qrels = b"2\t0\t20\t1\n3\t0\t30\t1\n"
    server.files.update({
        "/qrels.dev.small.tsv": qrels,
        "/queries.tar.gz": tar_gz({"queries.train.tsv": b"9\tq\n", "queries.dev.tsv": b"1\ta\n2\tb\n3\tc\n",
                                   "queries.eval.tsv": b"4\td\n"}),
        "/msmarco-test2019-queries.tsv.gz": gzip.compress(b"19\tdl19 query\n"),
        "/2019qrels-pass.txt": b"19 Q0 5 3\n",
        "/msmarco-test2020-queries.tsv.gz": gzip.compress(b"20\tdl20 query\n"),
        "/2020qrels-pass.txt": b"20 0 6 2\n",
    })
    monkeypatch.setattr(download, "SOURCES", {
        name.lstrip("/"): download.Source(server.url + name, len(body), hashlib.md5(body).hexdigest())
        for name, body in server.files.items()})
    monkeypatch.setattr(download, "LINE_COUNTS", {"queries.dev.small.tsv": 2, "qrels.dev.small.tsv": 2})
    download.main(["eval", "--data_dir", str(tmp_path)])
    assert (tmp_path / "queries.dev.small.tsv").read_bytes() == b"2\tb\n3\tc\n"
    assert (tmp_path / "msmarco-test2019-queries.tsv").read_bytes() == b"19\tdl19 query\n"
    assert (tmp_path / "2020qrels-pass.txt").read_bytes() == b"20 0 6 2\n"
    assert all((tmp_path / name).exists() for name in download.EVAL_FILES)


def test_file_lock_makes_a_second_process_wait(tmp_path):
    """Under torchrun every rank mines: one downloads / unpickles, the others wait for it."""
    code = ("import sys, time\nfrom data.download import file_lock\n"
            "with file_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(1.0)\n")
    env = dict(os.environ, PYTHONPATH=str(SAMPLE.parents[1]))
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "x.lock")], stdout=subprocess.PIPE,
                             env=env, text=True)
    assert child.stdout.readline().strip() == "held"
    start = time.monotonic()
    with download.file_lock(tmp_path / "x.lock"):
        waited = time.monotonic() - start
    child.wait()
    assert waited > 0.5
