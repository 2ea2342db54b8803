"""What train_max.py and train_distill.py share: flags, model, trainer, logging and the output folder.

The two scripts read as the recipe (data -> model -> loss -> train -> save -> evaluate); the mechanics
behind each of those steps live here once.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from sentence_transformers.sparse_encoder import SparseEncoderTrainer, SparseEncoderTrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from splade_module import SpladeEncoder, SpladeMax, load_splade

SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "sample"
SAMPLE_MODEL = "sample-bert"  # --model_name value that builds the small random masked-LM offline

# --sample: settings that make a run take minutes on a CPU. A flag given on the command line still wins.
SAMPLE_DEFAULTS = dict(
    model_name=SAMPLE_MODEL,
    train_batch_size=32,
    max_seq_length=64,
    epochs=10,
    warmup_steps=20,
    lr=2e-3,
    lambda_warmup_steps=100,
    precision="fp32",
    logging_steps=10,
    save_steps=100,
)

HELP = {
    "train_batch_size": "queries per batch (each with one positive and one negative)",
    "max_seq_length": "truncate queries and passages to this many tokens",
    "model_name": f"masked-LM to start from: hub id or local directory ('{SAMPLE_MODEL}': a small random BERT "
    "with a vocabulary trained on the sample, built offline)",
    "lambda_q": "weight of the FLOPS regulariser on queries",
    "lambda_d": "weight of the FLOPS regulariser on documents",
    "epochs": "passes over the training queries (each epoch takes every query's next positive and negative)",
    "warmup_steps": "linear learning-rate warm-up steps (then linear decay to 0)",
    "lr": "peak learning rate of AdamW",
    "num_negs_per_system": "hard negatives taken from each retrieval system of the hard-negatives file",
    "negs_to_use": "comma list of systems to take negatives from (default: every system in the file)",
    "use_all_queries": "keep queries that have a positive but no negative left after filtering",
    "ce_score_margin": "drop a negative whose cross-encoder score is above min(CE(positives)) - margin",
    "max_passages": "train on at most this many queries (0 = all)",
    "lambda_warmup_steps": "quadratic lambda warm-up: lambda_t = lambda * min(1, t/T)^2 (0 = constant, the original)",
}


def parse_args(description: str, hyperparameters: dict, argv: list[str] | None = None) -> argparse.Namespace:
    """Flags named as the seed named them, defaulting to the script's hyperparameter block."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in hyperparameters.items():
        if isinstance(default, bool):
            parser.add_argument(f"--{name}", action="store_true", default=default, help=HELP[name])
        else:
            parser.add_argument(
                f"--{name}", type=type(default) if default is not None else str, default=default, help=HELP[name]
            )
    parser.add_argument(
        "--sample",
        action="store_true",
        help=f"train on the bundled data/sample/ offline in minutes (changes the defaults to {SAMPLE_DEFAULTS})",
    )
    parser.add_argument(
        "--data_dir", default="msmarco-data", help="where the MS MARCO files are (downloaded when missing)"
    )
    parser.add_argument("--output_dir", default=None, help="run folder (default: output/<name as the seed named it>)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the model init, data order and negatives")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="auto: bf16 on GPUs that support it, else fp16 with loss scaling on GPUs, fp32 on CPU",
    )
    parser.add_argument("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (quick runs)")
    parser.add_argument("--save_steps", type=int, default=2000, help="checkpoint every this many steps")
    parser.add_argument("--save_total_limit", type=int, default=3, help="keep this many checkpoints")
    parser.add_argument(
        "--logging_steps", type=int, default=100, help="log loss terms, lambdas and active dims every N steps"
    )
    parser.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="a checkpoint folder, or 'last' for the newest checkpoint in --output_dir",
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument(
        "--no_lean_head",
        action="store_true",
        help="plain autograd through the SPLADE max instead of the memory-lean head (same numbers)",
    )
    parser.add_argument(
        "--evaluate",
        action="store_true",
        help="after training, evaluate (sample dev, or MS MARCO dev + TREC DL 2019/2020) into the model card",
    )
    if "--sample" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**SAMPLE_DEFAULTS, data_dir=str(SAMPLE_DIR))
    args = parser.parse_args(argv)
    check_args(args)
    sys.excepthook = _report_user_errors
    return args


def _report_user_errors(kind, error, traceback) -> None:
    """Bad or missing data gets its message, not a traceback; anything else (a bug) keeps its traceback."""
    from data.download import DownloadError
    from data.readers import DataError

    if issubclass(kind, (DataError, DownloadError, FileNotFoundError)):
        print(f"error: {error}", file=sys.stderr)
    else:
        sys.__excepthook__(kind, error, traceback)


