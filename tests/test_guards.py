"""A run that diverges or collapses stops at once with a message saying what happened and what to try; the last
good checkpoint stays and no final model is written."""

import os
import re
import subprocess
import sys
import types

import pytest
import torch

import training
from conftest import ROOT
from gloo import run_ranks

pytestmark = pytest.mark.slow

QUICK = "--sample --train_batch_size 8 --max_seq_length 16 --logging_steps 1 --warmup_steps 0 --eval_steps 0".split()
QUICK += "--lambda_warmup_steps 0 --save_steps 2 --max_steps 200".split()


def run(output_dir, *flags):
    command = [sys.executable, str(ROOT / "train_max.py"), *QUICK, "--output_dir", str(output_dir), *flags]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=os.environ)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stderr


def test_a_non_finite_loss_stops_the_run_at_once(tmp_path):
    # A learning rate of 1e30 blows the weights up within a couple of steps.
    stderr = run(tmp_path, "--lr", "1e30")
    step = int(re.search(r"training stopped at step (\d+): the loss is not finite", stderr).group(1))
    assert step < 10
    assert "loss terms: {'ranking_loss'" in stderr
    for hint in ("--lambda_warmup_steps", "--lambda_q / --lambda_d", "--lr"):
        assert hint in stderr
    assert not (tmp_path / "model.safetensors").exists()  # nothing corrupted written as the final model


def test_all_zero_vectors_stop_the_run_and_name_the_flops_regulariser(tmp_path):
    # Absurd lambdas silence every activation in a few steps; relu then passes no gradient to revive them.
    stderr = run(tmp_path, "--lambda_q", "1e4", "--lambda_d", "1e4", "--lr", "0.05", "--collapse_patience", "3")
    assert "the FLOPS regulariser has killed every activation" in stderr
    step = int(re.search(r"training stopped at step (\d+)", stderr).group(1))
    assert step < 200
    assert step >= 3  # 3 logging steps in a row (logs at steps 1, 2, 3, ...): checkpoint-2 exists by then
    checkpoint = re.search(r"Last checkpoint: (\S+);", stderr).group(1)  # saving comes after logging in a step
    assert checkpoint.endswith(f"checkpoint-{2 * ((step - 1) // 2)}") and os.path.isdir(checkpoint)
    assert not (tmp_path / "model.safetensors").exists()


# Rank 1's losses; rank 0's are always finite. With --max_skipped_steps 2, the fifth is the third non-finite in a row.
RANK1_LOSSES = [float("nan"), 1.0, float("inf"), float("nan"), float("nan"), 1.0]


def _decisions(rank, world, fp16, output_dir):
    """What one rank's guard decides at each step: 'ok', 'skip' (GradScaler skips it) or the stop message."""
    trainer = training.SpladeTrainer.__new__(training.SpladeTrainer)
    trainer.args = types.SimpleNamespace(fp16=fp16, output_dir=output_dir)
    trainer.max_skipped_steps, trainer.skipped_steps, trainer.last_terms = 2, 0, {}
    decisions = []
    for step, value in enumerate(RANK1_LOSSES):
        trainer.state = types.SimpleNamespace(global_step=step)
        try:
            trainer.check_finite(torch.tensor(value if rank == 1 else 2.0))
            decisions.append("skip" if trainer.skipped_steps else "ok")
        except training.TrainingStopped as stopped:
            decisions.append(str(stopped).splitlines()[0])
            break
    return decisions


@pytest.mark.parametrize("fp16", [True, False])
def test_every_rank_takes_the_same_decision_and_fp16_skips_until_it_persists(tmp_path, fp16):
    """2 gloo processes, only rank 1's loss is not finite: both ranks skip (fp16) or stop (bf16/fp32) together."""
    rank0, rank1 = run_ranks(_decisions, fp16, str(tmp_path))
    assert rank0 == rank1
    if fp16:
        stop = "training stopped at step 4: the loss has not been finite for 3 steps in a row under fp16 loss scaling"
        assert rank0 == ["skip", "ok", "skip", "skip", f"{stop} (--max_skipped_steps 2)."]
    else:
        assert rank0 == ["training stopped at step 0: the loss is not finite (on at least one rank)."]
