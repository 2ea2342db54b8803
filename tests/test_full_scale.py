"""bench/bench_full_scale.py: its synthetic files are the real formats (read back by the project's own readers),
its CE-scores pickle is byte for byte what pickle.dump writes, and a tiny run fills every JSON key."""

import gzip
import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from full_scale_files import NEGS, SYSTEMS, ScoresPickleWriter, counts  # noqa: E402

from data.ce_pickle import read_scores_pickle  # noqa: E402
from data.ce_scores import read_scores_pickle_gz  # noqa: E402
from data.download import CE_SCORES_FILE, COLLECTION, HARD_NEGATIVES_FILE, TRAIN_QUERIES  # noqa: E402
from data.readers import iter_hard_negatives, iter_id_text, read_qrels, read_query_texts  # noqa: E402

SHARED_MODEL = ROOT.parent / "shared" / "models" / "splade-tiny"


def random_scores(rng, n_queries, max_items):
    """{qid: {pid: float}} with small and large ids (BININT1, BININT2 and BININT keys), empty and 1-item rows."""
    rows = {}
    for q in np.sort(rng.choice(3_000_000, size=n_queries, replace=False)).tolist():
        high = 300 if rng.random() < 0.3 else 9_000_000
        pids = np.unique(rng.integers(0, high, size=rng.integers(0, max_items)))
        rows[q] = {p: float(np.round(rng.normal(), 6)) for p in pids.tolist()}
    return rows


def write_in_chunks(rows, chunks):
    f = io.BytesIO()
    writer = ScoresPickleWriter(f, len(rows))
    items = list(rows.items())
    for part in np.array_split(np.arange(len(items)), chunks) if items else []:
        sub = [items[i] for i in part]
        ptr = np.cumsum([0] + [len(r) for _, r in sub])
        pids = np.array([p for _, r in sub for p in r], dtype=np.int64)
        scores = np.array([s for _, r in sub for s in r.values()], dtype=np.float64)
        writer.add(np.array([q for q, _ in sub], dtype=np.int64), ptr, pids, scores)
    writer.close()
    return f.getvalue()


@pytest.mark.parametrize("n_queries", [0, 1, 2, 999, 1000, 1001, 2000, 4321])
def test_scores_pickle_is_what_pickle_dump_writes(n_queries):
    rows = random_scores(np.random.default_rng(n_queries), n_queries, 300)
    stream = write_in_chunks(rows, chunks=3)
    assert stream == pickle.dumps(rows, protocol=4)  # frames, batches, int opcodes: the same bytes
    assert pickle.loads(stream) == rows
    # the project's safe reader gives the dict's rows
    qids, ptr, pids, scores = read_scores_pickle(io.BytesIO(stream), "synthetic", 16)
    assert qids.tolist() == sorted(rows)
    for r, q in enumerate(qids.tolist()):
        row = rows[q]
        assert pids[ptr[r] : ptr[r + 1]].tolist() == sorted(row)
        assert np.allclose(scores[ptr[r] : ptr[r + 1]], [row[p] for p in sorted(row)], rtol=1e-6)


@pytest.mark.skipif(not SHARED_MODEL.is_dir(), reason="needs ../shared/models/splade-tiny")
def test_tiny_run_writes_real_formats_and_every_key(tmp_path):
    scale, work, out = 0.0005, tmp_path / "work", tmp_path / "out.json"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_full_scale.py"), "--scale", str(scale), "--work_dir", str(work)]
    cmd += ["--out", str(out), "--ranks", "2", "--search_queries", "5", "--dev_queries", "4", "--dev_passages", "100"]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=1800)  # ~1 min idle; 12 fresh processes
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    keys = "data_first_run_s data_first_run_peak_rss_mb data_cached_s data_cached_peak_rss_mb ranks ranks_peak_pss_mb"
    keys += " single_peak_pss_mb index_build_s index_peak_rss_mb search_ms_per_query dev_eval_s commit"
    assert set(keys.split()) <= result.keys()
    for key in ("data_first_run_s", "data_first_run_peak_rss_mb", "data_cached_s", "data_cached_peak_rss_mb"):
        assert set(result[key]) == {"train_max", "train_distill"}
        assert (
            min(result[key].values()) > 0 if key.endswith("_mb") else min(result[key].values()) >= 0
        )  # a mapped cache: 0.0 s
    assert result["ranks"] == 2 and result["ranks_peak_pss_mb"] > result["single_peak_pss_mb"] > 0
    assert set(result["search_ms_per_query"]) == {"1.1", "3.8"}
    assert all(set(ms) == {"1", "2"} for ms in result["search_ms_per_query"].values())
    assert 0.8 < result["index_detail"]["1.1"]["flops"] < 1.4 and 3.3 < result["index_detail"]["3.8"]["flops"] < 4.3
    assert result["dev_eval_s"] > 0

    # The files, read by the project's readers: the counts asked for, in the real layout
    d, n = work / "data", counts(scale)
    assert sum(1 for _ in iter_id_text(d / COLLECTION)) == n["passages"]
    queries = dict(iter_id_text(d / TRAIN_QUERIES))
    lines = list(iter_hard_negatives(d / HARD_NEGATIVES_FILE))
    assert [qid for _, qid, _, _ in lines] == sorted(queries)
    assert sum(1 for _, _, pos, _ in lines if pos) == n["with_positive"]
    assert all(list(neg) == SYSTEMS and all(len(v) == NEGS for v in neg.values()) for *_, neg in lines)
    ce = read_scores_pickle_gz(d / CE_SCORES_FILE)
    # every (query, passage) pair of a line is scored once
    assert ce.qids.tolist() == sorted(queries)
    for _, qid, pos, neg in lines[:50]:
        assert sorted(ce.row(qid)) == sorted(set(pos).union(*neg.values()))
    assert len(ce) == sum(len(set(pos).union(*neg.values())) for _, _, pos, neg in lines)
    # ~160M scores at scale 1 (197.6 a query), as the real file; a tiny collection makes the pool repeat a few ids
    assert len(ce) / len(lines) == pytest.approx(197.6, abs=6)
    with gzip.open(d / CE_SCORES_FILE) as f:
        assert f.read(2) == b"\x80\x04"  # protocol 4, as pickle.dump writes it
    dev = read_query_texts(d / "queries.dev.small.tsv")
    qrels, _ = read_qrels(d / "qrels.dev.small.tsv")
    assert len(dev) == n["dev_queries"] and set(qrels) <= set(dev)