def check_args(args: argparse.Namespace) -> None:
    if args.lambda_q < 0 or args.lambda_d < 0:
        sys.exit(f"error: --lambda_q and --lambda_d must be >= 0 (got {args.lambda_q}, {args.lambda_d})")
    if args.train_batch_size < 2:
        sys.exit("error: --train_batch_size must be at least 2: the other queries' passages are the in-batch negatives")
    if args.precision in ("fp16", "bf16") and not torch.cuda.is_available():
        sys.exit(
            f"error: --precision {args.precision} needs a CUDA GPU and none is visible; use --precision fp32 on CPU"
        )
    if args.precision == "bf16" and not torch.cuda.is_bf16_supported():
        sys.exit("error: this GPU does not support bf16; use --precision fp16")


def precision_flags(precision: str) -> dict[str, bool]:
    if precision == "auto":
        if not torch.cuda.is_available():
            precision = "fp32"
        else:
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def build_model(args: argparse.Namespace, training_texts) -> SpladeEncoder:
    """The masked-LM to train: the sample's small random BERT, or a checkpoint by name or path."""
    if args.model_name == SAMPLE_MODEL:
        return build_sample_model(training_texts, args.max_seq_length, args.seed, lean_head=not args.no_lean_head)
    try:
        return load_splade(args.model_name, args.max_seq_length, lean_head=not args.no_lean_head)
    except OSError as error:
        sys.exit(
            f"error: {error}\nWithout internet, pass a local directory (e.g. --model_name ../shared/models/splade-tiny)."
        )


def build_sample_model(texts, max_seq_length: int, seed: int, lean_head: bool = True) -> SpladeEncoder:
    """A 2-layer BERT masked-LM, randomly initialised, with a word vocabulary trained on `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocabulary = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    vocabulary.normalizer = normalizers.BertNormalizer(lowercase=True)
    vocabulary.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    vocabulary.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials, show_progress=False))
    # Whole words, numbered in sorted order: the same vocabulary in every run, so that a resumed run
    # rebuilds exactly the model it resumes (subword trainers break ties in hash-map order).
    learned = sorted(set(vocabulary.get_vocab()) - set(specials))
    vocabulary.model = models.WordLevel({token: i for i, token in enumerate(specials + learned)}, unk_token="[UNK]")
    cls, sep = vocabulary.token_to_id("[CLS]"), vocabulary.token_to_id("[SEP]")
    vocabulary.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=vocabulary,
        model_max_length=max_seq_length,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    config = BertConfig(
        vocab_size=vocabulary.get_vocab_size(),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=512,
        max_position_embeddings=max(512, max_seq_length),
        pad_token_id=0,
        architectures=["BertForMaskedLM"],
    )
    torch.manual_seed(seed)
    mlm = BertForMaskedLM(config)
    return SpladeEncoder(
        modules=[SpladeMax(mlm=mlm, tokenizer=tokenizer, max_seq_length=max_seq_length, lean_head=lean_head)]
    )


def run_dir(args: argparse.Namespace, name: str) -> Path:
    """The run folder: --output_dir, the folder of the checkpoint to resume, or output/<name>-<timestamp>."""
    if args.output_dir:
        return Path(args.output_dir)
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "last":
        return Path(args.resume_from_checkpoint).resolve().parent
    if args.resume_from_checkpoint == "last":
        sys.exit("error: --resume_from_checkpoint last needs --output_dir (the run folder to resume)")
    model = (
        "sample" if args.sample and args.model_name == SAMPLE_MODEL else args.model_name.strip("/").replace("/", "-")
    )
    return Path("output") / f"{name.format(model=model)}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"


class SpladeTrainer(SparseEncoderTrainer):
    """sentence-transformers' trainer, plus: the loss's lambda warm-up follows the optimizer step, and
    every log carries the lambdas, raw FLOPS and active dimensions besides the loss terms."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.loss.step = self.state.global_step
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs = {**logs, **{name: round(value, 6) for name, value in self.loss.pop_stats().items()}}
        super().log(logs, start_time)


def make_trainer(model, loss, train_dataset, args: argparse.Namespace, output_dir: Path) -> SpladeTrainer:
    """AdamW (weight decay 0.01 except biases and LayerNorm weights), linear warm-up and decay,
    gradient clipping 1.0, mixed precision, checkpoints, TensorBoard, the per-epoch negative rotation."""
    from data.rotation import EpochRotationBatchSampler

    training_args = SparseEncoderTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.train_batch_size,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="linear",
        optim="adamw_torch",
        weight_decay=0.01,
        max_grad_norm=1.0,
        **precision_flags(args.precision),
        seed=args.seed,
        batch_sampler=EpochRotationBatchSampler,
        dataloader_drop_last=True,  # as the original: a short last batch has too few in-batch negatives
        dataloader_num_workers=args.dataloader_num_workers,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        report_to=["tensorboard"],
        disable_tqdm=False,
    )
    return SpladeTrainer(model=model, args=training_args, train_dataset=train_dataset, loss=loss)


