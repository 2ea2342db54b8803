"""data.mined_cache: one mined training set per machine, saved once and mapped by every process and worker.

The cache must give exactly what mining in memory gives, be rebuilt when a data file or a mining parameter changes,
reach data-loader workers as a path (not a pickled copy of the passages), and be mined by one process of several.
"""

import hashlib
import mmap
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, SAMPLE
from data.mining import mine_distill_examples, mine_max_examples
from data.rotation import make_train_dataset

SAMPLE_FILES = ["collection.tsv", "queries.train.tsv", "msmarco-hard-negatives.jsonl.gz",
                "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"]  # fmt: skip


@pytest.fixture
def sample_copy(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for name in SAMPLE_FILES:
        shutil.copy2(SAMPLE / name, d / name)
    return d


def digest(ts):
    """Every array and text of a training set, hashed."""
    h = hashlib.sha256()
    for a in (ts.pos_ptr, ts.pos_idx, ts.pos_ce, ts.neg_ptr, ts.neg_idx, ts.neg_ce):
        h.update(np.ascontiguousarray(a).tobytes())
    for table in (ts.queries, ts.passages):
        h.update(np.ascontiguousarray(table.ids).tobytes() + bytes(table.blob) + table.offsets.tobytes())
    return h.hexdigest()


def is_mapped(a):
    while a is not None:
        if isinstance(a, mmap.mmap):
            return True
        a = getattr(a, "base", None) if not isinstance(a, np.memmap) else a._mmap
    return False


def cache_folders(d):
    return sorted(p.name for p in (d / "mined-cache").iterdir() if p.is_dir())


def test_cache_gives_what_mining_gives_and_is_rebuilt_when_a_file_or_a_parameter_changes(sample_copy, capsys):
    reference = mine_max_examples(sample_copy, download=False, cache=False)
    first = mine_max_examples(sample_copy, download=False)
    assert "no cache in" in capsys.readouterr().out and first.report["cache"]["hit"] is False
    again = mine_max_examples(sample_copy, download=False)
    assert "no cache in" not in capsys.readouterr().out and again.report["cache"]["hit"] is True
    assert digest(reference) == digest(first) == digest(again)
    assert is_mapped(again.passages.blob) and is_mapped(again.neg_idx)
    timing = ("cache", "seconds", "peak_rss_mb")
    assert {k: v for k, v in again.report.items() if k not in timing} == {
        k: v for k, v in reference.report.items() if k not in timing
    }
    assert len(cache_folders(sample_copy)) == 1

    # A mining parameter: a new cache, holding what mining with it gives.
    margin = mine_max_examples(sample_copy, ce_score_margin=1.0, download=False)
    assert margin.report["cache"]["hit"] is False and len(cache_folders(sample_copy)) == 2
    assert digest(margin) == digest(mine_max_examples(sample_copy, ce_score_margin=1.0, download=False, cache=False))
    assert mine_distill_examples(sample_copy, download=False).report["cache"]["hit"] is False  # another script

    # A data file: same size, a query text changed (and a new mtime): mined again, the new text is in it.
    path = sample_copy / "queries.train.tsv"
    text = path.read_bytes()
    qid = int(reference.qids[0])
    start = (b"\n" + text).index(f"\n{qid}\t".encode()) + len(f"{qid}\t")  # the first letter of its text
    changed = text[:start] + b"X" + text[start + 1 :]
    path.write_bytes(changed)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    rebuilt = mine_max_examples(sample_copy, download=False)
    assert rebuilt.report["cache"]["hit"] is False and rebuilt.queries.text(0).startswith("X")


def test_spawned_data_loader_worker_maps_the_cache_and_receives_no_copy_of_the_passages(sample_copy):
    ts = mine_max_examples(sample_copy, download=False)
    dataset = make_train_dataset(ts, epochs=2)
    passages_bytes = len(ts.passages.blob)
    assert len(pickle.dumps(ts)) < 4096 < passages_bytes  # the folder's path and the report
    loader = torch.utils.data.DataLoader(
        WorkerProbe(dataset), batch_size=None, num_workers=2, multiprocessing_context="spawn"
    )
    got = list(loader)
    assert [g[0] for g in got] == [dataset[i] for i in range(len(dataset))]  # the same examples
    assert all(mapped for _, mapped in got)  # read from the map in the worker


class WorkerProbe(torch.utils.data.Dataset):
    """Row i of the train dataset, and whether the worker's training set reads the passages from a map."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        transform = self.dataset._format_kwargs["transform"]
        return self.dataset[i], is_mapped(transform.ts.passages.blob) and transform.ts.folder is not None


WORKER = """
import os, sys
sys.path.insert(0, {root!r})
import train_max

mined = []
def capture(*args, **kwargs):
    mined.append(train_max_mine(*args, **kwargs))
    return mined[-1]
train_max_mine, train_max.mine_max_examples = train_max.mine_max_examples, capture
train_max.main()
sys.path.insert(0, {tests!r})
from test_mined_cache import digest, is_mapped
ts = mined[0]
assert is_mapped(ts.passages.blob), "rank does not read the mapped cache"
with open(os.path.join({out!r}, "digest-rank" + os.environ["RANK"]), "w") as f:
    f.write(digest(ts))
"""


@pytest.mark.slow
def test_two_processes_map_one_cache_mined_by_one_of_them(sample_copy, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), out=str(out)))
    flags = "--sample --max_seq_length 32 --max_steps 1 --logging_steps 1 --eval_steps 0 --train_batch_size 4".split()
    flags += ["--data_dir", str(sample_copy), "--output_dir", str(tmp_path / "run")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*torchrun, str(worker), *flags], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert log.count("no cache in") == 1  # one process mined ...
    assert log.count("cache: hit") == 1  # ... the other mapped what it wrote
    ranks = [(out / f"digest-rank{r}").read_text() for r in (0, 1)]
    assert ranks[0] == ranks[1] == digest(mine_max_examples(sample_copy, download=False, cache=False))
    assert len(cache_folders(sample_copy)) == 1
