"""The two training scripts, run as a user runs them, for a few steps on the bundled sample."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SparseEncoder

from conftest import ROOT
from data.mining import mine_distill_examples
from losses import MarginMSELossSplade
from splade_module import load_splade

# Small enough for a CPU test, large enough that the random sample model leaves chance level in 30 steps.
QUICK = [
    "--sample",
    "--train_batch_size",
    "16",
    "--max_seq_length",
    "32",
    "--logging_steps",
    "1",
    "--lr",
    "1e-3",
    "--warmup_steps",
    "5",
    "--max_steps",
    "30",
    "--save_steps",
    "15",
    "--lambda_warmup_steps",
    "0",
]
MRR = re.compile(r"sample dev MRR@10: ([0-9.]+) before training, ([0-9.]+) after")


def train(script, output_dir, *flags):
    command = [sys.executable, str(ROOT / script), *QUICK, "--output_dir", str(output_dir), *flags]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def logged(output_dir, key):
    last = max(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    state = json.loads((last / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


@pytest.fixture(scope="module")
def max_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("max")
    log = train("train_max.py", output_dir)
    return output_dir, log


def test_train_max_changes_the_weights_lowers_the_loss_and_improves_dev_mrr(max_run):
    output_dir, log = max_run
    mrr_before, mrr_after = map(float, MRR.search(log).groups())
    assert mrr_after > mrr_before
    losses = logged(output_dir, "ranking_loss")
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5
    for key in ("flops_q_loss", "flops_d_loss", "lambda_q", "lambda_d", "active_dims_q", "active_dims_d"):
        assert len(logged(output_dir, key)) == 30, key
    halfway, final = (
        load_file(output_dir / "checkpoint-15" / "model.safetensors"),
        load_file(output_dir / "model.safetensors"),
    )
    assert all(not torch.equal(halfway[name], final[name]) for name in final)
    for name in ("hyperparameters.json", "mining_report.json", "training_curves.png", "README.md", "train_max.py"):
        assert (output_dir / name).is_file(), name
    assert "# Script was called via:" in (output_dir / "train_max.py").read_text()
    assert json.loads((output_dir / "hyperparameters.json").read_text())["lambda_q"] == 0.0008


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
    assert all(not torch.equal(initial[name], final[name]) for name in final if name in initial)


def test_saved_model_reloads_in_sparse_encoder_with_identical_vectors(max_run):
    output_dir, _ = max_run
    texts = ["what is the capital of france", "a passage about rivers and the sea"]
    ours = load_splade(str(output_dir))
    with torch.inference_mode():
        expected = ours[0](ours[0].preprocess(texts))["sentence_embedding"]
    theirs = SparseEncoder(str(output_dir)).encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False)
    torch.testing.assert_close(theirs, expected, atol=1e-6, rtol=0)
    assert (expected > 0).sum() > 0


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(max_run, tmp_path):
    output_dir, _ = max_run
    # An interrupted run: only its first checkpoint exists; resume it with the same flags.
    shutil.copytree(output_dir / "checkpoint-15", tmp_path / "checkpoint-15")
    train("train_max.py", tmp_path, "--resume_from_checkpoint", "last")
    uninterrupted, resumed = load_file(output_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    for name in uninterrupted:
        torch.testing.assert_close(resumed[name], uninterrupted[name], atol=1e-6, rtol=1e-5, msg=name)


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
    command = [sys.executable, str(ROOT / "train_max.py"), "--sample", "--output_dir", str(tmp_path), *flags]
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_missing_data_names_the_file_and_the_download_command(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "train_distill.py"),
        "--data_dir",
        str(tmp_path),
        "--output_dir",
        str(tmp_path),
    ]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"put the file at {tmp_path / 'collection.tar.gz'}" in done.stderr  # offline: what to do instead
    assert "Traceback" not in done.stderr
