"""export.py: the Anserini and Seismic files parsed back by an independent reader, and Anserini's integer
impacts equal to our quantized document vectors exactly."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
from test_evaluate import beir_subset

import export
from conftest import BEIR
from encoding import DocVectors


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
    edges += [np.finfo(np.float32).smallest_subnormal, np.finfo(np.float32).tiny, 3e-39, 1e38, 3.3e38]
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


def random_shards(tmp_path, rows_per_shard, vocab_size, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i, rows in enumerate(rows_per_shard):
        matrix = sp.random(rows, vocab_size, density=0.3, format="csr", dtype=np.float32, random_state=rng)
        matrix.data = rng.gamma(2, 0.4, matrix.nnz).astype(np.float32) + 0.01
        sp.save_npz(tmp_path / f"docs-{i:05d}.npz", matrix)
        paths.append(tmp_path / f"docs-{i:05d}.npz")
    return paths


def test_files_and_blocks_split_anywhere(tmp_path, monkeypatch):
    """Blocks (formatted while the previous one is written) and Anserini's files of at most LINES_PER_FILE lines
    split the shards at unrelated rows: every document once, in order, no file longer than the limit."""
    monkeypatch.setattr(export, "BLOCK_ROWS", 3)
    monkeypatch.setattr(export, "LINES_PER_FILE", 7)
    shards = random_shards(tmp_path, [5, 11, 2], vocab_size=12)
    doc_ids = [f"d{i}" for i in range(18)]
    docs = DocVectors(shards, doc_ids, 0.0, True)
    vocab = [f"t{i}" for i in range(12)]
    expected = sp.vstack([sp.load_npz(p) for p in shards]).tocsr()
    export.export(docs, None, vocab, tmp_path / "a", "anserini")
    files = sorted((tmp_path / "a").iterdir())
    assert [f.name for f in files] == ["docs-00000.jsonl", "docs-00001.jsonl", "docs-00002.jsonl"]
    lines = [[json.loads(line) for line in open(f)] for f in files]
    assert [len(part) for part in lines] == [7, 7, 4]
    rows = [doc for part in lines for doc in part]
    assert [d["id"] for d in rows] == doc_ids
    for row, doc in enumerate(rows):
        want = {f"t{t}": int(round(100 * float(w))) for t, w in zip(expected[row].indices, expected[row].data)}
        assert doc["vector"] == want
    export.export(docs, None, vocab, tmp_path / "s", "seismic")
    seismic = [json.loads(line) for line in open(tmp_path / "s" / "docs.jsonl")]
    assert [d["id"] for d in seismic] == list(range(18))
    for row, doc in enumerate(seismic):
        got = {int(t[1:]): np.float32(w) for t, w in doc["vector"].items()}
        assert got == dict(zip(expected[row].indices.tolist(), expected[row].data.tolist()))


def test_failed_export_leaves_no_partial_file(tmp_path, monkeypatch):
    """A shard that cannot be read half-way: the files written completely stay, the one in progress is deleted."""
    monkeypatch.setattr(export, "BLOCK_ROWS", 3)
    monkeypatch.setattr(export, "LINES_PER_FILE", 4)
    shards = random_shards(tmp_path, [6, 6], vocab_size=12)
    shards[1].write_bytes(b"not an npz")
    docs = DocVectors(shards, [f"d{i}" for i in range(12)], 0.0, True)
    with pytest.raises(ValueError):
        export.export(docs, None, [f"t{i}" for i in range(12)], tmp_path / "a", "anserini")
    assert sorted(f.name for f in (tmp_path / "a").iterdir()) == ["docs-00000.jsonl"]
    assert len(open(tmp_path / "a" / "docs-00000.jsonl").readlines()) == 4
