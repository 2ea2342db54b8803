"""data.mining and data.mining_rule: the rule for one line, the CE filter, per-system counts, distill labels,
repeated qids, bad input as counted skips, and each deliberate difference from the original (test_difference_*).

Every test builds its files in tmp_path in the real formats (or copies data/sample there): offline.
"""

import math

import pytest

from conftest import HN, negatives_of, passages_for, positives_of, write_files
from data.mining import MiningError, main, mine_distill_examples, mine_max_examples
from data.mining_rule import choose_negatives, mine_query
from data.rotation import EpochRotationBatchSampler, make_train_dataset
from errors import UserError, main_exits_2_on_user_error


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


def test_difference_systems_default_to_the_union_over_the_file_not_its_first_line(tmp_path):
    lines = [{"qid": 1, "pos": [1], "neg": {"bm25": [2]}}, {"qid": 2, "pos": [3], "neg": {"bm25": [4], "tas-b": [5]}}]
    scores = {1: {1: 9.0, 2: 0.0}, 2: {3: 9.0, 4: 0.0, 5: 0.0}}
    write_files(tmp_path, passages_for(range(1, 6)), {1: "a", 2: "b"}, lines, scores)
    ts = mine_max_examples(tmp_path, download=False)
    assert ts.report["systems_used"] == ["bm25", "tas-b"]  # the original took the first line's: bm25 only
    assert ts.report["negatives_per_system"] == {"bm25": 2, "tas-b": 1}
    assert negatives_of(ts, 1) == {4, 5}


def test_difference_max_use_all_queries_gives_random_negatives_instead_of_crashing(tmp_path):
    lines = [
        {"qid": 1, "pos": [1], "neg": {"s": [2, 5]}},
        {"qid": 2, "pos": [5], "neg": {"s": [6, 1]}},
    ]  # query 2: every negative above threshold; its positive 5 is one of query 1's mined negatives
    scores = {1: {1: 5.0, 2: 0.0, 5: 0.0}, 2: {5: 5.0, 6: 4.0, 1: 4.5}}
    write_files(tmp_path, passages_for(range(1, 7)), {1: "a", 2: "b"}, lines, scores)

    ts = mine_max_examples(tmp_path, download=False)
    assert list(ts.qids) == [1]
    assert ts.report["queries_dropped"] == {"no_negative_after_ce_filter": 1}

    ts = mine_max_examples(tmp_path, use_all_queries=True, num_negs_per_system=2, download=False)
    assert list(ts.qids) == [1, 2]
    assert ts.report["queries_with_random_negatives"] == 1
    # the pool is query 1's mined negatives {2, 5}: both drawn, and 5, query 2's own positive, dropped
    assert negatives_of(ts, 1) == {2}
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


def mine(tmp_path, lines, scores, script="max", **kwargs):
    """Write the four files for `lines` (every passage and query present) and mine them."""
    pids = {p for line in lines for p in line["pos"] + [n for negs in line["neg"].values() for n in negs]}
    queries = {line["qid"]: f"query {line['qid']}" for line in lines}
    write_files(tmp_path, passages_for(sorted(pids)), queries, lines, scores)
    mine_examples = mine_max_examples if script == "max" else mine_distill_examples
    return mine_examples(tmp_path, download=False, **kwargs)


# The rule for one line, on hand-made inputs

RULE_NEG = {"a": [1, 10, 11, 10, 12], "b": [11, 13, 14, 15], "c": [16]}
RULE_SCORES = {1: 5.0, 2: 3.0, 10: 0.5, 11: -1.0, 12: -2.0, 14: 0.0, 15: -3.0, 16: -4.0}  # 13: no CE score


