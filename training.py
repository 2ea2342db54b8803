"""What train_max.py and train_distill.py share and a user never tunes: the flags, the sample model, the trainer
subclass (lambda step, extra logs, weight-decay names, the guards that stop a collapsed or diverged run), the run
folder, checkpoints and the model card.

The recipe itself (data, model, loss, evaluator, training arguments, trainer) is written out in each script.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from sentence_transformers.sparse_encoder import SparseEncoderTrainer
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from data.atomic import write_text_atomic
from encoding import gpu_computes_bf16
from errors import UserError
from splade_module import SpladeEncoder, SpladeMax, load_splade

SAMPLE_DIR = Path(__file__).resolve().parent / "data" / "sample"
SAMPLE_MODEL = "sample-bert"  # --model_name value that builds the small random masked-LM offline

# --sample: the bundled data, a small random BERT, minutes on a CPU. A flag on the command line still wins.
SAMPLE_COMMON = dict(
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
SAMPLE_MAX = dict(SAMPLE_COMMON)
# MarginMSE from a random model: the results table's second lambdas (0.01 / 0.008; the script's 0.1 / 0.08 switch
# every dimension of the small model off) and a lower learning rate (at 2e-3 the MSE never leaves ~100).
SAMPLE_DISTILL = dict(SAMPLE_COMMON, lr=5e-4, lambda_q=0.01, lambda_d=0.008)

# The original scripts accepted these flags and did nothing with them; old command lines keep working.
IGNORED_FLAGS = {
    "pooling": "mean",
    "use_pre_trained_model": False,
}

HELP = {
    "train_batch_size": "queries per batch (each with one positive and one negative)",
    "max_seq_length": "truncate queries and passages to this many tokens",
    "model_name": f"masked-LM to start from: hub id or local directory ('{SAMPLE_MODEL}': a small random BERT "
    "with a vocabulary trained on the sample, built offline)",
    "lambda_q": "weight of the FLOPS regulariser on queries",
    "lambda_d": "weight of the FLOPS regulariser on documents",
    "lambda_warmup_steps": "quadratic lambda warm-up: lambda_t = lambda * min(1, t/T)^2 (0 = constant, the original)",
    "epochs": "passes over the training queries (each epoch takes every query's next positive and negative)",
    "warmup_steps": "linear learning-rate warm-up steps (then linear decay to 0)",
    "lr": "peak learning rate of AdamW",
    "num_negs_per_system": "hard negatives taken from each retrieval system of the hard-negatives file",
    "negs_to_use": "comma list of systems to take negatives from (default: every system in the file)",
    "use_all_queries": "keep queries left without a negative (train_max) or without a positive (train_distill)",
    "ce_score_margin": "drop a negative whose cross-encoder score is above min(CE(positives)) - margin",
    "max_passages": "train on at most this many queries (0 = all)",
    "save_steps": "checkpoint every N optimizer steps (0 = at the end of every epoch)",
}


def parse_args(description: str, hyperparameters: dict, sample: dict, argv: list[str] | None = None):
    """Flags named as the original named them, defaulting to the script's hyperparameter block."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in hyperparameters.items():
        if isinstance(default, bool):
            parser.add_argument(f"--{name}", action="store_true", default=default, help=HELP.get(name))
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(f"--{name}", type=kind, default=default, help=HELP.get(name))
    for name, default in IGNORED_FLAGS.items():
        if name not in hyperparameters:
            action = dict(action="store_true") if isinstance(default, bool) else dict(default=default)
            parser.add_argument(f"--{name}", **action, help="accepted for the original's command lines; no effect")
    if "max_passages" not in hyperparameters:
        parser.add_argument(
            "--max_passages", type=int, default=0, help="train_max: accepted as the original; no effect"
        )
    add = parser.add_argument
    add("--sample", action="store_true", help=f"offline quick start on data/sample/ (defaults become {sample})")
    add("--data_dir", default="msmarco-data", help="where the MS MARCO files are (downloaded when missing)")
    add("--output_dir", default=None, help="run folder (default: output/<name as the original named it>)")
    add("--seed", type=int, default=42, help="seed of the model init, data order and negatives")
    add("--precision", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
        help="auto: bf16 on GPUs that compute it natively (compute capability >= 8), else fp16 with loss scaling "
        "(the original); fp32 on CPU")  # fmt: skip
    add("--optimizer", choices=["legacy_adamw", "torch_adamw"], default="legacy_adamw",
        help="legacy_adamw: the original's transformers.AdamW (optimizer.py), or torch.optim.AdamW")  # fmt: skip
    add("--max_steps", type=int, default=-1, help="stop after this many optimizer steps (quick runs)")
    add("--save_total_limit", type=int, default=None, help="keep only the newest N checkpoints (default: all)")
    add("--logging_steps", type=int, default=100, help="log loss terms, lambdas and active dims every N steps")
    add("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'last' (the newest in --output_dir)")
    add("--dataloader_num_workers", type=int, default=0, help="data-loader worker processes")
    add("--no_lean_head", action="store_true", help="plain autograd through the SPLADE max (same numbers)")
    add("--eval_steps", type=int, default=None, help="dev MRR@10 every N steps (default: every epoch; 0: off)")
    add("--eval_queries", type=int, default=500, help="dev-small queries in the in-training evaluation")
    add("--eval_corpus_size", type=int, default=100_000, help="random collection passages it retrieves among")
    add("--collapse_patience", type=int, default=3,
        help="stop when query or document vectors are all zero for this many logging steps in a row")  # fmt: skip
    add("--max_skipped_steps", type=int, default=10,
        help="fp16: stop when the loss stays non-finite for more than N steps (GradScaler skips each)")  # fmt: skip
    add("--evaluate", action="store_true", help="after training: MS MARCO dev + TREC DL 2019/2020 into the card")
    add("--ddp_timeout", type=int, default=1800,
        help="torchrun: seconds a process waits for the others (process group, final evaluation)")  # fmt: skip
    if "--sample" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**sample, data_dir=str(SAMPLE_DIR))
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    for name in [*IGNORED_FLAGS, "max_passages"]:
        if name not in hyperparameters and any(flag.split("=")[0] == f"--{name}" for flag in given):
            print(f"warning: --{name} has no effect (as in the original script)", file=sys.stderr)
    check_args(args)
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.lambda_q < 0 or args.lambda_d < 0:
        raise UserError(f"--lambda_q and --lambda_d must be >= 0 (got {args.lambda_q}, {args.lambda_d})")
    if args.train_batch_size < 2:
        raise UserError("--train_batch_size must be at least 2: the other queries' passages are the in-batch negatives")
    if args.precision in ("fp16", "bf16") and not torch.cuda.is_available():
        raise UserError(f"--precision {args.precision} needs a CUDA GPU and none is visible; use --precision fp32")
    if args.precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU does not support bf16; use --precision fp16")
    if args.collapse_patience < 1:
        raise UserError("--collapse_patience must be at least 1")
    if args.max_skipped_steps < 0:
        raise UserError("--max_skipped_steps must be at least 0")


