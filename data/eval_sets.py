"""Evaluation data sets: from a name or a folder to the queries, judgments and corpus file to score.

    msmarco / msmarco-dev   MS MARCO dev small (queries.dev.small.tsv, qrels.dev.small.tsv) over collection.tsv
    trec-dl-2019/2020       TREC DL passage queries and graded qrels over the same collection.tsv
    beir:NAME_OR_DIR        a BEIR name (downloaded once into CACHE/beir), a folder in BEIR layout or a .zip
    a folder                BEIR layout, or MS MARCO layout (collection.tsv + the dev-small files)

Missing MS MARCO / TREC DL files and BEIR sets are downloaded by data.download; the files are read by
data.readers. Nothing here knows about models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from data.readers import DataError, read_qrels, read_query_texts
from errors import UserError

DEFAULT_CACHE_DIR = Path(os.environ.get("SPLADE_CACHE_DIR", "~/.cache/splade-repro")).expanduser()
# The 13 public BEIR sets whose nDCG@10 the SPLADE v2 and SPLADE++ papers average (BEIR's names): the results
# table's BEIR column. CQADupStack (12 forums) is reported on its own line, as the mean of its forums.
SPLADE_BEIR_SETS = (
    "arguana", "climate-fever", "dbpedia-entity", "fever", "fiqa", "hotpotqa", "nfcorpus", "nq", "quora",
    "scidocs", "scifact", "trec-covid", "webis-touche2020",
)  # fmt: skip
MSMARCO_FILES = {  # data set -> (queries file names accepted, qrels file name)
    "msmarco-dev": (["queries.dev.small.tsv"], "qrels.dev.small.tsv"),
    "trec-dl-2019": (["msmarco-test2019-queries.tsv", "dl19-passage.queries.tsv"], "2019qrels-pass.txt"),
    "trec-dl-2020": (["msmarco-test2020-queries.tsv", "dl20.queries.tsv"], "2020qrels-pass.txt"),
}


@dataclass
class EvalSet:
    name: str  # key in metrics.json and name of the run file
    corpus_file: Path
    queries: dict[str, str]  # judged queries only, in file order
    qrels: dict[str, dict[str, int]]
    recall_min_rel: int = 1  # 2 for TREC DL
    drop_self_hits: bool = False  # BEIR
    beir_group: str | None = None  # BEIR set it is averaged into (cqadupstack's forums form one)


def make_eval_set(name, corpus_file, queries_file, qrels_file, **options) -> EvalSet:
    """Read queries and qrels; keep the queries with a judgment above 0 (the ones every measure averages over)."""
    queries = read_query_texts(queries_file)
    qrels, first_line = read_qrels(qrels_file)
    unknown = [qid for qid in qrels if qid not in queries]
    if unknown:
        raise DataError(
            f"{qrels_file}:{first_line[unknown[0]]}: query id {unknown[0]!r} is not in {queries_file}"
            f" ({len(unknown)} unknown query ids)"
        )
    judged = {qid for qid, hits in qrels.items() if any(rel > 0 for rel in hits.values())}
    if not judged:
        raise DataError(f"{qrels_file}: no judgment above 0, nothing to evaluate")
    return EvalSet(
        name=name,
        corpus_file=Path(corpus_file),
        qrels={q: qrels[q] for q in qrels if q in judged},
        queries={q: text for q, text in queries.items() if q in judged},
        **options,
    )


def fetch_msmarco(data_dir: Path, what: str) -> None:
    """Download one MS MARCO / TREC DL piece; a failure is a DownloadError (a UserError) that says what to try."""
    from data import download  # only when a file is missing: evaluating local files never needs it

    fetchers = {
        "collection": lambda: download.download_collection(data_dir),
        "msmarco-dev": lambda: download.download_dev_small(data_dir),
        "trec-dl-2019": lambda: download.download_trec_dl(data_dir, 2019),
        "trec-dl-2020": lambda: download.download_trec_dl(data_dir, 2020),
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    with download.file_lock(data_dir / ".download.lock"):  # several ranks, one download
        fetchers[what]()


def msmarco_file(data_dir: Path, names: list[str], what: str, download: bool) -> Path:
    def existing():
        return next((data_dir / name for name in names if (data_dir / name).is_file()), None)

    if existing() is None and download:
        fetch_msmarco(data_dir, what)
    path = existing()
    if path is None:
        raise DataError(f"{data_dir}: missing {' or '.join(names)}" + ("" if download else " (downloads are off)"))
    return path


def msmarco_set(name: str, data_dir: Path, download: bool = True) -> EvalSet:
    """MS MARCO dev small or TREC DL 2019/2020 over collection.tsv, files in the official layout."""
    data_dir = Path(data_dir)
    query_names, qrels_name = MSMARCO_FILES[name]
    queries_file = msmarco_file(data_dir, query_names, name, download)
    qrels_file = msmarco_file(data_dir, [qrels_name], name, download)
    corpus_file = msmarco_file(data_dir, ["collection.tsv"], "collection", download)
    return make_eval_set(
        name, corpus_file, queries_file, qrels_file, recall_min_rel=2 if name.startswith("trec-dl") else 1
    )


def find_file(directory: Path, names: list[str], what: str) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise DataError(
        f"{directory}: missing {' or '.join(names)} ({what}; BEIR layout is corpus.jsonl[.gz], "
        f"queries.jsonl[.gz], qrels/<split>.tsv)"
    )


def beir_sets(directory: Path, name: str, split: str = "test") -> list[EvalSet]:
    """One BEIR directory; a directory of BEIR directories (CQADupStack's forums) gives one set
    per forum, averaged together as one BEIR set."""
    directory = Path(directory)
    has_corpus = any((directory / n).is_file() for n in ("corpus.jsonl", "corpus.jsonl.gz"))
    forums = sorted(d for d in directory.iterdir() if d.is_dir() and (d / "qrels").is_dir()) if not has_corpus else []
    if forums:
        sets = [s for forum in forums for s in beir_sets(forum, f"{name}-{forum.name}", split)]
        for eval_set in sets:
            eval_set.beir_group = name
        return sets
    corpus = find_file(directory, ["corpus.jsonl", "corpus.jsonl.gz"], "documents")
    queries = find_file(directory, ["queries.jsonl", "queries.jsonl.gz"], "queries")
    qrels = find_file(directory, [f"qrels/{split}.tsv"], f"judgments of split {split!r}")
    return [make_eval_set(name, corpus, queries, qrels, drop_self_hits=True, beir_group=name)]


def resolve_beir(spec: str, cache_dir: Path, split: str = "test", download: bool = True) -> list[EvalSet]:
    """A BEIR folder, a BEIR .zip (unpacked once into cache_dir/beir) or a BEIR name (downloaded once)."""
    from data.download import download_beir, file_lock, unpack_beir_zip  # only for zips and names

    path = Path(spec).expanduser()
    if path.is_dir():
        return beir_sets(path, f"beir-{path.resolve().name}", split)
    if path.suffix == ".zip" and path.is_file():
        name = path.name[: -len(".zip")]
        target = Path(cache_dir) / "beir" / name
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            with file_lock(target.parent / ".download.lock"):  # several ranks, one unpacking
                if not target.is_dir():
                    unpack_beir_zip(path, target)
        return beir_sets(target, f"beir-{name}", split)
    if os.sep in spec or "/" in spec or spec.startswith("."):
        raise DataError(f"{spec}: no such BEIR directory or zip file")
    target = Path(cache_dir) / "beir" / spec
    if not target.is_dir():
        if not download:
            raise DataError(f"{target}: BEIR set {spec!r} is not there (downloads are off)")
        download_beir(spec, target.parent)
    return beir_sets(target, f"beir-{spec}", split)


def resolve_datasets(
    datasets: list[str],
    data_dir="msmarco-data",
    cache_dir=DEFAULT_CACHE_DIR,
    beir_split: str = "test",
    download: bool = True,
) -> list[EvalSet]:
    """Names to data sets: 'msmarco' (dev small), 'trec-dl-2019', 'trec-dl-2020', 'beir:NAME_OR_DIR',
    or a directory (BEIR layout, or MS MARCO layout with collection.tsv + dev-small files)."""
    sets = []
    for spec in map(str, datasets):
        if spec in ("msmarco", "msmarco-dev"):
            sets.append(msmarco_set("msmarco-dev", Path(data_dir), download))
        elif spec in ("trec-dl-2019", "trec-dl-2020"):
            sets.append(msmarco_set(spec, Path(data_dir), download))
        elif spec.startswith("beir:"):
            sets.extend(resolve_beir(spec[len("beir:") :], Path(cache_dir), beir_split, download))
        elif Path(spec).is_dir() and (Path(spec) / "collection.tsv").is_file():
            sets.append(msmarco_set("msmarco-dev", Path(spec), download=False))
        elif Path(spec).is_dir():
            sets.extend(resolve_beir(spec, Path(cache_dir), beir_split, download))
        else:
            raise UserError(
                f"unknown data set {spec!r}: use msmarco, trec-dl-2019, trec-dl-2020, beir:NAME_OR_DIR or a directory"
            )
    names = [s.name for s in sets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"data set given twice: {', '.join(duplicates)}")
    return sets
