"""Several processes at once, as under `torchrun --nproc_per_node 4..8`: files written by every rank, downloads asked
for by every rank, evaluation split across ranks; and nothing lost at the end of a run when the evaluation fails.

The processes are real (subprocesses, gloo for torch.distributed); the data is tiny so that the file stays fast on
2 CPU cores."""

import io
import os
import subprocess
import sys
import time
import zipfile

from conftest import ROOT
from data.atomic import atomic_path, part_name
from local_servers import FileServer

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def start_together(code, args_list, delay=1.0):
    """One Python process per argument list, all released at the same instant (after they have imported)."""
    start = time.time() + delay
    wait = f"import time\nwhile time.time() < {start}:\n    time.sleep(0.001)\n"
    return [
        subprocess.Popen(
            [sys.executable, "-c", wait + code, *map(str, args)],
            cwd=ROOT,
            env=ENV,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for args in args_list
    ]


WRITER = """
import sys
from data.atomic import write_text_atomic
path, worker = sys.argv[1], sys.argv[2]
for i in range(40):
    write_text_atomic(path, f"{worker} {i}\\n" * 5000)
"""


def test_eight_processes_writing_one_file_never_fail_and_a_reader_sees_only_whole_versions(tmp_path):
    path = tmp_path / "key.json"
    writers = start_together(WRITER, [(path, worker) for worker in range(8)])
    seen = 0
    while any(w.poll() is None for w in writers):
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:  # before the first rename
            continue
        assert len(lines) == 5000 and len(set(lines)) == 1, "a reader saw a half-written file"
        seen += 1
    outcomes = [(w.wait(), w.stderr.read()) for w in writers]
    assert all(code == 0 for code, _ in outcomes), [err[-1500:] for code, err in outcomes if code]
    assert seen > 0
    assert len(set(path.read_text().splitlines())) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.json"]  # no temporary file left


def test_leftovers_of_killed_processes_are_removed_and_those_of_running_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "collection.tsv"
    killed = tmp_path / part_name(target, dead.pid, "0123abcd")
    running = tmp_path / part_name(target, os.getpid(), "4567ef01")
    other = tmp_path / part_name(tmp_path / "queries.tsv", dead.pid, "89abcdef")
    for path in (killed, running, other):
        path.write_text("half")
    with atomic_path(target) as part:
        part.write_text("whole")
    assert target.read_text() == "whole"
    assert not killed.exists() and running.exists() and other.exists()


def beir_zip():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("toy/corpus.jsonl", '{"_id": "d1", "text": "x"}\n{"_id": "d2", "text": "z"}\n')
        archive.writestr("toy/queries.jsonl", '{"_id": "q1", "text": "y"}\n')
        archive.writestr("toy/qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    return buffer.getvalue()


RESOLVER = """
import sys
import data.download
from data.eval_sets import resolve_datasets
data.download.BEIR_URL = sys.argv[1] + "/{name}.zip"
(eval_set,) = resolve_datasets(["beir:toy"], cache_dir=sys.argv[2])
print(eval_set.name, eval_set.corpus_file, sorted(eval_set.qrels))
"""


def test_two_processes_resolving_one_beir_name_download_and_unpack_it_once(tmp_path):
    with FileServer({"/toy.zip": beir_zip()}) as server:
        server.delay = 1.0  # the second process asks while the first is still downloading
        resolvers = start_together(RESOLVER, [(server.url, tmp_path)] * 2)
        outcomes = [(r.wait(timeout=120), r.stdout.read(), r.stderr.read()) for r in resolvers]
    assert [code for code, _, _ in outcomes] == [0, 0], [err[-1500:] for _, _, err in outcomes]
    corpus = tmp_path / "beir" / "toy" / "corpus.jsonl"
    assert [out for _, out, _ in outcomes] == [f"beir-toy {corpus} ['q1']\n"] * 2
    assert [request for request in server.requests if request[0] == "GET"] == [("GET", "/toy.zip")]
    assert sorted(p.name for p in (tmp_path / "beir").iterdir()) == [".download.lock", "toy"]
