"""The --sample quick start of both training scripts learns: dev MRR@10 rises and the saved model is not all zeros.

Each test runs the real script in a subprocess, then loads the saved model with sentence-transformers as a user
would. Offline, CPU, a few minutes.
"""

import re
import subprocess
import sys

import pytest

from conftest import ROOT, SAMPLE

# train_max is shortened to 3 of its 10 epochs (the same code path); train_distill runs its --sample defaults.
DEMO_FLAGS = {"train_max.py": ["--epochs", "3"], "train_distill.py": []}
MRR_LINE = re.compile(r"sample dev MRR@10: ([0-9.]+) before training, ([0-9.]+) after")


def run_demo(script: str, output_dir) -> tuple[float, float]:
    command = [sys.executable, script, "--sample", "--output_dir", str(output_dir), *DEMO_FLAGS[script]]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    found = MRR_LINE.search(done.stdout)
    assert found, f"no MRR line in the output of {script}:\n{done.stdout[-2000:]}"
    return float(found.group(1)), float(found.group(2))


def first_texts(name: str, n: int) -> list[str]:
    lines = (SAMPLE / name).read_text(encoding="utf-8").splitlines()[:n]
    return [line.split("\t")[1] for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_max.py", "train_distill.py"])
def test_sample_demo_learns(script, tmp_path):
    before, after = run_demo(script, tmp_path / "run")
    assert after >= before + 0.1, (before, after)

    from sentence_transformers import SparseEncoder

    model = SparseEncoder(str(tmp_path / "run"), device="cpu")
    queries = model.encode_query(first_texts("queries.dev.small.tsv", 8), convert_to_tensor=True).to_dense()
    documents = model.encode_document(first_texts("collection.tsv", 8), convert_to_tensor=True).to_dense()
    # Every text keeps some terms: FLOPS did not switch the model off (all-zero vectors rank nothing).
    assert (queries > 0).sum(dim=1).min() > 0
    assert (documents > 0).sum(dim=1).min() > 0
