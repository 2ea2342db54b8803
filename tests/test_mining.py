"""data.mining: the CE filter, per-system counts, distill labels, and bad input as counted skips.

Every test builds its files in tmp_path in the real formats (or copies data/sample there): offline.
"""


import pytest

from conftest import HN, negatives_of, passages_for, positives_of, write_files
from data.mining import mine_distill_examples, mine_max_examples
from data.rotation import make_train_dataset


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
    lines = [{"qid": 1, "pos": [1], "neg": {"bm25": [2]}}, {"qid": 2, "pos": [3], "neg": {"bm25": [4], "tas-b": [5]}}]
    scores = {1: {1: 9.0, 2: 0.0}, 2: {3: 9.0, 4: 0.0, 5: 0.0}}
    write_files(tmp_path, passages_for(range(1, 6)), {1: "a", 2: "b"}, lines, scores)
    ts = mine_max_examples(tmp_path, download=False)
    assert ts.report["systems_used"] == ["bm25", "tas-b"]  # the original took the first line's: bm25 only
    assert ts.report["negatives_per_system"] == {"bm25": 2, "tas-b": 1}
    assert negatives_of(ts, 1) == {4, 5}


def test_use_all_queries_keeps_queries_without_negatives(tmp_path):
    lines = [
        {"qid": 1, "pos": [1], "neg": {"s": [2, 3, 4]}},
        {"qid": 2, "pos": [5], "neg": {"s": [6, 1]}},
    ]  # query 2: every negative above threshold
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


def test_missing_file_names_it_and_the_download_command(filter_case):
    (filter_case / HN).unlink()
    with pytest.raises(FileNotFoundError) as err:
        mine_max_examples(filter_case, download=False)
    assert HN in str(err.value) and f"python -m data.download train --data_dir {filter_case}" in str(err.value)


def test_missing_ids_and_empty_positives_are_counted_skips(tmp_path):
    lines = [
        {"qid": 1, "pos": [1], "neg": {"s": [2, 3]}},  # good; negative 3 is not in the collection
        {"qid": 2, "pos": [], "neg": {"s": [2]}},  # empty pos
        {"qid": 3, "pos": [1], "neg": {"s": [2]}},  # not in queries.train.tsv
        {"qid": 4, "pos": [1], "neg": {"s": [2]}},  # not in the CE scores
        {"qid": 5, "pos": [9], "neg": {"s": [2]}},  # positive not in the collection
        {"qid": 6, "pos": [1], "neg": {"s": [2, 7]}},  # negative 7 has no CE score
    ]
    scores = {1: {1: 5.0, 2: 0.0, 3: 0.0}, 2: {2: 0.0}, 3: {1: 5.0, 2: 0.0}, 5: {9: 5.0, 2: 0.0}, 6: {1: 5.0, 2: 0.0}}
    write_files(tmp_path, passages_for([1, 2]), {q: f"q{q}" for q in (1, 2, 4, 5, 6)}, lines, scores)
    for ts in (mine_max_examples(tmp_path, download=False), mine_distill_examples(tmp_path, download=False)):
        r = ts.report
        assert list(ts.qids) == [1, 6]
        assert r["queries_read"] == 6
        assert r["queries_dropped"] == {
            "no_positive": 1,
            "qid_not_in_queries_file": 1,
            "qid_not_in_ce_scores": 1,
            "positives_not_in_collection": 1,
        }
        assert r["negatives_skipped"] == {"no_ce_score": 1, "not_in_collection": 1}
        assert r["positives_skipped"] == {"not_in_collection": 1}
        assert negatives_of(ts, 0) == {2} and negatives_of(ts, 1) == {2}
        assert "dropped, qid_not_in_ce_scores: 1" in ts.format_report()
