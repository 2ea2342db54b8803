"""Several processes: torchrun on CPUs trains one model (real DDP over gloo), and data-loader workers started
with `spawn` (macOS, Windows, Python >= 3.14) work because the scripts run under `if __name__ == "__main__"`."""

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

from conftest import ROOT

pytestmark = pytest.mark.slow

# Dropout off: the single-process run draws one dropout mask for the whole batch, DDP one per rank.
FLAGS = "--sample --max_seq_length 32 --lr 1e-3 --warmup_steps 0 --max_steps 3 --logging_steps 1".split()
FLAGS += "--eval_steps 0 --lambda_warmup_steps 0 --save_steps 3".split()

WORKER = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import train_max

trainer = train_max.main()
rank = int(os.environ.get("RANK", "0"))
params = {{name: p.detach().clone() for name, p in trainer.model.named_parameters()}}
torch.save(params, os.path.join({out!r}, f"params-world{{os.environ.get('WORLD_SIZE', '1')}}-rank{{rank}}.pt"))
"""


@pytest.fixture(scope="module")
def no_dropout_model(splade_tiny_path, tmp_path_factory):
    directory = tmp_path_factory.mktemp("splade-tiny-no-dropout")
    model = AutoModelForMaskedLM.from_pretrained(
        splade_tiny_path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(splade_tiny_path).save_pretrained(directory)
    return str(directory)


def run_worker(tmp_path, name, launcher, batch, model):
    out = tmp_path / name
    out.mkdir()
    worker = tmp_path / f"{name}_worker.py"
    worker.write_text(WORKER.format(root=str(ROOT), out=str(out)))
    flags = [*FLAGS, "--model_name", model, "--train_batch_size", str(batch), "--output_dir", str(out / "run")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, str(worker), *flags], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out, done.stdout + done.stderr


def test_two_cpu_processes_train_one_model_equal_to_one_process_on_the_same_global_batches(tmp_path, no_dropout_model):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    ddp, log = run_worker(tmp_path, "ddp", torchrun, batch=4, model=no_dropout_model)
    # One process at batch 8 sees the same global batches: the sampler's batches 2k and 2k+1 go to ranks 0 and 1,
    # and the loss ranks each query against the candidates gathered from both, in the same order.
    single, _ = run_worker(tmp_path, "single", [sys.executable], batch=8, model=no_dropout_model)
    rank0, rank1 = (torch.load(ddp / f"params-world2-rank{r}.pt") for r in (0, 1))
    reference = torch.load(single / "params-world1-rank0.pt")
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in log
    for name, value in reference.items():
        torch.testing.assert_close(rank1[name], rank0[name], atol=0, rtol=0, msg=name)  # DDP: identical replicas
        torch.testing.assert_close(rank0[name], value, atol=2e-5, rtol=1e-4, msg=name)
    initial = AutoModelForMaskedLM.from_pretrained(no_dropout_model).state_dict()
    assert not torch.equal(
        initial["bert.embeddings.word_embeddings.weight"], rank0["0.model.bert.embeddings.word_embeddings.weight"]
    )
    # Only rank 0 writes the run: one model, one card, one TensorBoard log; every rank agrees on the folder.
    run = ddp / "run"
    assert (run / "model.safetensors").is_file() and (run / "README.md").is_file()
    assert len(list((run / "runs").rglob("events.out.tfevents*"))) == 1
    assert json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert sorted(p.name for p in (run / "checkpoint-3").glob("rng_state*")) == ["rng_state_0.pth", "rng_state_1.pth"]


def test_data_loader_workers_under_spawn(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    # Make `spawn` the start method of every process, as on macOS, Windows and Python >= 3.14.
    (site / "sitecustomize.py").write_text(
        "import multiprocessing\nmultiprocessing.set_start_method('spawn', force=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(ROOT / "train_max.py"), *FLAGS, "--train_batch_size", "8",
               "--dataloader_num_workers", "2", "--output_dir", str(tmp_path / "run")]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    assert [entry["step"] for entry in state["log_history"] if "ranking_loss" in entry] == [1, 2, 3]


ROWS_WORKER = """
import collections, json, os, sys
sys.path.insert(0, {root!r})
from sentence_transformers.sparse_encoder import data_collator
import train_max

collate = data_collator.SparseEncoderDataCollator.__call__
seen = collections.Counter()
def recording(self, features):  # what the loss of this rank trains on
    seen.update(f["query"] for f in features)
    return collate(self, features)
data_collator.SparseEncoderDataCollator.__call__ = recording
trainer = train_max.main()
training_set = trainer.train_dataset.format["format_kwargs"]["transform"].ts
everyone = [training_set.queries.text(i) for i in range(len(training_set))]
rank = os.environ.get("RANK", "0")
json.dump(dict(seen=seen, everyone=everyone), open(os.path.join({out!r}, f"queries-{{rank}}.json"), "w"))
"""


def test_two_processes_train_each_query_once_per_epoch(tmp_path, splade_tiny_path):
    """torchrun, 2 processes, batches of 16, one epoch of the sample (a query count that 32 does not divide): every
    training query reaches a loss exactly once; accelerate's even_batches would train the epoch's first ones twice."""
    worker = tmp_path / "worker.py"
    worker.write_text(ROWS_WORKER.format(root=str(ROOT), out=str(tmp_path)))
    flags = "--sample --max_seq_length 16 --epochs 1 --train_batch_size 16 --eval_steps 0 --logging_steps 10".split()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    command = [*torchrun, str(worker), *flags, "--model_name", splade_tiny_path, "--output_dir", str(tmp_path / "r")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"queries-{rank}.json").read_text()) for rank in (0, 1)]
    everyone = ranks[0]["everyone"]
    assert len(everyone) % 32 != 0  # the last global batch is a partial one
    seen = Counter(ranks[0]["seen"]) + Counter(ranks[1]["seen"])
    assert seen == Counter(everyone)
    assert abs(sum(ranks[0]["seen"].values()) - sum(ranks[1]["seen"].values())) <= 1