def test_choose_negatives_walks_the_systems_in_order():
    # threshold 0: a: 1 is a positive, 10 (0.5) above, 11 taken, 10 above again, 12 taken (2 from a: stop).
    # b: 11 already chosen, 13 has no score, 14 (0.0 = threshold) taken, 15 taken. c is not asked for.
    chosen, skipped = choose_negatives([1, 2], RULE_NEG, RULE_SCORES, ["a", "b"], 2, threshold=0.0)
    assert list(chosen.items()) == [(11, "a"), (12, "a"), (14, "b"), (15, "b")]
    assert skipped == {"is_a_positive": 1, "above_ce_threshold": 2, "already_chosen": 1, "no_ce_score": 1}
    # No threshold (distill): a takes 10 and 11; b skips 11 and 13 and takes 14 and 15.
    chosen, skipped = choose_negatives([1, 2], RULE_NEG, RULE_SCORES, ["a", "b"], 2)
    assert list(chosen.items()) == [(10, "a"), (11, "a"), (14, "b"), (15, "b")]
    assert skipped == {"is_a_positive": 1, "already_chosen": 1, "no_ce_score": 1}
    # Systems in the order given; one missing from the line gives nothing.
    chosen, _ = choose_negatives([1, 2], RULE_NEG, RULE_SCORES, ["c", "zzz", "a"], 1)
    assert list(chosen.items()) == [(16, "c"), (10, "a")]


def test_mine_query_positives_threshold_and_drop_reasons():
    rule = dict(systems=["a", "b"], num_negs_per_system=2)
    # max: positives deduplicated in file order; threshold min(3, 5) - 3 = 0
    mined = mine_query([2, 1, 2], RULE_NEG, RULE_SCORES, ce_score_margin=3.0, **rule)
    assert mined.dropped is None and mined.positives == [(2, 3.0), (1, 5.0)]
    assert mined.negatives == [(11, "a"), (12, "a"), (14, "b"), (15, "b")]
    assert mined.positives_skipped == {"repeated": 1}
    # max: positive 3 has no CE score: kept (NaN), the threshold comes from 1 alone: 5 - 3 = 2, so 10 is taken
    mined = mine_query([1, 3], RULE_NEG, RULE_SCORES, ce_score_margin=3.0, **rule)
    assert mined.positives[0] == (1, 5.0) and mined.positives[1][0] == 3 and math.isnan(mined.positives[1][1])
    assert mined.positives_skipped == {"no_ce_score_kept": 1} and mined.negatives[:2] == [(10, "a"), (11, "a")]
    assert mine_query([3], RULE_NEG, RULE_SCORES, ce_score_margin=3.0, **rule).dropped == "positives_without_ce_score"
    # distill: a positive needs a CE score (its label)
    mined = mine_query([1, 3], RULE_NEG, RULE_SCORES, **rule)
    assert mined.positives == [(1, 5.0)] and mined.positives_skipped == {"no_ce_score": 1}
    assert mine_query([3], RULE_NEG, RULE_SCORES, **rule).dropped == "positives_without_ce_score"
    # no positive
    assert mine_query([], RULE_NEG, RULE_SCORES, ce_score_margin=3.0, **rule).dropped == "no_positive"
    assert mine_query([], RULE_NEG, RULE_SCORES, **rule).dropped == "no_positive"
    mined = mine_query([], RULE_NEG, RULE_SCORES, keep_without_positive=True, **rule)  # 1 is no positive here
    assert mined.dropped is None and mined.positives == []
    assert mined.negatives == [(1, "a"), (10, "a"), (11, "b"), (14, "b")]
    # no negative left: margin 10 puts the threshold at -5, below every score
    assert mine_query([1], RULE_NEG, RULE_SCORES, ce_score_margin=10.0, **rule).dropped == "no_negative_after_ce_filter"
    mined = mine_query([1], RULE_NEG, RULE_SCORES, ce_score_margin=10.0, keep_without_negative=True, **rule)
    assert mined.dropped is None and mined.negatives == [] and mined.positives == [(1, 5.0)]
    for keep in (False, True):
        assert mine_query([1], {}, RULE_SCORES, keep_without_positive=keep, **rule).dropped == "no_negative_left"
    assert mine_query([], {}, RULE_SCORES, keep_without_positive=True, **rule).dropped == "no_negative_left"