def resume_checkpoint(args: argparse.Namespace, output_dir: Path) -> str | None:
    if args.resume_from_checkpoint == "last":
        checkpoint = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if checkpoint is None:
            sys.exit(f"error: no checkpoint-* folder in {output_dir} to resume from")
        return checkpoint
    return args.resume_from_checkpoint


def sample_dev_mrr(model) -> float:
    """MRR@10 on the sample's dev queries (exact retrieval over the sample collection)."""
    from evaluate import evaluate_model

    metrics = evaluate_model(
        model, [str(SAMPLE_DIR)], cache_dir=None, precision="fp32", write_runs=False, show_progress=False
    )
    return metrics["msmarco-dev"]["mrr@10"]


def evaluate_after_training(model, trainer, args, output_dir: Path, mrr_before: float | None) -> dict | None:
    """--sample: dev MRR@10 before and after. --evaluate: the results-table metrics for the model card."""
    if not trainer.is_world_process_zero():
        return None
    metrics = {}
    if args.sample:
        metrics["sample-dev mrr@10"] = {"before training": mrr_before, "after training": sample_dev_mrr(model)}
        print(
            f"sample dev MRR@10: {mrr_before:.4f} before training, {metrics['sample-dev mrr@10']['after training']:.4f} after"
        )
    if args.evaluate:
        from evaluate import evaluate_model, results_table

        datasets = [str(SAMPLE_DIR)] if args.sample else ["msmarco", "trec-dl-2019", "trec-dl-2020"]
        results = evaluate_model(model, datasets, output_dir / "eval", data_dir=args.data_dir)
        print(results_table(results, output_dir.name))
        metrics.update(results)
    return metrics or None


def save_run(model, trainer, args, output_dir: Path, script: str, training_set, metrics: dict | None = None) -> None:
    """Final model, script copy with its command line, hyperparameters, mining report, curves, model card."""
    if not trainer.is_world_process_zero():
        return
    model.save(str(output_dir))
    script_copy = output_dir / Path(script).name
    shutil.copyfile(script, script_copy)
    with open(script_copy, "a") as f:
        f.write(f"\n\n# Script was called via:\n# python {' '.join(sys.argv)}\n")
    hyperparameters = dict(vars(args))
    (output_dir / "hyperparameters.json").write_text(json.dumps(hyperparameters, indent=2))
    training_set.save_report(output_dir / "mining_report.json")
    plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    write_model_card(output_dir, Path(script).stem, hyperparameters, metrics)


def plot_training_curves(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [entry for entry in log_history if "loss" in entry]
    panels = [
        (
            "loss terms",
            [
                k
                for k in ("loss", "ranking_loss", "mse_loss", "flops_q_loss", "flops_d_loss")
                if any(k in e for e in logs)
            ],
        ),
        ("FLOPS (raw)", ["flops_q", "flops_d"]),
        ("active dimensions", ["active_dims_q", "active_dims_d"]),
        ("lambda and learning rate", ["lambda_q", "lambda_d", "learning_rate"]),
    ]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for axis, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(e["step"], e[key]) for e in logs if key in e]
            if points:
                axis.plot(*zip(*points), label=key)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_model_card(output_dir: Path, script: str, hyperparameters: dict, metrics: dict | None) -> None:
    lines = [
        f"# {output_dir.name}",
        "",
        f'A SPLADE sparse retriever trained with `{script}.py` (NAVER\'s "Training SPLADE on MSMARCO v1" recipe '
        "on sentence-transformers).",
        "",
        "```python",
        "from sentence_transformers import SparseEncoder",
        f'model = SparseEncoder("{output_dir}")',
        'embeddings = model.encode_query(["what is the capital of france"])',
        "```",
        "",
        "It also loads with `transformers.AutoModelForMaskedLM.from_pretrained` (SPLADE max pooling: "
        "w[v] = max_t log(1 + relu(logits[t, v]))).",
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in hyperparameters.items()],
    ]
    if metrics:
        lines += ["", "## Evaluation", "", "```json", json.dumps(metrics, indent=2), "```"]
    (output_dir / "README.md").write_text("\n".join(lines) + "\n")
