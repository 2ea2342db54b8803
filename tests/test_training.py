"""The two training scripts, run as a user runs them, for a few steps on the bundled sample."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SparseEncoder

from conftest import ROOT, passages_for, write_files
from data.mining import mine_distill_examples
from losses import MarginMSELossSplade
from splade_module import load_splade

pytestmark = pytest.mark.slow

# Small enough for a CPU test: 30 steps of the sample model, 3 checkpoints, 2 in-training evaluations.
QUICK = "--sample --train_batch_size 16 --max_seq_length 32 --logging_steps 1 --lr 1e-3 --warmup_steps 5".split()
QUICK += "--max_steps 30 --save_steps 10 --eval_steps 15 --lambda_warmup_steps 0".split()
MRR = re.compile(r"sample dev MRR@10: ([0-9.]+) before training, ([0-9.]+) after")


def run(script, *flags, env=None, timeout=900):
    command = [sys.executable, str(ROOT / script), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def train(script, output_dir, *flags, env=None):
    done = run(script, *QUICK, "--output_dir", str(output_dir), *flags, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def logged(output_dir, key):
    state = json.loads((newest_checkpoint(output_dir) / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


def newest_checkpoint(output_dir):
    return max(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))


@pytest.fixture(scope="module")
def max_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("max")
    # --pooling, --use_pre_trained_model, --max_passages: accepted and ignored, as the original did.
    log = train("train_max.py", output_dir, "--pooling", "cls", "--use_pre_trained_model", "--max_passages", "7")
    return output_dir, log


def test_train_max_changes_the_weights_and_logs_every_term(max_run):
    output_dir, log = max_run
    # 30 steps leave the random sample model near chance; tests/test_demo.py checks that dev MRR@10 rises
    # on the full demo, and test_train_distill_fine_tunes_splade_tiny_and_lowers_the_loss that a loss falls.
    assert MRR.search(log)
    for key in ("ranking_loss", "flops_q_loss", "flops_d_loss", "lambda_q", "lambda_d", "flops_q", "flops_d"):
        assert len(logged(output_dir, key)) == 30, key
    assert len(logged(output_dir, "active_dims_q")) == len(logged(output_dir, "active_dims_d")) == 30
    # Each step's terms add up to the loss the trainer optimised, and each FLOPS term is lambda x raw FLOPS.
    terms = {key: logged(output_dir, key) for key in ("loss", "ranking_loss", "flops_q_loss", "flops_d_loss")}
    for loss, ranking, flops_q, flops_d in zip(*terms.values()):
        assert loss == pytest.approx(ranking + flops_q + flops_d, abs=2e-4)
    for side, weight in (("q", 0.0008), ("d", 0.0006)):
        assert set(logged(output_dir, f"lambda_{side}")) == {weight}
        for term, raw in zip(logged(output_dir, f"flops_{side}_loss"), logged(output_dir, f"flops_{side}")):
            assert term == pytest.approx(weight * raw, rel=1e-3, abs=6e-5)  # the trainer logs terms to 4 decimals
    first, final = (
        load_file(output_dir / "checkpoint-10" / "model.safetensors"),
        load_file(output_dir / "model.safetensors"),
    )
    assert all(not torch.equal(first[name], final[name]) for name in final)
    for name in ("hyperparameters.json", "mining_report.json", "training_curves.png", "README.md", "train_script.py"):
        assert (output_dir / name).is_file(), name
    assert "# Script was called via:" in (output_dir / "train_script.py").read_text()
    assert json.loads((output_dir / "hyperparameters.json").read_text())["lambda_q"] == 0.0008


def test_old_flags_are_accepted_with_a_one_line_warning(max_run):
    _, log = max_run
    for flag in ("--pooling", "--use_pre_trained_model", "--max_passages"):
        assert f"warning: {flag} has no effect (as in the original script)" in log


def test_dev_mrr_is_logged_while_training_and_the_best_step_recorded(max_run):
    output_dir, log = max_run
    assert len(logged(output_dir, "eval_mrr@10")) == 2 and len(logged(output_dir, "eval_recall@1000")) == 2
    best = json.loads((output_dir / "best_dev_step.json").read_text())
    assert best["step"] in (15, 30) and best["eval_mrr@10"] == max(logged(output_dir, "eval_mrr@10"))
    assert "best dev MRR@10" in log


def test_every_checkpoint_is_a_model_and_only_the_newest_keeps_the_optimizer(max_run):
    output_dir, _ = max_run
    checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    assert [path.name for path in checkpoints] == ["checkpoint-10", "checkpoint-20", "checkpoint-30"]
    texts = ["what is the capital of france"]
    for checkpoint in checkpoints:
        vectors = SparseEncoder(str(checkpoint)).encode(texts, convert_to_sparse_tensor=False)
        assert (vectors != 0).sum() > 0, checkpoint
        assert (checkpoint / "optimizer.pt").exists() == (checkpoint == checkpoints[-1]), checkpoint


@pytest.mark.parametrize("script", ["train_max.py", "train_distill.py"])
def test_optimizer_is_the_original_adamw(script, tmp_path, monkeypatch):
    """The script's default optimizer moves every parameter by transformers' legacy AdamW update (eps 1e-6 added to
    sqrt(v) before the bias correction, weight decay 0.01 after the step, none for names containing bias,
    LayerNorm.bias or LayerNorm.weight), written out here from the gradients the trainer hands it."""
    import importlib

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    steps = []

    def before(optimizer, *_):
        if isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "state") and optimizer.param_groups:
            steps.append({"optimizer": optimizer, "groups": [
                [(p.detach().double().clone(), p.grad.detach().double().clone(), group["lr"], group["weight_decay"])
                 for p in group["params"]] for group in optimizer.param_groups]})  # fmt: skip

    def after(optimizer, *_):
        if steps and steps[-1]["optimizer"] is optimizer:
            steps[-1]["after"] = [[p.detach().double().clone() for p in g["params"]] for g in optimizer.param_groups]

    flags = ["--model_name", "sample-bert", "--data_dir", str(ROOT / "data" / "sample"), "--output_dir", str(tmp_path)]
    flags += "--train_batch_size 8 --max_seq_length 16 --max_steps 3 --warmup_steps 0 --lr 1e-3 --eval_steps 0".split()
    flags += ["--save_steps", "3"]
    monkeypatch.setattr(sys, "argv", [script, *flags])
    hooks = [register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)]
    try:
        trainer = importlib.import_module(script.removesuffix(".py")).main()
    finally:
        for hook in hooks:
            hook.remove()

    assert [type(step["optimizer"]).__name__ for step in steps] == ["LegacyAdamW"] * 3
    names = [name for name, _ in trainer.model.named_parameters()]
    exempt = [name for name in names if any(part in name for part in ("bias", "LayerNorm.bias", "LayerNorm.weight"))]
    assert [len(group) for group in steps[0]["groups"]] == [len(names) - len(exempt), len(exempt)]
    b1, b2, eps = 0.9, 0.999, 1e-6
    for group in range(2):
        for i in range(len(steps[0]["groups"][group])):
            m = v = 0.0
            for t, step in enumerate(steps, start=1):
                p, g, lr, weight_decay = step["groups"][group][i]
                assert weight_decay == (0.01 if group == 0 else 0.0) and lr > 0
                m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
                expected = p - lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (v.sqrt() + eps)
                expected = expected - lr * weight_decay * expected
                bound = 1e-6 * (expected.abs() + lr)  # float32 rounding of the parameter and of the update
                assert ((step["after"][group][i] - expected).abs() <= bound).all(), (group, i, t)
    # what resuming needs: the moments and the step count are in the checkpoint
    saved = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert {state["step"] for state in saved["state"].values()} == {3}
    assert {group["eps"] for group in saved["param_groups"]} == {1e-6}


def test_torch_adamw_on_request(tmp_path):
    flags = "--model_name sample-bert --train_batch_size 8 --max_seq_length 16 --max_steps 2 --eval_steps 0".split()
    done = run("train_max.py", *flags, "--data_dir", str(ROOT / "data" / "sample"), "--output_dir", str(tmp_path),
               "--save_steps", "2", "--optimizer", "torch_adamw")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(tmp_path / "checkpoint-2" / "optimizer.pt", weights_only=True)
    assert {float(state["step"]) for state in saved["state"].values()} == {2.0}
    assert all(
        isinstance(state["step"], torch.Tensor) for state in saved["state"].values()
    )  # torch's AdamW keeps a tensor


def test_model_card_is_sentence_transformers_own_plus_the_recipe(max_run):
    output_dir, _ = max_run
    card = (output_dir / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and "SparseEncoder" in card  # ST's generated card
    assert "## SPLADE recipe" in card and "| lambda_q | 0.0008 |" in card and "sample-dev mrr@10" in card
    # the training set is the mined queries, not the rotation's epochs x queries rows
    queries = json.loads((output_dir / "mining_report.json").read_text())["queries_kept"]
    assert f"dataset_size:{queries}" in card and f"* Size: {queries:,} training samples" in card


def test_saved_model_reloads_in_sparse_encoder_with_identical_vectors(max_run):
    output_dir, _ = max_run
    texts = ["what is the capital of france", "a passage about rivers and the sea"]
    ours = load_splade(str(output_dir))
    with torch.inference_mode():
        expected = ours[0](ours[0].preprocess(texts))["sentence_embedding"]
    theirs = SparseEncoder(str(output_dir)).encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False)
    torch.testing.assert_close(theirs, expected, atol=1e-6, rtol=0)
    assert (expected > 0).sum() > 0


def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(max_run, tmp_path):
    output_dir, _ = max_run
    command = [sys.executable, str(ROOT / "train_max.py"), *QUICK, "--output_dir", str(tmp_path)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:  # kill it hard once checkpoint-20 is complete (trainer_state.json is the last file written)
        while not (tmp_path / "checkpoint-20" / "trainer_state.json").exists() and process.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        process.kill()
        process.wait()
    assert not (tmp_path / "model.safetensors").exists(), "the run finished before it could be killed"
    shutil.rmtree(tmp_path / "checkpoint-30", ignore_errors=True)  # possibly half-written
    train("train_max.py", tmp_path, "--resume_from_checkpoint", "last")
    uninterrupted, resumed = load_file(output_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=1e-5, msg=name)


def test_train_distill_fine_tunes_splade_tiny_and_lowers_the_loss(tmp_path, splade_tiny_path):
    train("train_distill.py", tmp_path, "--model_name", splade_tiny_path, "--lr", "1e-4", "--max_steps", "20")
    # Per-batch losses are noisy: compare the MarginMSE of the same 64 training triples before and after.
    training_set = mine_distill_examples(ROOT / "data" / "sample", download=False)
    triples = [training_set.example(i, epoch=0) for i in range(64)]
    labels = torch.tensor([label for *_, label in triples])

    def margin_mse(model):
        loss = MarginMSELossSplade(model, lambda_q=0.0, lambda_d=0.0)
        features = [model[0].preprocess([triple[column] for triple in triples]) for column in range(3)]
        with torch.inference_mode():
            return loss(features, labels)["mse_loss"].item()

    before, after = margin_mse(load_splade(splade_tiny_path, 32)), margin_mse(load_splade(str(tmp_path)))
    assert after < 0.9 * before
    initial, final = load_file(f"{splade_tiny_path}/model.safetensors"), load_file(tmp_path / "model.safetensors")
    # A key bias adds q.b to every score of a query's row, which the softmax cancels: its gradient is zero up to
    # rounding, and the original's AdamW (eps before the bias correction, no decay on biases) leaves it in place.
    trained = [name for name in final if name in initial and not name.endswith("attention.self.key.bias")]
    unchanged = [name for name in trained if torch.equal(initial[name], final[name])]
    assert not unchanged, f"parameters that training did not move: {unchanged}"


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """Five training queries in the real formats: epochs of 3 batches of 2 (train_max) or 2 (train_distill)."""
    directory = tmp_path_factory.mktemp("tiny")
    lines = [{"qid": q, "pos": [100 + q], "neg": {"bm25": [200 + q, 300 + q]}} for q in range(5)]
    scores = {q: {100 + q: 5.0, 200 + q: -1.0, 300 + q: -2.0} for q in range(5)}
    pids = [[100 + q, 200 + q, 300 + q] for q in range(5)]
    return write_files(directory, passages_for(*pids), {q: f"query {q}" for q in range(5)}, lines, scores)


@pytest.mark.parametrize("script, steps_per_epoch", [("train_max.py", 3), ("train_distill.py", 2)])
def test_last_partial_batch_kept_by_train_max_dropped_by_train_distill(tiny_data, tmp_path, script, steps_per_epoch):
    flags = ["--model_name", "sample-bert", "--data_dir", str(tiny_data), "--train_batch_size", "2", "--epochs", "2"]
    flags += ["--eval_steps", "0", "--max_seq_length", "16", "--output_dir", str(tmp_path)]
    if script == "train_distill.py":
        flags += ["--save_steps", "1"]  # its default, every 10,000 steps, would not save here
    done = run(script, *flags)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        json.loads((newest_checkpoint(tmp_path) / "trainer_state.json").read_text())["global_step"]
        == 2 * steps_per_epoch
    )
    if script == "train_max.py":  # and a checkpoint at the end of every epoch, all kept
        assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--lambda_q", "-1"], "must be >= 0"),
        (["--train_batch_size", "1"], "at least 2"),
        (["--precision", "bf16"], "needs a CUDA GPU"),
        (["--model_name", "no-such-org/no-such-model"], "Cannot load a model"),
    ],
)
def test_errors_a_user_can_act_on(tmp_path, flags, message):
    if "--precision" in flags and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    done = run("train_max.py", "--sample", "--output_dir", str(tmp_path), *flags)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_data_names_the_file_and_the_run_folder_still_documents_itself(tmp_path):
    output_dir = tmp_path / "run"
    done = run("train_distill.py", "--data_dir", str(tmp_path / "empty"), "--output_dir", str(output_dir))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "collection" in done.stderr or "msmarco-hard-negatives" in done.stderr
    # Written before anything can fail, as the original wrote its script copy before training.
    assert "# Script was called via:" in (output_dir / "train_script.py").read_text()
    assert json.loads((output_dir / "hyperparameters.json").read_text())["lambda_q"] == 0.1
