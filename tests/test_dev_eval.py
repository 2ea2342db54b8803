"""dev_eval.py: the dev subset is fixed by its seed and holds every judged positive; the evaluator's metrics are
evaluate.py's on the same data; the trainer logs them as eval_mrr@10 / eval_recall@1000."""

import pytest

import data.download as download
from conftest import SAMPLE
from dev_eval import DevFilesError, DevRetrievalEvaluator, dev_subset
from local_servers import FileServer


def write_dev_files(directory, num_passages=400, num_queries=40):
    """A collection of num_passages passages; query q judges passages 7q+1 (rel 1), 7q+2 (rel 0)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "collection.tsv").write_text("".join(f"{pid}\tpassage {pid}\n" for pid in range(num_passages)))
    (directory / "queries.dev.small.tsv").write_text("".join(f"{1000 + q}\tquery {q}\n" for q in range(num_queries)))
    (directory / "qrels.dev.small.tsv").write_text(
        "".join(f"{1000 + q}\t0\t{7 * q + 1}\t1\n{1000 + q}\t0\t{7 * q + 2}\t0\n" for q in range(num_queries))
    )
    return directory


def test_missing_dev_files_that_cannot_be_downloaded_name_eval_steps_0(tmp_path, monkeypatch):
    directory = write_dev_files(tmp_path / "custom")
    (directory / "qrels.dev.small.tsv").unlink()
    with FileServer({}) as server:  # answers 404, as a site without the file (or a proxy without internet) would
        sources = {name: download.Source(f"{server.url}/{name}", None, None) for name in download.SOURCES}
        monkeypatch.setattr(download, "SOURCES", sources)
        with pytest.raises(DevFilesError, match=r"HTTP 404.*\n.*--eval_steps 0 to train without the in-training"):
            dev_subset(directory)


def test_only_the_first_process_builds_the_subset(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert dev_subset(tmp_path / "nothing here") is None  # reads nothing: the trainer evaluates on rank 0 only
    assert DevRetrievalEvaluator(None).get_config_dict() == {"top_k": 1000}


def test_subset_is_fixed_by_the_seed_and_holds_every_positive(tmp_path):
    directory = write_dev_files(tmp_path / "dev")
    first = dev_subset(directory, num_queries=10, corpus_size=50, seed=1)
    assert first == dev_subset(directory, num_queries=10, corpus_size=50, seed=1)
    other = dev_subset(directory, num_queries=10, corpus_size=50, seed=2)
    assert other.query_ids != first.query_ids and other.doc_ids != first.doc_ids

    assert len(first.query_ids) == len(set(first.query_ids)) == 10
    positives = {str(7 * (int(qid) - 1000) + 1) for qid in first.query_ids}
    assert positives <= set(first.doc_ids)
    sampled = set(first.doc_ids) - positives
    assert 50 - len(positives) <= len(sampled) <= 50  # the sample may hit positives itself
    assert first.doc_ids == sorted(first.doc_ids, key=int)
    assert first.passages == [f"passage {pid}" for pid in first.doc_ids]
    assert first.queries == [f"query {int(qid) - 1000}" for qid in first.query_ids]
    # A collection no larger than corpus_size is taken whole; more queries than judged ones gives all of them.
    whole = dev_subset(directory, num_queries=1000, corpus_size=400, seed=1)
    assert len(whole.doc_ids) == 400 and len(whole.query_ids) == 40


def test_subset_refuses_a_positive_missing_from_the_collection(tmp_path):
    directory = write_dev_files(tmp_path / "dev", num_passages=100)  # queries >= 15 judge passages >= 106
    with pytest.raises(Exception, match="not in collection.tsv"):
        dev_subset(directory, num_queries=40, corpus_size=10)


@pytest.fixture(scope="module")
def splade_tiny(splade_tiny_path):
    from splade_module import load_splade

    return load_splade(splade_tiny_path, max_seq_length=64)


def test_default_subset_of_the_sample_is_its_whole_dev_set():
    subset = dev_subset(SAMPLE)  # the sample is smaller than the defaults
    passages = (SAMPLE / "collection.tsv").read_text().count("\n")
    assert len(subset.query_ids) == 150 and len(subset.doc_ids) == passages


def write_subset_files(subset, directory):
    """The subset in MS MARCO's file formats, for evaluate.py."""
    directory.mkdir()
    lines = lambda ids, texts: "".join(f"{i}\t{t}\n" for i, t in zip(ids, texts))  # noqa: E731
    (directory / "collection.tsv").write_text(lines(subset.doc_ids, subset.passages))
    (directory / "queries.dev.small.tsv").write_text(lines(subset.query_ids, subset.queries))
    (directory / "qrels.dev.small.tsv").write_text(
        "".join(f"{q}\t0\t{d}\t{rel}\n" for q, judged in subset.qrels.items() for d, rel in judged.items())
    )
    return directory


