"""Train DistilSplade: MarginMSE on cross-encoder score margins + FLOPS regularisation.

NAVER's "Training SPLADE on MSMARCO v1" recipe (train_distill.py), on today's sentence-transformers trainer.
Training data: MS MARCO queries with (positive, hard negative) pairs; the label is the margin
CE(query, positive) - CE(query, negative) of the cross-encoder ms-marco-MiniLM-L-6-v2.

    python train_distill.py --sample                            # offline, minutes on a CPU
    python train_distill.py --lambda_q 0.01 --lambda_d 0.008    # the results table's row, on a GPU
    torchrun --nproc_per_node 4 train_distill.py                # several GPUs
"""

import torch
from sentence_transformers.sparse_encoder import SparseEncoderTrainingArguments

import training
from data.mining import mine_distill_examples
from data.rotation import EpochRotationBatchSampler, make_train_dataset
from dev_eval import DevRetrievalEvaluator, dev_subset
from errors import main_exits_2_on_user_error
from losses import MarginMSELossSplade
from optimizer import LegacyAdamW

# Hyperparameters: the original's defaults. Each is also a flag: --lambda_q 0.01 --lambda_d 0.008 ...
hyperparameters = dict(
    train_batch_size=64,
    max_seq_length=256,
    model_name="distilbert-base-uncased",
    lambda_q=0.1,  # the results table also has (0.01, 0.008) and (0.001, 0.0008)
    lambda_d=0.08,
    lambda_warmup_steps=0,  # 0: constant lambda, as the original
    epochs=30,
    warmup_steps=1000,
    lr=2e-5,
    num_negs_per_system=5,
    negs_to_use="",  # comma list of systems; empty: every system in the file
    use_all_queries=False,  # keep queries without a positive: two negatives stand in for (positive, negative)
    max_passages=0,  # 0: every training query
    save_steps=10_000,  # a checkpoint every 10,000 steps, all kept, as the original
)


def main():
    args = training.parse_args(__doc__, hyperparameters, sample=training.SAMPLE_DISTILL)
    name = f"distilSplade_{args.lambda_q}_{args.lambda_d}_{{model}}"
    output_dir = training.start_run(args, f"{name}-batch_size_{args.train_batch_size}", __file__)

    # 1. Data: (query, positive, hard negative) labelled with CE(q, pos) - CE(q, neg) (mining report printed, saved)
    training_set = mine_distill_examples(
        args.data_dir,
        num_negs_per_system=args.num_negs_per_system,
        negs_to_use=args.negs_to_use or None,
        max_passages=args.max_passages,
        use_all_queries=args.use_all_queries,
        seed=args.seed,
    )
    # Epoch e takes each query's next positive and next negative: the dataset holds epochs x queries rows, and
    # EpochRotationBatchSampler (step 5) visits epoch e's rows in a seeded order. Stateless: safe with workers,
    # several GPUs and resuming.
    train_dataset = make_train_dataset(training_set, epochs=args.epochs, with_labels=True)

    # 2. Model: a masked-LM with SPLADE max pooling, w[v] = max_t log(1 + relu(logits[t, v]))
    model = training.build_model(args, training_set, "train_distill")

    # 3. Loss: MSE between (q.pos - q.neg) and the cross-encoder margin + lambda * FLOPS
    loss = MarginMSELossSplade(model, args.lambda_q, args.lambda_d, args.lambda_warmup_steps)

    # 4. Evaluator: exact retrieval over a fixed dev subset, logged as eval_mrr@10 and eval_recall@1000
    evaluator = None
    if args.eval_steps != 0:
        evaluator = DevRetrievalEvaluator(
            dev_subset(args.data_dir, args.eval_queries, args.eval_corpus_size, args.seed)
        )

    # 5. Training arguments: what sentence-transformers 2.1's fit() did for the original.
    # Its optimizer, transformers' legacy AdamW (eps 1e-6 added to sqrt(v) before the bias correction, weight decay
    # after the step); --optimizer torch_adamw: torch.optim.AdamW (eps after the correction, decay before the step)
    optimizer = (LegacyAdamW, dict(lr=args.lr, eps=1e-6)) if args.optimizer == "legacy_adamw" else None
    training_args = SparseEncoderTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.train_batch_size,
        batch_sampler=EpochRotationBatchSampler,
        dataloader_drop_last=True,  # as the original's train_distill
        accelerator_config={"even_batches": False},  # torchrun: no query twice per epoch (data/rotation.py)
        dataloader_num_workers=args.dataloader_num_workers,
        seed=args.seed,
        # weight decay 0.01, except for the names the trainer's no_decay lists below (as fit() grouped them)
        optim="adamw_torch",  # used only with --optimizer torch_adamw
        learning_rate=args.lr,
        adam_epsilon=1e-6,  # transformers.AdamW's default, which fit() used
        weight_decay=0.01,
        lr_scheduler_type="linear",  # linear warm-up, then linear decay to 0
        warmup_steps=args.warmup_steps,
        max_grad_norm=1.0,
        **training.precision(args.precision),  # the original: fp16 autocast with loss scaling
        use_cpu=not torch.cuda.is_available(),  # also makes torchrun on CPUs real DDP (gloo)
        ddp_timeout=args.ddp_timeout,  # torchrun: how long a process waits for the others (training.start_run)
        save_strategy="epoch" if args.save_steps == 0 else "steps",  # the original: every 10,000 steps
        save_steps=args.save_steps or None,
        save_total_limit=args.save_total_limit,
        eval_strategy="no" if evaluator is None else "epoch" if args.eval_steps is None else "steps",
        eval_steps=args.eval_steps,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        report_to=["tensorboard"],
    )

    # 6. Trainer: sentence-transformers' own, plus the lambda warm-up, the extra logs and the guards
    trainer = training.SpladeTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        loss=loss,
        evaluator=evaluator,
        optimizer_cls_and_kwargs=optimizer,  # None: the trainer builds args.optim
        no_decay=["bias", "LayerNorm.bias", "LayerNorm.weight"],  # substrings, as fit() matched them
        collapse_patience=args.collapse_patience,
        max_skipped_steps=args.max_skipped_steps,
        callbacks=[training.KeepOptimizerStateOfNewestCheckpoint()],
    )

    # 7. Train
    with training.sample_demo(args, model):
        trainer.train(resume_from_checkpoint=training.resume_checkpoint(args, output_dir))

    # 8. Evaluate (--evaluate), 9. save the final model with its card, the curves and the mining report
    training.finish_run(model, trainer, args, output_dir, training_set)
    return trainer


if __name__ == "__main__":
    main_exits_2_on_user_error(main)
