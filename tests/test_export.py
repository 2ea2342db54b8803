"""export.py: the Anserini and Seismic files parsed back by an independent reader, and Anserini's integer
impacts equal to our quantized document vectors exactly."""

import json

import numpy as np
import scipy.sparse as sp
from test_evaluate import beir_subset

import export
from conftest import BEIR


def test_exports_parse_back_to_our_vectors(splade_tiny_path, tmp_path):
    folder = beir_subset(BEIR / "cranfield", tmp_path / "cranfield", 5, 40)
    common = [splade_tiny_path, str(folder), "--cache_dir", str(tmp_path / "cache"), "--max_seq_length", "64"]
    assert export.main(common + ["--format", "anserini", "--out", str(tmp_path / "a")]) == 0
    assert export.main(common + ["--format", "seismic", "--out", str(tmp_path / "s")]) == 0
    shards = sorted((tmp_path / "cache" / "doc_vectors").rglob("*.npz"))
    docs = sp.vstack([sp.load_npz(p) for p in shards]).tocsr()
    vocab = json.load(open(f"{splade_tiny_path}/tokenizer.json"))["model"]["vocab"]  # token -> id
    ids = [json.loads(line)["_id"] for line in open(folder / "corpus.jsonl")]

    anserini = [json.loads(line) for line in open(tmp_path / "a" / "docs-00000.jsonl")]
    assert [d["id"] for d in anserini] == ids and all(d["contents"] == "" for d in anserini)
    for row, doc in enumerate(anserini):
        expected = {int(t): int(round(100 * float(w))) for t, w in zip(docs[row].indices, docs[row].data)}
        expected = {t: n for t, n in expected.items() if n != 0}
        assert {vocab[token]: n for token, n in doc["vector"].items()} == expected
    queries = [line.rstrip("\n").split("\t") for line in open(tmp_path / "a" / "queries.tsv")]
    assert len(queries) == 5 and all(len(words.split()) > 0 for _, words in queries)

    seismic = [json.loads(line) for line in open(tmp_path / "s" / "docs.jsonl")]
    assert [d["id"] for d in seismic] == list(range(len(ids)))
    assert open(tmp_path / "s" / "doc_ids.txt").read().split("\n")[:-1] == ids
    for row, doc in enumerate(seismic):
        got = {vocab[token]: np.float32(w) for token, w in doc["vector"].items()}
        assert got == dict(zip(docs[row].indices.tolist(), docs[row].data.tolist()))


def lines_of_single_values(values, as_floats):
    """vector_lines over one value per row (token "t"): the values as export writes them, parsed by json."""
    n = len(values)
    matrix = sp.csr_matrix((values, np.zeros(n, dtype=np.int32), np.arange(n + 1)), (n, 1))
    text, ends = export.vector_lines(matrix, export.token_fields(["t"]), [b"{"] * n, as_floats)
    lines = bytes(text).decode().splitlines()
    assert len(lines) == len(ends) == n and ends[-1] == len(text)
    return [json.loads(line)["vector"]["t"] for line in lines], [line.split('"t": ')[1][:-2] for line in lines]


def test_weights_read_back_exactly():
    """Seismic's weights as 9 significant digits: every float32 comes back exactly, powers of 10 included; Anserini's
    integers as they are."""
    rng = np.random.default_rng(0)
    edges = [10.0**e for e in range(-12, 9)] + [np.nextafter(np.float32(10.0**e), np.float32(0)) for e in range(-6, 6)]
    values = np.concatenate([rng.gamma(2, 0.4, 200_000), rng.uniform(1e-7, 1e-3, 20_000), edges]).astype(np.float32)
    back, texts = lines_of_single_values(values, as_floats=True)
    assert np.array_equal(np.array(back, dtype=np.float64).astype(np.float32), values)
    assert all(len(t) == 13 and t[0] != "0" for t in texts)  # JSON numbers: no leading zero
    # float64 just below a power of 10, where floor(log10) is one too high or the mantissa rounds up to 10 digits
    below = np.array([np.nextafter(10.0**e, 0) for e in range(-8, 9)])
    back, _ = lines_of_single_values(below, as_floats=True)
    assert np.array_equal(np.array(back).astype(np.float32), below.astype(np.float32))
    integers = np.array([1, 9, 10, 99, 100, 101, 999, 1000, 12345, 2**40 + 7], dtype=np.int64)
    assert lines_of_single_values(integers, as_floats=False)[0] == integers.tolist()
