"""bench/gpu_check.py at toy sizes on the CPU: every section reports finite numbers and passes, and a broken
comparison makes the script exit non-zero."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402  (first: it puts the repository on sys.path for the modules below)
import gpu_check_correctness  # noqa: E402
import gpu_check_helpers  # noqa: E402
import gpu_check_recipe  # noqa: E402
from common import offline_tokenizer, peak_bf16_flops  # noqa: E402


def run_smoke(tmp_path, *flags) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    done = subprocess.run(
        # a generous budget: on a shared 2-core machine the toy run takes minutes instead of one
        [sys.executable, "bench/gpu_check.py", "--smoke", "--budget", "1500", "--out", str(out), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.is_file(), done.stderr[-3000:]
    return done.returncode, json.loads(out.read_text())


def numbers(tree):
    """Every number in a JSON tree."""
    if isinstance(tree, dict):
        for value in tree.values():
            yield from numbers(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from numbers(value)
    elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
        yield tree


@pytest.mark.slow
def test_smoke_run_passes_every_section(tmp_path):
    returncode, report = run_smoke(tmp_path)
    sections = report["sections"]
    assert list(sections) == list(gpu_check.SECTIONS)
    assert returncode == 0, {name: s.get("failed") or s.get("error") for name, s in sections.items()}
    assert all(section["status"] == "passed" for section in sections.values())
    assert all(math.isfinite(x) for x in numbers(report))

    names = [c["name"] for c in sections["correctness"]["checks"]]
    for expected in ("module head gradients bf16", "head sparse grad weight fp32", "head dense grad hidden fp32"):
        assert expected in names
    assert (
        any("vs ST" in n for n in names) and any("2-rank" in n for n in names) and any("torchrun" in n for n in names)
    )
    rows = sections["recipe"]["rows"]
    assert {(r["recipe"], r["side"], r["lengths"]) for r in rows} == {
        (recipe, side, lengths)
        for recipe in ("max", "distill")
        for side in ("ours", "st")
        for lengths in ("realistic", "worst")
    }
    assert all(r["median_step_ms"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    worst = [r for r in rows if r["lengths"] == "worst"]
    assert all(r["mean_tokens_per_text"] == r["max_seq_length"] for r in worst)  # every text at max length
    training = sections["training"]
    assert [c["passed"] for c in training["checks"]] == [True, True, True]
    assert training["checks"][1]["last_step"] == gpu_check.SMOKE.train["resume"]
    assert sections["encoding"]["ours_docs_per_s"] > 0 and sections["encoding"]["st_docs_per_s"] > 0


@pytest.mark.slow
def test_a_failed_comparison_exits_non_zero(tmp_path):
    returncode, report = run_smoke(tmp_path, "--sections", "encoding", "--inject-fault")
    assert returncode == 1
    assert report["sections"]["encoding"]["status"] == "failed"
    assert report["sections"]["encoding"]["failed"] == ["fp32 vectors vs SparseEncoder.encode_document"]


def test_comparison_tolerances():
    import torch

    class Ctx:
        fault = 0.0

    reference = torch.tensor([1.0, -2.0, 3.0])
    assert gpu_check_correctness.check(Ctx, "same", reference.clone(), reference)["passed"]
    assert not gpu_check_correctness.check(Ctx, "off", reference + 1e-2, reference)["passed"]
    assert gpu_check_correctness.check(Ctx, "bf16 rounding", reference * (1 + 2**-8), reference, "bf16")["passed"]
    assert not gpu_check_correctness.check(Ctx, "nan", reference * float("nan"), reference)["passed"]
    Ctx.fault = 0.01
    assert not gpu_check_correctness.check(Ctx, "injected", reference.clone(), reference)["passed"]


def test_exit_status():
    section = lambda status: {"status": status}  # noqa: E731
    assert gpu_check.exit_status({"sections": {"a": section("passed"), "b": section("skipped")}}) == 0
    assert gpu_check.exit_status({"sections": {"a": section("error"), "b": section("failed")}}) == 1
    assert gpu_check.exit_status({"sections": {"a": section("passed"), "b": section("error")}}) == 2


def test_peak_flops_by_card_name():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12
    assert peak_bf16_flops("Some Future GPU") is None


def test_offline_tokenizer_without_the_shared_folder(tmp_path):
    tokenizer = offline_tokenizer(tmp_path / "missing")
    ids = tokenizer("Where is the seasonal fog of Ghana")["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids and len(ids) < 12  # a word vocabulary trained on the sample
    assert tokenizer(["a", "a b c"], padding=True)["attention_mask"][0][-1] == 0


def test_worst_case_texts_reach_max_length():
    tokenizer = offline_tokenizer()
    for text in gpu_check_helpers.long_texts(3, 300):
        assert len(tokenizer(text)["input_ids"]) > 300
    columns = gpu_check_helpers.batch_texts(5, None)
    assert [len(v) for v in columns.values()] == [5, 5, 5]
    assert len(set(columns["positive"] + columns["negative"])) == 10


def test_largest_batch_doubles_then_bisects(monkeypatch):
    tried = []

    def fits_below_300(loss, optimizer, model, recipe, batch, length):
        tried.append(batch)
        return batch < 300

    monkeypatch.setattr(gpu_check_recipe, "fits", fits_below_300)
    result = gpu_check_recipe.largest_batch(None, None, None, "max", 64, 300, seconds=60)
    assert tried[:3] == [128, 256, 512]  # doubling from the recipe's batch, which is known to fit
    assert 300 - 300 // 16 <= result["max_batch"] < 300 and result["first_oom"] >= 300
    assert result["search_complete"]
    assert gpu_check_recipe.largest_batch(None, None, None, "max", 64, 300, seconds=0)["search_complete"] is False
