"""What the benchmark scripts share: telling whether other processes took CPU time, and a random model."""

import contextlib
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def cpu_counters() -> tuple[int, int, int]:
    """(all jiffies, idle jiffies, this process's jiffies) from /proc: what others used is the rest of the busy time."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(values), values[3] + values[4], int(own[11]) + int(own[12])


def wait_for_idle(max_seconds: float, threshold_pct: float = 5.0) -> float:
    """Wait until other processes use under threshold_pct of the CPU over one second; their last share."""
    deadline = time.monotonic() + max_seconds
    while True:
        before = cpu_counters()
        time.sleep(1.0)
        others = others_cpu_pct(before, cpu_counters())
        if others < threshold_pct or time.monotonic() > deadline:
            return others
        time.sleep(4.0)


def others_cpu_pct(before: tuple[int, int, int], after: tuple[int, int, int]) -> float:
    """Share of the machine's CPU time that other processes took between two cpu_counters() readings."""
    total, idle, own = (a - b for a, b in zip(after, before))
    return round(100 * max(0, total - idle - own) / max(1, total), 1)


def build_random_distilbert(directory: str, decoder_bias: float = 0.0) -> str:
    """A DistilBERT-shaped masked-LM (hidden 768, 6 layers, vocab 30522), seeded, saved in the SPLADE layout.

    decoder_bias: a constant vocabulary bias; 0 leaves every term active, about -2.15 a trained SPLADE's sparsity.
    """
    from transformers import AutoModelForMaskedLM, AutoTokenizer, DistilBertConfig

    sys.path.insert(0, str(ROOT))
    from splade_module import SpladeEncoder, SpladeMax

    torch.manual_seed(0)
    mlm = AutoModelForMaskedLM.from_config(DistilBertConfig())
    with torch.no_grad():
        mlm.get_output_embeddings().bias.fill_(decoder_bias)
    tokenizer = AutoTokenizer.from_pretrained(SHARED / "models" / "splade-tiny")
    SpladeEncoder(modules=[SpladeMax(mlm=mlm, tokenizer=tokenizer, max_seq_length=512)]).save(directory)
    return directory


def machine_name(device: str) -> str:
    """The GPU's name, or the CPU model and core count."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()} cores"
    return "unknown"
