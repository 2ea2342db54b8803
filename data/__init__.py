"""MS MARCO training data for the SPLADE recipes: download, read, mine examples, rotate them per epoch.

    data.download   fetch and check the files (python -m data.download {train,eval,all})
    data.readers    streaming readers (collection, queries, hard negatives)
    data.ce_scores  restricted unpickler for the cross-encoder scores, and their .npz cache
    data.mining     mine_max_examples / mine_distill_examples -> TrainingSet (+ mining report)
    data.rotation   make_train_dataset / EpochRotationBatchSampler for the sentence-transformers trainer
    data.make_sample, data/sample/   a small offline dataset in the real formats
    data.bench_memory   peak memory of mining on synthetic files of realistic size

Importing this package downloads nothing and imports nothing heavy.
"""