# Repeated qids: as the original's train_queries[qid] = {...}, the last kept line wins, at the first one's place


def test_repeated_qid_takes_the_last_kept_line_max(tmp_path):
    lines = [
        {"qid": 1, "pos": [1], "neg": {"s": [2]}},
        {"qid": 2, "pos": [3], "neg": {"s": [4]}},
        {"qid": 1, "pos": [5], "neg": {"s": [6, 7]}},  # kept: replaces the first line of query 1
        {"qid": 2, "pos": [3], "neg": {"s": [8]}},  # 8 is above the threshold: not kept, line 2 stays
    ]
    scores = {1: {1: 9.0, 2: 0.0, 5: 9.0, 6: 0.0, 7: 0.0}, 2: {3: 9.0, 4: 0.0, 8: 8.5}}
    ts = mine(tmp_path, lines, scores)
    assert list(ts.qids) == [1, 2]  # query 1 keeps its first place
    assert positives_of(ts, 0) == [5] and negatives_of(ts, 0) == {6, 7}
    assert positives_of(ts, 1) == [3] and negatives_of(ts, 1) == {4}
    r = ts.report
    assert r["queries_read"] == 4 and r["queries_kept"] == 2
    assert r["queries_dropped"] == {"qid_repeated_in_file": 1, "no_negative_after_ce_filter": 1}
    assert r["negatives_per_system"] == {"s": 3} and r["positives"] == 2
    assert r["passages_referenced"] == 5  # 1 and 2, of the replaced line, are not loaded


def test_repeated_qid_takes_the_last_kept_line_distill_and_counts_once_for_max_passages(tmp_path):
    lines = [
        {"qid": 1, "pos": [1], "neg": {"s": [2]}},
        {"qid": 1, "pos": [5], "neg": {"s": [6]}},  # replaces; still one query
        {"qid": 2, "pos": [3], "neg": {}},  # not kept
        {"qid": 2, "pos": [3], "neg": {"s": [4]}},  # the second query: max_passages=2 reached
        {"qid": 3, "pos": [7], "neg": {"s": [8]}},  # not read
    ]
    scores = {1: {1: 9.0, 2: 0.0, 5: 7.0, 6: 1.5}, 2: {3: 9.0, 4: 0.0}, 3: {7: 1.0, 8: 0.0}}
    ts = mine(tmp_path, lines, scores, "distill", max_passages=2)
    assert list(ts.qids) == [1, 2] and ts.report["queries_read"] == 4
    assert ts.report["queries_dropped"] == {"qid_repeated_in_file": 1, "no_negative_left": 1}
    assert ts.example(0, 0)[1:] == ("passage number 5", "passage number 6", pytest.approx(7.0 - 1.5))


# distill --use_all_queries (the rotation of such queries: tests/test_rotation.py)


def test_difference_distill_use_all_queries_drops_queries_without_negatives_instead_of_crashing(tmp_path):
    """Faithful: a query without positives is kept. Different: one without negatives is dropped (IndexError)."""
    lines = [
        {"qid": 1, "pos": [], "neg": {"s": [11, 12]}},
        {"qid": 2, "pos": [20], "neg": {"s": [21]}},
        {"qid": 3, "pos": [], "neg": {}},  # nothing to train on
        {"qid": 4, "pos": [40], "neg": {}},  # the original crashed on it (IndexError)
    ]
    scores = {1: {11: 1.0, 12: 2.0}, 2: {20: 9.0, 21: 1.0}, 3: {11: 0.0}, 4: {40: 9.0}}
    ts = mine(tmp_path, lines, scores, "distill", use_all_queries=True, max_passages=5)
    assert list(ts.qids) == [1, 2] and positives_of(ts, 0) == [] and negatives_of(ts, 0) == {11, 12}
    assert ts.report["queries_without_positive"] == 1
    assert ts.report["queries_dropped"] == {"no_negative_left": 2}
    assert "kept without a positive (use_all_queries: two negatives per epoch): 1" in ts.format_report()
    ts = mine_distill_examples(tmp_path, download=False)
    assert list(ts.qids) == [2] and ts.report["queries_dropped"] == {"no_positive": 2, "no_negative_left": 1}
    assert ts.report["queries_without_positive"] == 0