def precision(choice: str) -> dict[str, bool]:
    """TrainingArguments flags: bf16 autocast where the GPU computes bf16 natively (compute capability >= 8), else
    fp16 autocast with loss scaling (the original's)."""
    if choice == "auto":
        if not torch.cuda.is_available():
            choice = "fp32"
        else:
            choice = "bf16" if gpu_computes_bf16() else "fp16"
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def build_model(args: argparse.Namespace, training_set, script: str) -> SpladeEncoder:
    """The masked-LM to train: the sample's small random BERT, or a checkpoint by name or path."""
    if args.model_name == SAMPLE_MODEL:
        model = build_sample_model(training_set.texts(), args.max_seq_length, args.seed, not args.no_lean_head)
    else:
        try:
            model = load_splade(args.model_name, args.max_seq_length, lean_head=not args.no_lean_head)
        except OSError as error:
            raise UserError(f"{error}\nWithout internet, pass a local directory (--model_name DIR).") from None
    card = model.model_card_data  # sentence-transformers writes the card on every save; tell it what this is
    card.language = "en"
    card.model_name = f"SPLADE ({script}) on {args.model_name}"
    card.train_datasets = [{"name": "MS MARCO hard negatives", "id": "sentence-transformers/msmarco-hard-negatives"}]
    card.local_files_only = True  # a card never needs the Hub; training may run offline
    if args.model_name != SAMPLE_MODEL and not Path(args.model_name).exists():
        card.base_model = args.model_name
    return model


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
        tokenizer_object=vocabulary, model_max_length=max_seq_length,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
    )  # fmt: skip
    config = BertConfig(
        vocab_size=vocabulary.get_vocab_size(), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=512, max_position_embeddings=max(512, max_seq_length), pad_token_id=0,
        architectures=["BertForMaskedLM"],
    )  # fmt: skip
    torch.manual_seed(seed)
    mlm = BertForMaskedLM(config)
    module = SpladeMax(mlm=mlm, tokenizer=tokenizer, max_seq_length=max_seq_length, lean_head=lean_head)
    return SpladeEncoder(modules=[module])


