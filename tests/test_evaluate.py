"""evaluate.py end to end on real data (Cranfield, CISI subsets) and splade-tiny, against
sentence-transformers' SparseInformationRetrievalEvaluator, plus file layouts, caching and errors.

Subsets keep the file fast on 2 CPU cores: the first judged queries of each collection, the
documents judged for them plus the first documents of the corpus, max_seq_length 128 on both
sides. bench/bench_evaluate.py runs the full collections."""

import json
import zipfile

import numpy as np
import pytest
import pytrec_eval
from sentence_transformers import SparseEncoder
from sentence_transformers.sparse_encoder.evaluation import SparseInformationRetrievalEvaluator

import evaluate
from conftest import BEIR
from data import eval_sets, readers
from errors import UserError, main_exits_2_on_user_error
from local_servers import FileServer

MAX_SEQ_LENGTH = 128


def read_beir(directory):
    corpus = [json.loads(line) for line in open(directory / "corpus.jsonl")]
    queries = [json.loads(line) for line in open(directory / "queries.jsonl")]
    qrels_lines = open(directory / "qrels" / "test.tsv").read().splitlines()[1:]
    return corpus, queries, [line.split("\t") for line in qrels_lines]


def write_beir(directory, corpus, queries, qrels):
    (directory / "qrels").mkdir(parents=True)
    with open(directory / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps(doc) + "\n" for doc in corpus)
    with open(directory / "queries.jsonl", "w") as f:
        f.writelines(json.dumps(query) + "\n" for query in queries)
    with open(directory / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines("\t".join(row) + "\n" for row in qrels)
    return directory


def beir_subset(source, target, num_queries, first_docs):
    """The first judged queries, and the documents judged for them plus the first documents."""
    corpus, queries, qrels = read_beir(source)
    judged = list(dict.fromkeys(q for q, _, rel in qrels if int(rel) > 0))[:num_queries]
    qrels = [row for row in qrels if row[0] in judged]
    keep = {d for _, d, _ in qrels} | {doc["_id"] for doc in corpus[:first_docs]}
    return write_beir(
        target, [d for d in corpus if d["_id"] in keep], [q for q in queries if q["_id"] in judged], qrels
    )


@pytest.fixture(scope="module")
def subsets(tmp_path_factory):
    root = tmp_path_factory.mktemp("beir")
    return {
        "cranfield": beir_subset(BEIR / "cranfield", root / "cranfield", num_queries=30, first_docs=120),
        "cisi": beir_subset(BEIR / "cisi", root / "cisi", num_queries=6, first_docs=60),
    }


@pytest.fixture(scope="module")
def evaluation(splade_tiny_path, subsets, tmp_path_factory):
    """Our evaluation of both subsets, with BEIR's self-hit rule off (the reference has none)."""
    out = tmp_path_factory.mktemp("out")
    cache = tmp_path_factory.mktemp("cache")
    results = evaluate.evaluate_model(
        splade_tiny_path,
        [str(subsets["cranfield"]), str(subsets["cisi"])],
        out,
        cache_dir=cache,
        max_seq_length=MAX_SEQ_LENGTH,
        batch_size=32,
        keep_self_hits=True,
        show_progress=False,
    )
    return results, out, cache


def reference_metrics(model_path, directory):
    """sentence-transformers' evaluator: binary relevance (it takes sets), no self-hit rule."""
    corpus, queries, qrels = read_beir(directory)
    relevant = {}
    for qid, doc, rel in qrels:
        if int(rel) > 0:
            relevant.setdefault(qid, set()).add(doc)
    model = SparseEncoder(model_path, device="cpu")
    model.max_seq_length = MAX_SEQ_LENGTH
    evaluator = SparseInformationRetrievalEvaluator(
        queries={q["_id"]: q["text"] for q in queries},
        corpus={d["_id"]: f"{d.get('title') or ''} {d['text']}".strip() for d in corpus},
        relevant_docs=relevant,
        mrr_at_k=[10],
        ndcg_at_k=[10],
        accuracy_at_k=[10],
        precision_recall_at_k=[10],
        map_at_k=[10],
        batch_size=32,
        write_csv=False,
    )
    return evaluator(model), relevant


def read_run(path):
    run = {}
    for line in open(path):
        qid, _, doc, _, score, _ = line.split()
        run.setdefault(qid, {})[doc] = float(score)
    return run


@pytest.mark.slow  # splade-tiny encodes real collections on a CPU
@pytest.mark.parametrize("name", ["cranfield", "cisi"])
def test_agrees_with_sentence_transformers_evaluator(evaluation, subsets, splade_tiny_path, name):
    results, out, _ = evaluation
    ours = results[f"beir-{name}"]
    reference, relevant = reference_metrics(splade_tiny_path, subsets[name])
    # The reference uses binary relevance: score our run file with the same binary judgments.
    binary = {qid: dict.fromkeys(docs, 1) for qid, docs in relevant.items()}
    from retrieval import evaluate_run

    ours_binary = evaluate_run(read_run(out / "runs" / f"beir-{name}.trec"), binary)
    assert ours_binary["ndcg@10"] == pytest.approx(reference["dot_ndcg@10"], abs=1e-3)
    assert ours_binary["mrr@10"] == pytest.approx(reference["dot_mrr@10"], abs=1e-3)
    assert ours["mrr@10"] == pytest.approx(reference["dot_mrr@10"], abs=1e-3)  # MRR ignores grades
    assert ours["flops"] == pytest.approx(reference["avg_flops"], rel=1e-3)
    assert ours["query_active_dims"] == pytest.approx(reference["query_active_dims"], rel=1e-3)
    assert ours["doc_active_dims"] == pytest.approx(reference["corpus_active_dims"], rel=1e-3)
    assert ours["num_queries"] == len(relevant)
    assert 0.2 < ours["ndcg@10"] < 0.9 and 0.3 < ours["mrr@10"] <= 1  # a real model on real data


@pytest.mark.slow  # splade-tiny encodes real collections on a CPU
def test_metrics_json_and_run_files_agree_with_pytrec_eval(evaluation, subsets):
    results, out, _ = evaluation
    assert json.loads((out / "metrics.json").read_text()) == results
    # Neither is one of the SPLADE papers' 13 BEIR sets: no beir-mean (tests/test_evaluate.py::test_beir_mean...)
    assert set(results) == {"beir-cranfield", "beir-cisi"}
    for name in ("cranfield", "cisi"):
        _, _, qrels_rows = read_beir(subsets[name])
        qrels = {}
        for qid, doc, rel in qrels_rows:
            qrels.setdefault(qid, {})[doc] = int(rel)  # graded, as trec_eval reads them
        run = read_run(out / "runs" / f"beir-{name}.trec")
        assert max(len(hits) for hits in run.values()) == min(1000, results[f"beir-{name}"]["num_docs"])
        full = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_1000"}).evaluate(run)
        top10 = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(
            {q: dict(list(hits.items())[:10]) for q, hits in run.items()}
        )
        ours = results[f"beir-{name}"]
        assert ours["ndcg@10"] == pytest.approx(np.mean([v["ndcg_cut_10"] for v in full.values()]), abs=1e-9)
        assert ours["recall@1000"] == pytest.approx(np.mean([v["recall_1000"] for v in full.values()]), abs=1e-9)
        assert ours["mrr@10"] == pytest.approx(np.mean([v["recip_rank"] for v in top10.values()]), abs=1e-9)


@pytest.mark.slow  # splade-tiny encodes real collections on a CPU
def test_cache_reuses_vectors_and_self_hit_rule_drops_only_self_ids(evaluation, subsets, splade_tiny_path, tmp_path):
    results, out, cache = evaluation
    again = evaluate.evaluate_model(
        splade_tiny_path,
        [str(subsets["cranfield"])],
        tmp_path,
        cache_dir=cache,
        max_seq_length=MAX_SEQ_LENGTH,
        batch_size=32,
        show_progress=False,
    )
    assert again["beir-cranfield"]["doc_vectors_cached"] is True
    assert not results["beir-cranfield"]["doc_vectors_cached"]
    # Cranfield's numeric query ids collide with document ids, so BEIR's rule bites here.
    kept = read_run(out / "runs" / "beir-cranfield.trec")
    dropped = read_run(tmp_path / "runs" / "beir-cranfield.trec")
    assert any(qid in hits for qid, hits in kept.items())
    for qid, hits in kept.items():
        assert qid not in dropped[qid]
        assert list(dropped[qid]) == [doc for doc in hits if doc != qid][: len(dropped[qid])]


@pytest.mark.slow  # splade-tiny encodes real collections on a CPU
def test_msmarco_layout_through_the_command_line(splade_tiny_path, tmp_path, capsys):
    """collection.tsv + dev-small and TREC DL files in their official formats, no download."""
    corpus, queries, qrels = read_beir(BEIR / "cranfield")
    judged = list(dict.fromkeys(q for q, _, _ in qrels))[:8]
    docs = {d for q, d, _ in qrels if q in judged} | {d["_id"] for d in corpus[:20]}
    data = tmp_path / "msmarco"
    data.mkdir()
    (data / "collection.tsv").write_text("".join(f"{d['_id']}\t{d['text']}\n" for d in corpus if d["_id"] in docs))
    query_lines = "".join(f"{q['_id']}\t{q['text']}\n" for q in queries if q["_id"] in judged)
    (data / "queries.dev.small.tsv").write_text(query_lines)
    (data / "dl19-passage.queries.tsv").write_text(query_lines)
    (data / "qrels.dev.small.tsv").write_text("".join(f"{q}\t0\t{d}\t1\n" for q, d, _ in qrels if q in judged))
    # Cranfield grades 1-4 stand in for TREC's 0-3; recall counts grade >= 2 only.
    (data / "2019qrels-pass.txt").write_text("".join(f"{q} Q0 {d} {r}\n" for q, d, r in qrels if q in judged))
    out = tmp_path / "out"
    code = evaluate.main(
        [
            splade_tiny_path,
            "--msmarco",
            "--trec-dl",
            "2019",
            "--data_dir",
            str(data),
            "--output",
            str(out),
            "--cache_dir",
            str(tmp_path / "cache"),
            "--max_seq_length",
            "64",
            "--batch_size",
            "16",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| MS MARCO dev MRR@10 | R@1k | TREC DL19 nDCG@10 |" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"msmarco-dev", "trec-dl-2019"}
    dev, dl19 = metrics["msmarco-dev"], metrics["trec-dl-2019"]
    assert dev["num_queries"] == dl19["num_queries"] == 8 and dev["num_docs"] == len(docs)
    assert dl19["recall_min_rel"] == 2 and dev["recall_min_rel"] == 1
    assert dev["mrr@10"] > 0.3 and dev["flops"] == pytest.approx(dl19["flops"])
    row = next(line for line in printed.splitlines() if line.startswith("| splade-tiny |"))
    assert f"{100 * dev['mrr@10']:.1f}" in row and f"{dev['flops']:.2f}" in row
    for name in ("msmarco-dev", "trec-dl-2019"):
        lines = (out / "runs" / f"{name}.trec").read_text().splitlines()
        assert lines[0].split()[1::2] == ["Q0", "1", "splade-tiny"]  # qid Q0 docid rank score run_name


def test_local_beir_zip_is_unpacked_once_into_the_cache(tmp_path):
    source = write_beir(
        tmp_path / "src" / "toy",
        [{"_id": "d1", "title": "t", "text": "x"}],
        [{"_id": "q1", "text": "y"}],
        [["q1", "d1", "1"]],
    )
    archive = tmp_path / "toy.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for path in source.rglob("*"):
            z.write(path, path.relative_to(source.parent))
    (eval_set,) = eval_sets.resolve_beir(str(archive), tmp_path / "cache")
    assert eval_set.name == "beir-toy" and eval_set.drop_self_hits and eval_set.queries == {"q1": "y"}
    assert eval_set.corpus_file == tmp_path / "cache" / "beir" / "toy" / "corpus.jsonl"
    with pytest.raises(UserError, match="downloads are off"):
        eval_sets.resolve_beir("scifact", tmp_path / "cache", download=False)


def test_bad_input_gives_clear_errors(tmp_path, splade_tiny_path, capsys):
    good = dict(corpus=[{"_id": "d1", "text": "a"}], queries=[{"_id": "q1", "text": "b"}], qrels=[["q1", "d1", "1"]])

    missing = write_beir(tmp_path / "missing", **good)
    (missing / "queries.jsonl").unlink()
    with pytest.raises(UserError, match=r"missing.*missing queries.jsonl or queries.jsonl.gz"):
        eval_sets.resolve_datasets([str(missing)])

    unknown = write_beir(tmp_path / "unknown", good["corpus"], good["queries"], good["qrels"] + [["q9", "d1", "1"]])
    with pytest.raises(UserError, match=r"qrels/test.tsv:3: query id 'q9' is not in .*queries.jsonl"):
        eval_sets.resolve_datasets([str(unknown)])

    empty = write_beir(tmp_path / "empty", [], good["queries"], good["qrels"])
    (eval_set,) = eval_sets.resolve_datasets([str(empty)])
    with pytest.raises(UserError, match=r"corpus.jsonl: the corpus is empty"):
        readers.read_corpus(eval_set.corpus_file)

    broken = write_beir(tmp_path / "broken", **good)
    with open(broken / "corpus.jsonl", "a") as f:
        f.write('{"_id": "d2", "text": \n')
    with pytest.raises(UserError, match=r"corpus.jsonl:2: malformed JSON"):
        readers.read_corpus(broken / "corpus.jsonl")

    (broken / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tyes\n")
    with pytest.raises(UserError, match=r"test.tsv:2: relevance 'yes' is not an integer"):
        readers.read_qrels(broken / "qrels" / "test.tsv")

    # A checkpoint without a masked-LM head (a bare BertModel): refused by name, through the CLI.
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=200,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        architectures=["BertModel"],
    )
    BertModel(config).save_pretrained(tmp_path / "no_head")
    good_dir = write_beir(tmp_path / "ok", **good)
    with pytest.raises(SystemExit) as exit_status:
        main_exits_2_on_user_error(
            evaluate.main,
            [
                str(tmp_path / "no_head"),
                "--beir",
                str(good_dir),
                "--cache_dir",
                str(tmp_path / "c"),
                "--output",
                str(tmp_path / "o"),
            ],
        )
    assert exit_status.value.code == 2
    message = capsys.readouterr().err
    assert "no_head" in message and "masked-LM" in message and "Traceback" not in message


def test_failed_download_exits_2_with_a_message_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """MS MARCO files missing, the server answers 404: exit 2 and one line. A bug is not turned into a message."""
    from data import download

    with FileServer({}) as server:  # serves nothing: every file is a 404
        monkeypatch.setattr(
            download, "SOURCES", {n: download.Source(f"{server.url}/{n}", None, None) for n in download.SOURCES}
        )
        argv = ["no-model-needed", "--msmarco", "--data_dir", str(tmp_path / "data"), "--output", str(tmp_path / "o")]
        with pytest.raises(SystemExit) as exit_status:
            main_exits_2_on_user_error(evaluate.main, argv)
    assert exit_status.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: ") and "HTTP 404" in message and "Traceback" not in message

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(eval_sets, "fetch_msmarco", bug)
    with pytest.raises(KeyError, match="a bug"):
        main_exits_2_on_user_error(evaluate.main, argv)


def test_beir_mean_is_the_papers_13_sets_and_cqadupstack_the_mean_of_its_forums():
    from data.eval_sets import SPLADE_BEIR_SETS, EvalSet
    from evaluate import add_beir_mean, results_table

    # The SPLADE v2 / SPLADE++ papers' list, written out independently of the product's constant.
    papers = "arguana climate-fever dbpedia-entity fever fiqa hotpotqa nfcorpus nq quora scidocs scifact trec-covid"
    assert sorted(SPLADE_BEIR_SETS) == sorted([*papers.split(), "webis-touche2020"])
    sets = [EvalSet(f"beir-{name}", None, {}, {}, beir_group=f"beir-{name}") for name in ["arguana", "scifact", "cisi"]]
    forums = [f"beir-cqadupstack-forum{i}" for i in range(12)]
    sets += [EvalSet(name, None, {}, {}, beir_group="beir-cqadupstack") for name in forums]
    results = {"beir-arguana": {"ndcg@10": 0.4}, "beir-scifact": {"ndcg@10": 0.7}, "beir-cisi": {"ndcg@10": 0.1}}
    results |= {name: {"ndcg@10": i / 100} for i, name in enumerate(forums)}
    add_beir_mean(results, sets)
    assert results["beir-mean"]["ndcg@10"] == pytest.approx(0.55)  # arguana and scifact only
    assert results["beir-mean"]["datasets"] == ["beir-arguana", "beir-scifact"]
    assert len(results["beir-mean"]["missing"]) == 11
    assert results["beir-cqadupstack"] == {"ndcg@10": pytest.approx(0.055), "parts": 12}
    table = results_table({name: results[name] for name in ("beir-mean", "beir-cqadupstack")}, "m")
    assert "| BEIR mean (2 of the papers' 13 sets) | 55.0 |" in table
    assert "| beir-cqadupstack (mean of 12 parts) | 5.5 |" in table
