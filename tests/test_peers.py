"""evaluate.py --engine: the same metrics through a peer engine (retrieval/peers.py) over the same vectors,
and a clear exit 2 when the peer's package is missing."""

import json
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from test_evaluate import beir_subset

import evaluate
import retrieval
from conftest import BEIR
from errors import main_exits_2_on_user_error
from retrieval.peers import peer_engine


@pytest.fixture(scope="module")
def cranfield(tmp_path_factory):
    return beir_subset(BEIR / "cranfield", tmp_path_factory.mktemp("beir") / "cranfield", 40, 300)


def run_engine(model, folder, engine, tmp_path):
    out = tmp_path / engine
    argv = [model, "--beir", str(folder), "--output", str(out), "--cache_dir", str(tmp_path / "cache")]
    assert evaluate.main(argv + ["--max_seq_length", "128", "--engine", engine]) == 0
    return json.loads((out / "metrics.json").read_text())["beir-cranfield"], out


def test_engine_flag_gives_the_metrics_through_a_peer(splade_tiny_path, cranfield, tmp_path):
    exact, _ = run_engine(splade_tiny_path, cranfield, "exact", tmp_path)
    seismic, out = run_engine(splade_tiny_path, cranfield, "seismic", tmp_path)
    bmp, _ = run_engine(splade_tiny_path, cranfield, "bmp", tmp_path)
    # A few hundred documents: Seismic's accurate setting finds (nearly) the exact ranking; its scores are
    # its own (16-bit values), so ties may fall differently.
    assert abs(seismic["ndcg@10"] - exact["ndcg@10"]) < 0.02
    assert abs(bmp["ndcg@10"] - exact["ndcg@10"]) < 0.05  # exact over its 8-bit quantized impacts
    assert seismic["num_queries"] == exact["num_queries"] == 40
    run = (out / "runs" / "beir-cranfield.trec").read_text().splitlines()
    assert run and all(len(line.split()) == 6 for line in run)


def test_peers_find_the_exact_top_10_on_random_vectors():
    docs = sp.random(3000, 500, density=0.05, format="csr", random_state=1, dtype=np.float32)
    queries = sp.random(20, 500, density=0.05, format="csr", random_state=2, dtype=np.float32)
    index = retrieval.build_index(docs)
    exact = retrieval.search(index, queries, k=10)
    exclude = exact.doc_index[:, 0].astype(np.int64)  # each query's best hit is excluded
    for name, floor in (("seismic", 0.9), ("bmp", 0.8)):
        found = peer_engine(name).search(index, queries, 10, exclude)
        assert not (found.doc_index == exclude[:, None]).any()
        expected = retrieval.search(index, queries, k=10, exclude=exclude)
        overlap = np.mean([len(set(found.doc_index[q]) & set(expected.doc_index[q])) / 10 for q in range(20)])
        assert overlap >= floor, (name, overlap)


def test_missing_peer_package_exits_2_with_a_message(splade_tiny_path, cranfield, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "seismic", None)  # as if pyseismic-lsr were not installed
    argv = [splade_tiny_path, "--beir", str(cranfield), "--output", str(tmp_path), "--engine", "seismic"]
    with pytest.raises(SystemExit) as exit_info:
        main_exits_2_on_user_error(evaluate.main, argv)
    assert exit_info.value.code == 2
    assert "pyseismic-lsr" in capsys.readouterr().err