def start_run(args: argparse.Namespace, name: str, script: str) -> Path:
    """The run folder, and what documents the run even if it crashes: the script with its command line appended
    (train_script.py, as the original wrote it) and hyperparameters.json. Every process agrees on the folder."""
    output_dir = _agreed_across_processes(_run_dir(args, name), args.ddp_timeout)
    if _is_main_process():
        output_dir.mkdir(parents=True, exist_ok=True)
        command = f"\n\n# Script was called via:\n# python {' '.join(sys.argv)}\n"
        write_text_atomic(output_dir / "train_script.py", Path(script).read_text() + command)
        write_text_atomic(output_dir / "hyperparameters.json", json.dumps(vars(args), indent=2) + "\n")
    return output_dir


def _run_dir(args: argparse.Namespace, name: str) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "last":
        return Path(args.resume_from_checkpoint).resolve().parent
    if args.resume_from_checkpoint == "last":
        raise UserError("--resume_from_checkpoint last needs --output_dir (the run folder to resume)")
    model = "sample" if args.model_name == SAMPLE_MODEL else args.model_name.strip("/").replace("/", "-")
    return Path("output") / f"{name.format(model=model)}-{time.strftime('%Y-%m-%d_%H-%M-%S')}"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _agreed_across_processes(path: Path, timeout_seconds: int) -> Path:
    """Under torchrun each process would stamp its own time into the folder name: take rank 0's.

    This creates the process group the trainer will use (gloo on CPUs); the trainer finds it made and does not
    make its own, so it gets the trainer's timeout (ddp_timeout) here, not the backend's default (NCCL's is
    10 minutes, less than the first process may take to build the dev subset of 8.8M passages)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return path
    from datetime import timedelta

    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_seconds))
    shared = [str(path)]
    torch.distributed.broadcast_object_list(shared, src=0)
    return Path(shared[0])


def resume_checkpoint(args: argparse.Namespace, output_dir: Path) -> str | None:
    """'last': the newest complete checkpoint; newer ones that a kill left half-written are skipped and named."""
    if args.resume_from_checkpoint == "last":
        numbered = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
        if not numbered:
            raise UserError(f"no checkpoint-* folder in {output_dir} to resume from")
        skipped = []
        for checkpoint in sorted(numbered, key=lambda p: int(p.name[11:]), reverse=True):
            lacking = checkpoint_lacks(checkpoint)
            if not lacking:
                if skipped and _is_main_process():
                    print(f"warning: skipping {'; '.join(skipped)} (written when the run was killed); "
                          f"resuming from {checkpoint.name}", file=sys.stderr)  # fmt: skip
                return str(checkpoint)
            skipped.append(f"incomplete {checkpoint.name}: no {', '.join(lacking)}")
        raise UserError(f"no complete checkpoint in {output_dir} to resume from: {'; '.join(skipped)}")
    if args.resume_from_checkpoint and not Path(args.resume_from_checkpoint).is_dir():
        raise UserError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such checkpoint folder")
    return args.resume_from_checkpoint


def checkpoint_lacks(checkpoint: Path) -> list[str]:
    """What a checkpoint lacks to resume from. The trainer writes the model, then the optimizer and scheduler, and
    trainer_state.json last; older checkpoints lose their optimizer state once a newer one is complete."""
    lacking = [name for name in ("optimizer.pt", "scheduler.pt") if not (checkpoint / name).is_file()]
    if not any((checkpoint / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        lacking.insert(0, "model weights")
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        lacking.append("readable trainer_state.json")
    return lacking


class TrainingStopped(UserError):
    """The run diverged or collapsed; the message says at which step, what was seen, and what to try."""


class SpladeTrainer(SparseEncoderTrainer):
    """sentence-transformers' trainer, plus:
    - the loss's lambda warm-up follows the optimizer step; every log carries lambdas, raw FLOPS, active dims;
    - weight decay skips exactly the parameters whose names contain one of `no_decay` (as the original's fit());
    - a non-finite loss stops the run at once (under fp16 loss scaling: after `max_skipped_steps` in a row, each
      one a step that GradScaler skips), and so do all-zero query or document vectors for `collapse_patience`
      logging steps in a row (the FLOPS regulariser has silenced the model). Every rank takes the same decision."""

    def __init__(self, *args, no_decay: list[str], collapse_patience: int = 3, max_skipped_steps: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.no_decay = no_decay
        self.collapse_patience = collapse_patience
        self.max_skipped_steps = max_skipped_steps
        self.skipped_steps = 0
        self.zero_logs = 0
        self.last_terms: dict[str, torch.Tensor] = {}
        # The card's training-set size: sentence-transformers counted the rotation's epochs x queries virtual rows.
        queries = getattr(self.train_dataset, "rotation_queries_per_epoch", None)
        if queries and self.accelerator.num_processes > 1 and self.accelerator.even_batches:
            raise ValueError(
                "accelerate's even_batches would train the first queries of every epoch twice under torchrun: "
                "pass accelerator_config={'even_batches': False} (data/rotation.py spreads the last batch itself)"
            )
        card = self.model.model_card_data
        if queries:
            for info in card.train_datasets:
                if "size" in info:
                    info["size"] = queries
            card.tags = [f"dataset_size:{queries}" if t.startswith("dataset_size:") else t for t in card.tags or []]

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name, _ in model.named_parameters() if not any(nd in name for nd in self.no_decay)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.loss.step = self.state.global_step
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        value = loss[0] if return_outputs else loss
        if model.training:
            self.check_finite(value)
        return loss

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop on a non-finite loss on any rank. Under fp16 loss scaling, GradScaler skips the step whose values
        overflowed (the non-finite gradients that follow) and lowers its scale: stop only when that has happened
        for more than `max_skipped_steps` steps in a row. One host sync per step, which transformers' own
        logging_nan_inf_filter already pays, and under torchrun one all-reduce of a flag."""
        bad = (~torch.isfinite(loss.detach())).any().to(torch.int32).reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)  # the same decision on every rank
        if not bad.item():
            self.skipped_steps = 0
            return
        terms = {name: float(term) for name, term in self.last_terms.items()}
        if not self.args.fp16:
            self._stop("the loss is not finite (on at least one rank)", f"loss terms: {terms}")
        self.skipped_steps += 1
        if self.skipped_steps > self.max_skipped_steps:
            self._stop(
                f"the loss has not been finite for {self.skipped_steps} steps in a row under fp16 loss scaling "
                f"(--max_skipped_steps {self.max_skipped_steps})",
                f"loss terms: {terms}",
            )
        print(
            f"warning: step {self.state.global_step}: the loss is not finite (fp16 overflow); GradScaler skips this "
            f"step ({self.skipped_steps} in a row, --max_skipped_steps {self.max_skipped_steps})",
            file=sys.stderr,
        )

    def track_loss_components(self, loss: dict[str, torch.Tensor]) -> None:
        self.last_terms = {name: value.detach() for name, value in loss.items()}
        super().track_loss_components(loss)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            stats = self.loss.pop_stats()
            logs = {**logs, **{name: round(value, 6) for name, value in stats.items()}}
            silent = stats.get("active_dims_q", 1) == 0 or stats.get("active_dims_d", 1) == 0
            self.zero_logs = self.zero_logs + 1 if silent else 0
        super().log(logs, start_time)
        if self.zero_logs >= self.collapse_patience:
            self._stop(
                f"query or document vectors have been all zero for {self.zero_logs} logging steps in a row: "
                "the FLOPS regulariser has killed every activation, and relu passes no gradient to revive them",
                f"last log: {logs}",
            )

    def _stop(self, what: str, details: str) -> None:
        checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        raise TrainingStopped(
            f"training stopped at step {self.state.global_step}: {what}.\n  {details}\n"
            f"  Last checkpoint: {checkpoint or 'none yet'}; no final model was written.\n"
            "  Try: --lambda_warmup_steps (e.g. a few thousand steps), smaller --lambda_q / --lambda_d, a lower --lr."
        )