def independent_metrics(model_path, subset):
    """sentence-transformers' own vectors of the subset, dense dot products in float64, and pytrec_eval (trec_eval's
    recip_rank on the run cut at 10, in trec_eval's order: score descending, then document id descending)."""
    import pytrec_eval
    from sentence_transformers import SparseEncoder

    model = SparseEncoder(model_path)
    model.max_seq_length = 64
    encode = lambda texts: model.encode(texts, batch_size=32, convert_to_tensor=True,  # noqa: E731
                                        convert_to_sparse_tensor=False).double()  # fmt: skip
    scores = (encode(subset.queries) @ encode(subset.passages).T).tolist()
    run = {}
    for qid, row in zip(subset.query_ids, scores):  # an inverted index only finds documents sharing a term
        hits = sorted(((s, d) for d, s in zip(subset.doc_ids, row) if s > 0), reverse=True)[:1000]
        run[qid] = {d: s for s, d in hits}
    cut = {qid: dict(sorted(((s, d) for d, s in hits.items()), reverse=True)[:10]) for qid, hits in run.items()}
    cut = {qid: {d: s for s, d in hits.items()} for qid, hits in cut.items()}
    qrels = {qid: {d: int(rel) for d, rel in judged.items()} for qid, judged in subset.qrels.items()}
    mrr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    recall = pytrec_eval.RelevanceEvaluator(qrels, {"recall.1000"}).evaluate(run)
    judged = [qid for qid, j in qrels.items() if any(rel > 0 for rel in j.values())]
    return {
        "mrr@10": sum(mrr.get(q, {}).get("recip_rank", 0.0) for q in judged) / len(judged),
        "recall@1000": sum(recall.get(q, {}).get("recall_1000", 0.0) for q in judged) / len(judged),
    }


@pytest.mark.slow
def test_evaluator_equals_an_independent_computation_on_a_sample_subset(splade_tiny, splade_tiny_path, tmp_path):
    subset = dev_subset(SAMPLE, num_queries=40, corpus_size=400, seed=7)
    splade_tiny.train()
    evaluator = DevRetrievalEvaluator(subset, batch_size=32)
    metrics = evaluator(splade_tiny, output_path=str(tmp_path), epoch=1, steps=5)
    assert splade_tiny.training  # put back in train mode
    assert set(metrics) == {"mrr@10", "recall@1000", "query_active_dims", "doc_active_dims"}
    assert evaluator.primary_metric == "mrr@10"
    reference = independent_metrics(splade_tiny_path, subset)
    for name in reference:
        assert metrics[name] == pytest.approx(reference[name], abs=1e-6), name
    lines = (tmp_path / "dev_retrieval_results.csv").read_text().splitlines()
    assert lines[0] == "epoch,steps,mrr@10,recall@1000,query_active_dims,doc_active_dims" and len(lines) == 2


@pytest.mark.slow
def test_trainer_logs_eval_mrr_and_recall(splade_tiny, tmp_path):
    from datasets import Dataset
    from sentence_transformers.sparse_encoder import SparseEncoderTrainer, SparseEncoderTrainingArguments

    from losses import MultipleNegativesRankingLossSplade

    subset = dev_subset(SAMPLE, num_queries=20, corpus_size=200)
    train = Dataset.from_dict(
        {"query": subset.queries[:8], "positive": subset.passages[:8], "negative": subset.passages[8:16]}
    )
    args = SparseEncoderTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=2,
        logging_steps=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        metric_for_best_model="mrr@10",
    )
    loss = MultipleNegativesRankingLossSplade(splade_tiny, lambda_q=1e-3, lambda_d=1e-3)
    trainer = SparseEncoderTrainer(
        model=splade_tiny, args=args, train_dataset=train, loss=loss, evaluator=DevRetrievalEvaluator(subset)
    )
    trainer.train()
    evaluations = [log for log in trainer.state.log_history if "eval_mrr@10" in log]
    assert [log["step"] for log in evaluations] == [2, 4]
    for log in evaluations:
        assert {"eval_recall@1000", "eval_query_active_dims", "eval_doc_active_dims"} <= log.keys()
    # The last evaluation saw the final weights: its logged numbers are the evaluator's on the trained model.
    again = DevRetrievalEvaluator(subset)(trainer.model)
    assert evaluations[-1]["eval_mrr@10"] == pytest.approx(again["mrr@10"], abs=1e-9)
    assert evaluations[-1]["eval_recall@1000"] == pytest.approx(again["recall@1000"], abs=1e-9)
    assert trainer.state.best_metric == max(log["eval_mrr@10"] for log in evaluations)
