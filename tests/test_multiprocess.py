"""Several processes at once, as under `torchrun --nproc_per_node 4..8`: files written by every rank, downloads asked
for by every rank, evaluation split across ranks; and nothing lost at the end of a run when the evaluation fails.

The processes are real (subprocesses, gloo for torch.distributed); the data is tiny so that the file stays fast on
2 CPU cores."""

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import zipfile

import pytest
from sentence_transformers import SparseEncoder

import encoding
import evaluate
from conftest import BEIR, CE, HN, ROOT, SAMPLE
from data.atomic import atomic_path, part_name
from encoding import ShardsMissing, wait_for_shards
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


def test_wait_for_shards_gives_up_naming_the_missing_shards_and_a_new_shard_restarts_the_clock(tmp_path):
    shards = [tmp_path / f"docs-{i:05d}.npz" for i in range(4)]
    shards[0].write_bytes(b"rank 0's")
    threading.Timer(0.3, shards[2].write_bytes, [b"rank 2's, late"]).start()
    started = time.monotonic()
    with pytest.raises(ShardsMissing) as error:
        wait_for_shards(shards, timeout=0.5, world_size=4, poll_seconds=0.05)
    assert time.monotonic() - started >= 0.75  # 0.3 s to the late shard, then 0.5 s without one
    message = str(error.value)
    assert "2 of 4 missing" in message and "docs-00001.npz (rank 1), docs-00003.npz (rank 3)" in message
    assert "run the same command again" in message and "docs-00002" not in message
    wait_for_shards(shards[:1] + shards[2:3], timeout=0)  # all there: no wait, no error


# Under torchrun: a worker that shrinks the shards (several per rank on a tiny corpus) and records, per rank, which
# shards it encoded; then runs the real entry point.
TORCHRUN_WORKER = """
import os, sys, time
sys.path.insert(0, {root!r})
import encoding

OUT, RANK = {out!r}, os.environ.get("RANK", "0")
encoding.SHARD_SIZE = {shard_size}
encode = encoding.encode


def recording_encode(model, texts, *args, desc="encode", **kwargs):
    if RANK != "0" and "[" in desc:
        time.sleep(0.5)  # the other ranks lag behind the first: it has to wait for their shards
    with open(os.path.join(OUT, f"encoded-rank{{RANK}}.txt"), "a") as log:
        log.write(desc + "\\\\n")
    return encode(model, texts, *args, desc=desc, **kwargs)


encoding.encode = recording_encode
{main}
"""
EVALUATE_MAIN = (
    "import evaluate\nfrom errors import main_exits_2_on_user_error\nmain_exits_2_on_user_error(evaluate.main)"
)


def launch(tmp_path, name, processes, main, args, shard_size, env=None):
    out = tmp_path / name
    out.mkdir()
    worker = tmp_path / f"{name}_worker.py"
    worker.write_text(TORCHRUN_WORKER.format(root=str(ROOT), out=str(out), shard_size=shard_size, main=main))
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]  # a free port
    done = subprocess.run([*launcher, str(worker), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**ENV, **(env or {})}, timeout=900)  # fmt: skip
    return out, done


def encoded_shards(out):
    """{rank: sorted shard numbers (1-based) it encoded}, from the corpus shards' progress descriptions."""
    shards = {}
    for log in out.glob("encoded-rank*.txt"):
        found = re.findall(r"\[(\d+)/\d+\]", log.read_text())
        shards[int(log.stem.split("rank")[1])] = sorted(int(i) for i in found)
    return shards


def without_timings(metrics):
    return {name: {k: v for k, v in m.items() if not k.endswith("_seconds") and k != "doc_vectors_cached"}
            for name, m in metrics.items()}  # fmt: skip


@pytest.mark.slow
def test_torchrun_evaluate_on_2_and_4_processes_with_an_empty_cache_equals_one_process(tmp_path, splade_tiny_path):
    from test_evaluate import beir_subset

    beir = beir_subset(BEIR / "cranfield", tmp_path / "cranfield", num_queries=12, first_docs=60)  # ~ 90 documents
    outputs = {}
    for processes in (1, 2, 4):
        args = [splade_tiny_path, "--beir", beir, "--output", tmp_path / f"eval-{processes}", "--max_seq_length", 64,
                "--cache_dir", tmp_path / f"cache-{processes}", "--batch_size", 8]  # fmt: skip
        out, done = launch(tmp_path, f"world{processes}", processes, EVALUATE_MAIN, args, shard_size=10)
        assert done.returncode == 0, done.stderr[-4000:]
        outputs[processes] = out
        shards = encoded_shards(out)
        count = max(max(found) for found in shards.values())
        assert count >= 8  # several shards per rank
        assert shards == {r: list(range(r + 1, count + 1, processes)) for r in range(processes)}  # shard i: rank i % N
    reference = json.loads((tmp_path / "eval-1" / "metrics.json").read_text())
    assert reference["beir-cranfield"]["num_queries"] == 12 and reference["beir-cranfield"]["ndcg@10"] > 0.05
    for processes in (2, 4):
        metrics = json.loads((tmp_path / f"eval-{processes}" / "metrics.json").read_text())
        assert without_timings(metrics) == without_timings(reference), processes
        run = (tmp_path / f"eval-{processes}" / "runs" / "beir-cranfield.trec").read_bytes()
        assert run == (tmp_path / "eval-1" / "runs" / "beir-cranfield.trec").read_bytes(), processes


# Training: a few steps of the sample model, no in-training evaluation.
TRAIN = "--sample --train_batch_size 16 --max_seq_length 32 --warmup_steps 0 --eval_steps 0 --logging_steps 1".split()
NO_INTERNET = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": ""}