class KeepOptimizerStateOfNewestCheckpoint(TrainerCallback):
    """Every checkpoint keeps its model (as the original's), only the newest keeps what resuming needs on top
    (optimizer, scheduler, RNG states: about twice the model's size)."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        checkpoints = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        for older in checkpoints[:-1]:
            for path in older.iterdir():
                if path.name in ("optimizer.pt", "scheduler.pt", "scaler.pt") or path.name.startswith("rng_state"):
                    path.unlink()


@contextmanager
def sample_demo(args: argparse.Namespace, model):
    """--sample: print the sample dev MRR@10 before and after training, the demo's visible result."""
    if not args.sample or not _is_main_process():
        yield
        return
    before = sample_dev_mrr(model)
    yield
    after = sample_dev_mrr(model)
    print(f"sample dev MRR@10: {before:.4f} before training, {after:.4f} after")
    args.sample_dev_mrr = {"before training": before, "after training": after}


def sample_dev_mrr(model) -> float:
    """MRR@10 on the sample's dev queries (exact retrieval over the sample collection)."""
    from evaluate import evaluate_model

    metrics = evaluate_model(model, [str(SAMPLE_DIR)], cache_dir=None, precision="fp32", write_runs=False,
                             show_progress=False)  # fmt: skip
    return metrics["msmarco-dev"]["mrr@10"]


