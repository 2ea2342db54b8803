"""What the benchmark scripts share: telling whether other processes took CPU time, and a random model."""

import contextlib
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def add_model_arguments(parser) -> None:
    """--model and --decoder-bias, as every benchmark that trains or encodes takes them."""
    parser.add_argument(
        "--model",
        default=str(SHARED / "models" / "splade-tiny"),
        help="checkpoint directory, or 'distilbert-random' (DistilBERT-shaped random masked-LM)",
    )
    parser.add_argument(
        "--decoder-bias",
        type=float,
        default=0.0,
        help="distilbert-random only: constant vocabulary bias. 0 = plain init, every term active (the dense "
        "worst case of the lean head); -2.15 leaves ~250 active terms per 256-token document, as a trained SPLADE",
    )


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


def build_random_distilbert(directory: str, decoder_bias: float = 0.0, config=None) -> str:
    """A DistilBERT-shaped masked-LM (hidden 768, 6 layers, vocab 30522), seeded, saved in the SPLADE layout.

    decoder_bias: a constant vocabulary bias; 0 leaves every term active, about -2.15 a trained SPLADE's sparsity.
    config: another DistilBertConfig (e.g. a tiny one for smoke runs).
    """
    from transformers import AutoModelForMaskedLM, DistilBertConfig

    sys.path.insert(0, str(ROOT))
    from splade_module import SpladeEncoder, SpladeMax

    torch.manual_seed(0)
    mlm = AutoModelForMaskedLM.from_config(config or DistilBertConfig())
    with torch.no_grad():
        mlm.get_output_embeddings().bias.fill_(decoder_bias)
    tokenizer = offline_tokenizer()
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


SAMPLE = ROOT / "data" / "sample"

# Dense bf16 tensor-core peak FLOP/s by GPU name, first match wins (vendor data sheets, without sparsity):
# the denominator of model FLOP utilisation.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
)


def peak_bf16_flops(device_name: str) -> float | None:
    """The card's peak dense bf16 FLOP/s, or None for a card not in PEAK_BF16_FLOPS."""
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in device_name), None)


def sample_texts(file: str) -> list[str]:
    """The text column of one of data/sample's TSV files (collection.tsv, queries.train.tsv, ...)."""
    with open(SAMPLE / file, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t", 1)[1] for line in f]


def offline_tokenizer(reference: Path = SHARED / "models" / "splade-tiny"):
    """splade-tiny's tokenizer (bert-base-uncased's vocabulary) when the shared folder is there, else a WordPiece
    trained on data/sample, so that a machine without internet nor ../shared still gets a BERT-like tokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if reference.is_dir():
        return AutoTokenizer.from_pretrained(reference)
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=30522, special_tokens=specials, show_progress=False)
    wordpiece.train_from_iterator(sample_texts("collection.tsv") + sample_texts("queries.train.tsv"), trainer)
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        model_max_length=512,
        **dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), specials)),
    )
