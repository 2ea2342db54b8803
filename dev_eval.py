"""TEMPORARY STUB (lead's worktree only): replaced by helper's dev_eval.py at merge."""
from sentence_transformers.evaluation import SentenceEvaluator


def dev_subset(data_dir, num_queries=500, corpus_size=100_000, seed=42):
    return str(data_dir)


class DevRetrievalEvaluator(SentenceEvaluator):
    def __init__(self, subset):
        super().__init__()
        self.subset = subset
        self.primary_metric = "mrr@10"

    def __call__(self, model, output_path=None, epoch=-1, steps=-1):
        from evaluate import evaluate_model
        was = model.training
        m = evaluate_model(model, [self.subset], cache_dir=None, precision="fp32", write_runs=False, show_progress=False)["msmarco-dev"]
        model.train(was)
        return {"mrr@10": m["mrr@10"], "recall@1000": m["recall@1000"], "query_active_dims": m["query_active_dims"], "doc_active_dims": m["doc_active_dims"]}