def test_bad_parameters_are_user_errors_that_say_what_to_try(filter_case):
    with pytest.raises(UserError, match=r"no training query left.*ce_score_margin"):
        mine_max_examples(filter_case, ce_score_margin=100.0, download=False)
    argv = ["max", "--data_dir", str(filter_case), "--negs_to_use", "sysZ", "--no_download"]
    with pytest.raises(SystemExit) as exit_:
        main_exits_2_on_user_error(main, argv)
    assert exit_.value.code == 2


# Differences from the original, one test each (the README lists them)


def test_difference_num_negs_per_system_below_1_is_an_error(filter_case):
    # The original's walk broke after the first new negative, so 0 (or less) took one per system.
    for script in (mine_max_examples, mine_distill_examples):
        with pytest.raises(UserError, match="num_negs_per_system must be >= 1, got 0; the original used 5"):
            script(filter_case, num_negs_per_system=0, download=False)


def test_difference_negs_to_use_naming_a_system_absent_from_the_file_is_an_error(filter_case):
    # The original silently took no negative from it.
    with pytest.raises(MiningError, match=r"sysZ.*its systems: \['sysA', 'sysB', 'sysC'\]"):
        mine_max_examples(filter_case, negs_to_use="sysA,sysZ", download=False)


def test_difference_max_positive_without_ce_score_is_kept(tmp_path):
    # The original raised KeyError computing min CE(positives).
    lines = [{"qid": 1, "pos": [1, 2], "neg": {"s": [3, 4]}}]
    ts = mine(tmp_path, lines, {1: {1: 5.0, 3: 2.5, 4: 1.0}})  # 2: no score; threshold 5 - 3 = 2
    assert positives_of(ts) == [1, 2] and negatives_of(ts) == {4}
    assert ts.report["positives_skipped"] == {"no_ce_score_kept": 1}


def test_difference_negative_without_ce_score_is_skipped(tmp_path):
    # The original raised KeyError: train_max in its CE filter, train_distill when making the label.
    lines = [{"qid": 1, "pos": [1, 2], "neg": {"s": [3, 4]}}]
    scores = {1: {1: 5.0, 2: 6.0, 4: 1.0}}  # 3: no score
    for script in ("max", "distill"):
        ts = mine(tmp_path, lines, scores, script)
        assert negatives_of(ts) == {4} and ts.report["negatives_skipped"] == {"no_ce_score": 1}
    ts = mine(tmp_path, lines, {1: {1: 5.0, 3: 1.0, 4: 1.0}}, "distill")  # distill: a positive without score
    assert positives_of(ts) == [1] and ts.report["positives_skipped"] == {"no_ce_score": 1}


def test_difference_positives_are_deduplicated(tmp_path):
    # The original rotated through "pos" as listed: [1, 1, 2] gave 1 in two epochs out of three.
    lines = [{"qid": 1, "pos": [1, 1, 2], "neg": {"s": [3]}}]
    ts = mine(tmp_path, lines, {1: {1: 5.0, 2: 6.0, 3: 1.0}})
    assert positives_of(ts) == [1, 2] and ts.report["positives_skipped"] == {"repeated": 1}
    assert [ts.example(0, e)[1] for e in range(3)] == ["passage number 1", "passage number 2", "passage number 1"]


def test_difference_distill_never_takes_a_positive_as_negative(tmp_path):
    # train_distill had no filter: a passage listed in "pos" and in "neg" could be a negative of its own query.
    lines = [{"qid": 1, "pos": [1], "neg": {"s": [1, 2]}}]
    ts = mine(tmp_path, lines, {1: {1: 5.0, 2: 1.0}}, "distill")
    assert negatives_of(ts) == {2} and ts.report["negatives_skipped"] == {"is_a_positive": 1}


