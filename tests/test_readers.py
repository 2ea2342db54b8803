"""data.readers: a malformed file stops with the file, the line and the problem.

Every test builds its files in tmp_path in the real formats (or copies data/sample there): offline.
"""

import gzip
import json

import pytest

from conftest import HN, passages_for, write_files
from data.mining import mine_max_examples
from data.readers import DataError


def test_truncated_gzip_is_an_error(filter_case):
    blob = gzip.compress(
        ("".join(json.dumps({"qid": q, "pos": [10], "neg": {"s": [21]}}) + "\n" for q in range(2000))).encode()
    )
    (filter_case / HN).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=f"{HN}: truncated or corrupt gzip"):
        mine_max_examples(filter_case, download=False)


def test_malformed_json_line_names_file_and_line(tmp_path):
    good = json.dumps({"qid": 1, "pos": [1], "neg": {"s": [2]}})
    write_files(
        tmp_path,
        passages_for([1, 2]),
        {1: "a"},
        None,
        {1: {1: 1.0, 2: 0.0}},
        raw_lines=good + "\n" + '{"qid": 2, "pos": [1], "neg": {"s": [2}\n',
    )
    with pytest.raises(DataError, match=rf"{HN}:2: malformed JSON"):
        mine_max_examples(tmp_path, download=False)
    write_files(
        tmp_path,
        passages_for([1, 2]),
        {1: "a"},
        None,
        {1: {1: 1.0, 2: 0.0}},
        raw_lines=good + "\n" + json.dumps({"qid": 2, "pos": ["1"], "neg": {}}) + "\n",
    )
    with pytest.raises(DataError, match=rf'{HN}:2: "pos" holds \'1\''):
        mine_max_examples(tmp_path, download=False)


def test_bad_collection_line_names_file_and_line(filter_case):
    with open(filter_case / "collection.tsv", "a") as f:
        f.write("not-a-number\tsome text\n")
    with pytest.raises(DataError, match=r"collection.tsv:14: id b'not-a-number' is not an integer"):
        mine_max_examples(filter_case, download=False)
