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


# The evaluation side of the same readers: string ids, BEIR JSONL, TREC and BEIR qrels, gzip.


def test_corpus_in_tsv_gzip_tsv_and_beir_jsonl_reads_alike(tmp_path):
    from data.readers import read_corpus

    (tmp_path / "collection.tsv").write_text("7\tfirst passage\n\n8\tsecond\r\n")
    (tmp_path / "collection.tsv.gz").write_bytes(gzip.compress(b"7\tfirst passage\n8\tsecond\n"))
    with open(tmp_path / "corpus.jsonl", "w") as f:
        f.write(json.dumps({"_id": "7", "title": "first", "text": "passage"}) + "\n")
        f.write(json.dumps({"_id": "8", "title": "", "text": "second"}) + "\n")
    expected = (["7", "8"], ["first passage", "second"])  # BEIR: title + " " + text, as sentence-transformers joins
    for name in ("collection.tsv", "collection.tsv.gz", "corpus.jsonl"):
        assert read_corpus(tmp_path / name) == expected


def test_qrels_in_trec_msmarco_and_beir_layouts(tmp_path):
    from data.readers import read_qrels

    (tmp_path / "trec.txt").write_text("19 Q0 5 3\n19 Q0 6 0\n20 Q0 5 1\n")
    (tmp_path / "msmarco.tsv").write_text("19\t0\t5\t3\n19\t0\t6\t0\n20\t0\t5\t1\n")
    (tmp_path / "beir.tsv").write_text("query-id\tcorpus-id\tscore\n19\t5\t3\n19\t6\t0\n20\t5\t1\n")
    for name in ("trec.txt", "msmarco.tsv"):
        assert read_qrels(tmp_path / name) == ({"19": {"5": 3, "6": 0}, "20": {"5": 1}}, {"19": 1, "20": 3})
    assert read_qrels(tmp_path / "beir.tsv") == ({"19": {"5": 3, "6": 0}, "20": {"5": 1}}, {"19": 2, "20": 4})


def test_evaluation_files_errors_name_file_and_line(tmp_path):
    from data.readers import read_corpus, read_qrels, read_query_texts

    with pytest.raises(DataError, match=r"nothing.tsv: file not found"):
        read_query_texts(tmp_path / "nothing.tsv")
    (tmp_path / "corpus.jsonl").write_text('{"_id": "a", "text": "x"}\n{"text": "y"}\n')
    with pytest.raises(DataError, match=r"corpus.jsonl:2: a document record needs an '_id' field"):
        read_corpus(tmp_path / "corpus.jsonl")
    (tmp_path / "collection.tsv").write_text("1\tx\n2\ty\n1\tz\n")
    with pytest.raises(DataError, match=r"collection.tsv: document id '1' appears twice \(lines 1 and 3\)"):
        read_corpus(tmp_path / "collection.tsv")
    (tmp_path / "queries.tsv").write_text("1\tx\nno tab here\n")
    with pytest.raises(DataError, match=r"queries.tsv:2: expected `id<TAB>text`"):
        read_query_texts(tmp_path / "queries.tsv")
    (tmp_path / "qrels.txt").write_text("1 Q0 d 1\n1 d\n")
    with pytest.raises(DataError, match=r"qrels.txt:2: expected 'qid Q0 docid relevance'"):
        read_qrels(tmp_path / "qrels.txt")