@pytest.fixture(scope="module")
def failed_evaluation(tmp_path_factory):
    """train_max.py --evaluate on a data folder without the dev files and without internet: the evaluation fails."""
    root = tmp_path_factory.mktemp("failed-evaluation")
    data = root / "data"
    data.mkdir()
    for name in ("collection.tsv", "queries.train.tsv", HN, CE):
        shutil.copy(SAMPLE / name, data / name)
    run = root / "run"
    command = [sys.executable, "train_max.py", *TRAIN, "--max_steps", "2", "--save_steps", "1", "--evaluate",
               "--data_dir", str(data), "--output_dir", str(run)]  # fmt: skip
    env = {**ENV, **NO_INTERNET, "SPLADE_CACHE_DIR": str(root / "cache")}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    return data, run, done, env


@pytest.mark.slow
def test_a_failing_evaluate_leaves_a_loadable_final_model_exits_2_and_prints_the_command_that_reruns_it(
    failed_evaluation,
):
    data, run, done, env = failed_evaluation
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "the final evaluation (--evaluate) failed" in done.stderr
    for name in ("modules.json", "model.safetensors", "README.md", "mining_report.json", "training_curves.png"):
        assert (run / name).is_file(), name
    assert "## SPLADE recipe" in (run / "README.md").read_text()
    model = SparseEncoder(str(run), device="cpu")
    assert (model.encode(["what is the capital of france"], convert_to_tensor=True).to_dense() > 0).sum() > 0
    # The command it prints evaluates the saved model once the dev files are there.
    rerun = re.search(r"Rerun the evaluation with: (.*)", done.stderr).group(1)
    assert rerun == f"python evaluate.py {run} --msmarco --data_dir {data} --output {run / 'eval'}"
    for name in ("queries.dev.small.tsv", "qrels.dev.small.tsv"):
        shutil.copy(SAMPLE / name, data / name)
    again = subprocess.run(shlex.split(rerun), cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((run / "eval" / "metrics.json").read_text())["msmarco-dev"]["num_queries"] == 150


@pytest.mark.slow
def test_resume_from_last_skips_a_half_written_checkpoint(failed_evaluation, tmp_path):
    data, finished, _, env = failed_evaluation
    run = shutil.copytree(finished, tmp_path / "run")
    # A kill while checkpoint-3 was being written: the model half there, no optimizer, no trainer_state.json.
    half = run / "checkpoint-3"
    half.mkdir()
    shutil.copy(run / "checkpoint-2" / "config.json", half / "config.json")
    (half / "model.safetensors").write_bytes((run / "checkpoint-2" / "model.safetensors").read_bytes()[:1000])
    command = [sys.executable, "train_max.py", *TRAIN, "--max_steps", "3", "--save_steps", "1",
               "--data_dir", str(data), "--output_dir", str(run), "--resume_from_checkpoint", "last"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipping incomplete checkpoint-3: no optimizer.pt, scheduler.pt, readable trainer_state.json" in done.stderr
    assert "resuming from checkpoint-2" in done.stderr
    state = json.loads((half / "trainer_state.json").read_text())  # written anew, complete
    assert state["global_step"] == 3 and [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3]


# Training under torchrun: which processes build the dev subset, and the process group's timeout.
TRAIN_MAIN = """
import dev_eval
import torch

sample_collection = dev_eval.sample_collection


def recording_sample_collection(*args, **kwargs):
    open(os.path.join(OUT, f"dev-subset-rank{RANK}"), "w").close()
    return sample_collection(*args, **kwargs)


dev_eval.sample_collection = recording_sample_collection
import train_max
from errors import main_exits_2_on_user_error

main_exits_2_on_user_error(train_max.main)
backend = torch.distributed.group.WORLD._get_backend(torch.device("cpu"))
with open(os.path.join(OUT, f"timeout-rank{RANK}"), "w") as f:
    f.write(str(backend.options._timeout.total_seconds()))
"""


@pytest.mark.slow
def test_torchrun_training_evaluates_on_every_process_and_builds_the_dev_subset_once(tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = [*TRAIN, "--max_steps", "2", "--eval_steps", "2", "--evaluate", "--ddp_timeout", "1234",
            "--output_dir", run]  # fmt: skip
    out, done = launch(tmp_path, "train", 2, TRAIN_MAIN, args, shard_size=1000,
                       env={"SPLADE_CACHE_DIR": str(tmp_path / "cache")})  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    # The process group was made with --ddp_timeout, not the backend's default.
    assert [(out / f"timeout-rank{r}").read_text() for r in (0, 1)] == ["1234.0", "1234.0"]
    assert sorted(p.name for p in out.glob("dev-subset-rank*")) == ["dev-subset-rank0"]
    # The sample's 3,358 passages in 4 shards: the second process encodes its two in the final evaluation.
    assert encoded_shards(out)[1] == [2, 4]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["msmarco-dev"]["num_queries"] == 150 and metrics["msmarco-dev"]["num_docs"] == 3358
    card = (run / "README.md").read_text()
    assert card.index("## SPLADE recipe") < card.index("### Final evaluation") and '"msmarco-dev"' in card
    # It evaluated the saved folder: `evaluate.py <run folder>` finds the document vectors in the cache.
    monkeypatch.setattr(encoding, "SHARD_SIZE", 1000)
    again = evaluate.evaluate_model(str(run), ["msmarco"], data_dir=SAMPLE, cache_dir=tmp_path / "cache")
    assert again["msmarco-dev"]["doc_vectors_cached"]
    assert without_timings(again) == without_timings(metrics)