def finish_run(model, trainer, args, output_dir: Path, training_set) -> None:
    """First what must not be lost (rank 0): the final model with its card, the mining report, the curves and the
    best dev step. Then --evaluate, on every process (each encodes its share of the shards, as `torchrun evaluate.py`
    does), and its metrics into the card. A failed evaluation leaves all of that and says how to rerun it."""
    best = best_dev_step(trainer.state.log_history)
    if trainer.is_world_process_zero():
        if best:
            write_text_atomic(output_dir / "best_dev_step.json", json.dumps(best, indent=2) + "\n")
            print(f"best dev MRR@10 {best['eval_mrr@10']:.4f} at step {best['step']} (best_dev_step.json)")
        model.save(str(output_dir))
        sample = {"sample-dev mrr@10": args.sample_dev_mrr} if getattr(args, "sample_dev_mrr", None) else {}
        append_recipe_to_card(output_dir / "README.md", vars(args), sample, best)
        training_set.save_report(output_dir / "mining_report.json")
        from plots import plot_training_curves

        plot_training_curves(trainer.state.log_history, output_dir / "training_curves.png")
    if args.evaluate:
        final_evaluation(args, output_dir)


class EvaluationFailed(UserError):
    """The final evaluation failed after the final model was saved; the message gives the command that reruns it."""


def final_evaluation(args: argparse.Namespace, output_dir: Path) -> None:
    """--evaluate: the saved model (so that the cached document vectors serve a rerun of evaluate.py on the run
    folder) on MS MARCO dev and TREC DL 2019/2020 (--sample: the sample's dev set), metrics into the card."""
    from evaluate import evaluate_model, results_table

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        torch.distributed.barrier()  # every process evaluates what the first one has saved
    datasets = ["msmarco"] if args.sample else ["msmarco", "trec-dl-2019", "trec-dl-2020"]
    launcher = f"torchrun --nproc_per_node {world_size} " if world_size > 1 else "python "
    rerun = (
        f"{launcher}evaluate.py {shlex.quote(str(output_dir))} --msmarco{'' if args.sample else ' --trec-dl 2019 2020'}"
        f" --data_dir {shlex.quote(str(args.data_dir))} --output {shlex.quote(str(output_dir / 'eval'))}"
    )
    try:
        results = evaluate_model(
            str(output_dir), datasets, output_dir / "eval", data_dir=args.data_dir,
            distributed=world_size > 1, shard_timeout=args.ddp_timeout,
        )  # fmt: skip
    except (UserError, MemoryError, OSError) as error:
        raise EvaluationFailed(
            f"the final evaluation (--evaluate) failed: {type(error).__name__}: {error}\n"
            f"  The final model, its card, the curves and the mining report are saved in {output_dir}.\n"
            f"  Rerun the evaluation with: {rerun}"
        ) from None
    except BaseException:  # a bug: its traceback follows
        print(f"the final evaluation failed; the final model is saved in {output_dir}; rerun it with: {rerun}",
              file=sys.stderr)  # fmt: skip
        raise
    if results is not None:  # the first process
        print(results_table(results, output_dir.name))
        append_evaluation_to_card(output_dir / "README.md", results)


def best_dev_step(log_history: list[dict]) -> dict | None:
    evaluations = [entry for entry in log_history if "eval_mrr@10" in entry]
    return max(evaluations, key=lambda entry: entry["eval_mrr@10"]) if evaluations else None


def append_recipe_to_card(card: Path, hyperparameters: dict, metrics: dict, best: dict | None) -> None:
    """sentence-transformers wrote the card (model, loss, training arguments, logs); add the recipe's own part."""
    lines = ["", "## SPLADE recipe", "", "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in hyperparameters.items()]
    if best:
        lines += ["", f"Best in-training dev MRR@10: {best['eval_mrr@10']:.4f} at step {best['step']}."]
    if metrics:
        lines += ["", "### Evaluation", "", "```json", json.dumps(metrics, indent=2), "```"]
    text = card.read_text() if card.exists() else f"# {card.parent.name}\n"
    write_text_atomic(card, text + "\n".join(lines) + "\n")


def append_evaluation_to_card(card: Path, results: dict) -> None:
    lines = ["", "### Final evaluation (`evaluate.py`, metrics.json in eval/)", "", "```json"]
    write_text_atomic(card, card.read_text() + "\n".join([*lines, json.dumps(results, indent=2), "```"]) + "\n")