def test_difference_missing_ids_and_empty_positives_are_counted_skips(tmp_path):
    # The original raised KeyError on a qid or pid missing from a file.
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


def test_difference_queries_left_out_of_the_dropped_last_batch_still_advance(tmp_path):
    # With drop_last the original's short last batch was never read, so its queries kept their next negative.
    lines = [{"qid": q, "pos": [10 * q], "neg": {"s": [10 * q + 1, 10 * q + 2]}} for q in (1, 2, 3)]
    scores = {q: {10 * q: 5.0, 10 * q + 1: 0.0, 10 * q + 2: 0.0} for q in (1, 2, 3)}
    ts = mine(tmp_path, lines, scores)
    ds = make_train_dataset(ts, epochs=2)
    sampler = EpochRotationBatchSampler(ds, batch_size=2, drop_last=True, seed=0)
    sampler.set_epoch(0)
    (batch,) = list(sampler)
    (left_out,) = set(range(3)) - set(batch)
    shuffled = [int(ts.passages.ids[k]) for k in ts.neg_idx[ts.neg_ptr[left_out] : ts.neg_ptr[left_out + 1]]]
    assert ds[3 + left_out]["negative"] == f"passage number {shuffled[1]}"  # epoch 1: its second negative


def test_difference_negative_order_depends_only_on_seed_qid_and_pid(tmp_path):
    # The original shuffled with Python's random stream, so a query's order depended on every query before it.
    line = {"qid": 7, "pos": [1], "neg": {"s": list(range(10, 20))}}
    scores = {7: {1: 9.0, **{p: 0.0 for p in range(10, 20)}}, 8: {2: 9.0, 3: 0.0}}
    alone = mine(tmp_path / "a", [line], scores, num_negs_per_system=10, seed=5)
    other = {"qid": 8, "pos": [2], "neg": {"s": [3]}}
    after_another = mine(tmp_path / "b", [other, line], scores, num_negs_per_system=10, seed=5)

    def order(ts, i):
        return [int(ts.passages.ids[k]) for k in ts.neg_idx[ts.neg_ptr[i] : ts.neg_ptr[i + 1]]]

    assert order(alone, 0) == order(after_another, 1) != list(range(10, 20))


def test_a_repeated_passage_id_keeps_its_last_text_as_the_original(tmp_path):
    """The original read the collection into a dict, so a repeated pid kept its last text; the report counts it."""
    lines = [{"qid": 1, "pos": [10], "neg": {"s": [20, 30]}}]
    scores = {1: {10: 5.0, 20: 0.0, 30: 0.0}}
    write_files(tmp_path, passages_for([10, 20, 30]), {1: "a query"}, lines, scores)
    with open(tmp_path / "collection.tsv", "a") as f:
        f.write("20\tthe second text of 20\n10\tthe second text of 10\n10\tthe third text of 10\n")
    ts = mine_max_examples(tmp_path, download=False)
    texts = {int(pid): ts.passages.text(k) for k, pid in enumerate(ts.passages.ids)}
    assert texts == {10: "the third text of 10", 20: "the second text of 20", 30: "passage number 30"}
    assert ts.report["collection"]["repeated_ids"] == 3
    assert ts.example(0, 0)[1] == "the third text of 10"


def test_difference_an_invalid_utf8_byte_becomes_a_replacement_character(tmp_path):
    """The original's strict utf-8 read stopped on a stray byte; here the passage trains with U+FFFD in its place."""
    lines = [{"qid": 1, "pos": [10], "neg": {"s": [20]}}]
    write_files(tmp_path, passages_for([20]), {1: "a query"}, lines, {1: {10: 5.0, 20: 0.0}})
    with open(tmp_path / "collection.tsv", "ab") as f:
        f.write(b"10\tcaf\xe9 au lait\n")  # latin-1, not utf-8
    ts = mine_max_examples(tmp_path, download=False)
    assert ts.example(0, 0)[1] == "caf\ufffd au lait"
