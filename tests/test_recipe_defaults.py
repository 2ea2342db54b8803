"""The scripts' flags and defaults are the original's; every deliberate difference is a named choice."""

import pytest
import torch
from transformers import DistilBertConfig, DistilBertForMaskedLM

import encoding
import train_distill
import train_max
import training

# Every flag the original scripts accepted, with a value (store_true flags without one).
ORIGINAL_MAX = "--train_batch_size 64 --max_seq_length 300 --model_name distilbert-base-uncased --max_passages 0"
ORIGINAL_MAX += " --epochs 30 --pooling mean --negs_to_use bm25 --warmup_steps 1000 --lr 2e-5 --num_negs_per_system 5"
ORIGINAL_MAX += " --use_pre_trained_model --use_all_queries --ce_score_margin 3.0 --lambda_d 0.0008 --lambda_q 0.0006"
ORIGINAL_DISTILL = "--train_batch_size 64 --max_seq_length 256 --model_name distilbert-base-uncased --max_passages 0"
ORIGINAL_DISTILL += " --epochs 30 --pooling mean --negs_to_use bm25 --warmup_steps 1000 --lr 2e-5"
ORIGINAL_DISTILL += " --num_negs_per_system 5 --use_pre_trained_model --use_all_queries --lambda_d 0.08 --lambda_q 0.1"


def parse(script, argv):
    sample = training.SAMPLE_MAX if script is train_max else training.SAMPLE_DISTILL
    return training.parse_args(script.__doc__, script.hyperparameters, sample, argv=argv)


@pytest.mark.parametrize("script, command", [(train_max, ORIGINAL_MAX), (train_distill, ORIGINAL_DISTILL)])
def test_every_original_command_line_parses(script, command):
    args = parse(script, command.split())
    assert args.use_all_queries and args.negs_to_use == "bm25" and args.pooling == "mean"


def test_defaults_are_the_originals():
    args = parse(train_max, [])
    assert (args.train_batch_size, args.max_seq_length, args.epochs, args.warmup_steps, args.lr) == (
        64,
        300,
        30,
        1000,
        2e-5,
    )
    assert (args.num_negs_per_system, args.ce_score_margin, args.lambda_warmup_steps) == (5, 3.0, 0)
    assert args.save_steps == 0 and args.save_total_limit is None  # a checkpoint every epoch, all kept
    # Difference: the results table's lambdas; the original's argparse had them swapped (0.0006 / 0.0008).
    assert (args.lambda_q, args.lambda_d) == (0.0008, 0.0006)
    assert args.eval_steps is None  # the difference "in-training evaluation": once per epoch
    args = parse(train_distill, [])
    assert (args.train_batch_size, args.max_seq_length, args.lambda_q, args.lambda_d) == (64, 256, 0.1, 0.08)
    assert args.lambda_warmup_steps == 0 and args.eval_steps is None  # constant lambda, as the original
    assert args.save_steps == 10_000 and args.max_passages == 0


CAPABILITIES = [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")]


@pytest.mark.parametrize("capability, expected", CAPABILITIES)
def test_precision_auto_is_bf16_where_the_gpu_computes_it_else_the_originals_fp16(monkeypatch, capability, expected):
    """The device is simulated by its compute capability. is_bf16_supported says yes on 7.x too (bf16 emulated,
    many times slower than fp16): simulated as such, it must not decide."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training.precision("auto") == {"bf16": False, "fp16": False}
    assert encoding.resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert training.precision("auto") == {"bf16": expected == "bf16", "fp16": expected == "fp16"}
    assert encoding.resolve_precision("auto", torch.device("cuda")) == expected
    assert training.precision("fp16") == {"bf16": False, "fp16": True}  # the original's, on request
    assert training.precision("bf16") == {"bf16": True, "fp16": False}


def test_weight_decay_names_match_the_originals_substrings():
    """fit() exempted names containing bias / LayerNorm.bias / LayerNorm.weight: DistilBERT's *_layer_norm weights
    were decayed (transformers' Trainer would exempt them by type)."""
    config = DistilBertConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    model = DistilBertForMaskedLM(config)
    trainer = training.SpladeTrainer.__new__(training.SpladeTrainer)
    trainer.no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    decayed = set(trainer.get_decay_parameter_names(model))
    assert "distilbert.transformer.layer.0.sa_layer_norm.weight" in decayed
    assert "vocab_layer_norm.weight" in decayed
    assert "distilbert.embeddings.LayerNorm.weight" not in decayed
    assert not any(name.endswith("bias") for name in decayed)
    assert "distilbert.transformer.layer.0.attention.q_lin.weight" in decayed
