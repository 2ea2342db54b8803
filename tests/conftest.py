import gzip
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SPLADE_TINY = SHARED / "models" / "splade-tiny"
BEIR = SHARED / "data" / "beir"
SAMPLE = ROOT / "data" / "sample"
CE = "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"
HN = "msmarco-hard-negatives.jsonl.gz"

sys.path.insert(0, str(ROOT))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def splade_tiny_path() -> str:
    if not SPLADE_TINY.is_dir():
        pytest.skip(f"{SPLADE_TINY} is missing (the shared folder beside the repository)")
    return str(SPLADE_TINY)


# Building training files in the real formats


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
    scores = {
        1: {
            10: 5.0,
            11: 3.0,
            20: 4.0,
            21: -1.0,
            22: 0.0,
            23: -2.0,
            24: -3.0,
            25: -4.0,
            30: 0.5,
            31: -0.5,
            32: -0.75,
            40: -5.0,
            41: -6.0,
        }
    }
    lines = [{"qid": 1, "pos": [10, 11], "neg": neg}]
    write_files(
        tmp_path, passages_for([10, 11, 20, 21, 22, 23, 24, 25, 30, 31, 32, 40, 41]), {1: "what is one"}, lines, scores
    )
    return tmp_path


def negatives_of(ts, i=0):
    return {int(ts.passages.ids[k]) for k in ts.neg_idx[ts.neg_ptr[i] : ts.neg_ptr[i + 1]]}


def positives_of(ts, i=0):
    return [int(ts.passages.ids[k]) for k in ts.pos_idx[ts.pos_ptr[i] : ts.pos_ptr[i + 1]]]
