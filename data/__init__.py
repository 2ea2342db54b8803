"""MS MARCO training data for the SPLADE recipes: download, read, mine examples, rotate them per epoch.

    data.download   which files, from where (python -m data.download {train,eval,all}); BEIR zips; Hub files
    data.fetch      resumable, checked HTTP downloads (the mechanics under data.download)
    data.readers    one reader per file format, for training and evaluation (TSV, JSONL, qrels)
    data.eval_sets  evaluation data sets (MS MARCO dev, TREC DL, BEIR) from names or folders
    data.ce_scores  the cross-encoder scores (read with data.ce_pickle, never unpickled) and their .npz cache
    data.ce_pickle  numba walk over the scores pickle's opcodes into CSR arrays; refuses anything else
    data.mining     mine_max_examples / mine_distill_examples -> TrainingSet (+ mining report)
    data.mining_rule  the original's rule for one line of the hard-negatives file (pure functions)
    data.training_set  TrainingSet (compact arrays) and its per-epoch rotation of positives and negatives
    data.rotation   make_train_dataset / EpochRotationBatchSampler for the sentence-transformers trainer
    data.make_sample, data/sample/   a small offline dataset in the real formats

Importing this package downloads nothing and imports nothing heavy.
"""
