"""data/sample/: the bundled sample loads through the real code path and is what make_sample writes.

Every test builds its files in tmp_path in the real formats (or copies data/sample there): offline.
"""

import json
import re
import shutil

import numpy as np

from conftest import CE, HN, SAMPLE
from data.mining import mine_distill_examples, mine_max_examples

SAMPLE_FILES = ("collection.tsv", "queries.train.tsv", HN, CE, "queries.dev.small.tsv", "qrels.dev.small.tsv")


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

    main(
        [
            "distill",
            "--data_dir",
            str(data_dir),
            "--max_passages",
            "7",
            "--no_download",
            "--report",
            str(tmp_path / "report.json"),
        ]
    )
    assert json.loads((tmp_path / "report.json").read_text())["queries_kept"] == 7


def test_sample_is_what_make_sample_writes(tmp_path):
    from data.make_sample import write_sample

    write_sample(tmp_path)
    for name in SAMPLE_FILES:
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes(), name
    # The six files only: the CE-scores loader may keep a cache beside its pickle.
    assert sum((SAMPLE / name).stat().st_size for name in SAMPLE_FILES) < 2_000_000
    qrels = [line.split("\t") for line in (SAMPLE / "qrels.dev.small.tsv").read_text().splitlines()]
    collection = {line.split("\t")[0] for line in (SAMPLE / "collection.tsv").read_text().splitlines()}
    assert len(qrels) == 150 and all(q[1] == "0" and q[3] == "1" and q[2] in collection for q in qrels)


def test_sample_dev_queries_are_not_lexical_give_aways():
    """Many dev queries use a word their passage lacks (a paraphrase, the kind of thing, an unstated detail),
    so that retrieval has to be learned rather than read off the words: a demo that can end below 1.0."""
    words = lambda text: set(re.findall(r"[a-z]+", text.lower()))  # noqa: E731
    collection = dict(line.split("\t") for line in (SAMPLE / "collection.tsv").read_text().splitlines())
    qrels = [line.split("\t") for line in (SAMPLE / "qrels.dev.small.tsv").read_text().splitlines()]
    relevant = {qid: pid for qid, _, pid, _ in qrels}
    function_words = {"what", "is", "the", "how", "does", "in", "why", "facts", "of"}
    queries = [line.split("\t") for line in (SAMPLE / "queries.dev.small.tsv").read_text().splitlines()]
    missing = [bool(words(text) - words(collection[relevant[qid]]) - function_words) for qid, text in queries]
    assert 0.3 < sum(missing) / len(missing) < 0.8
