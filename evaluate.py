"""Evaluate a SPLADE model: encode, index, retrieve exactly (top 1000) and score, in one command.

    python evaluate.py MODEL --msmarco --trec-dl 2019 2020 --beir scifact nfcorpus path/to/beir_dir

MODEL is a directory saved by this project's training scripts, or any SPLADE masked-LM
checkpoint (a hub id where there is internet). Prints the results table of SPEC.md (x100) and
writes, under --output, metrics.json and one TREC run file per data set.

Data sets:
  --msmarco           MS MARCO dev small (queries.dev.small.tsv, qrels.dev.small.tsv) over
                      collection.tsv, all read from --data_dir; a missing file is downloaded.
                      --data_dir data/sample evaluates the bundled sample.
  --trec-dl 2019 2020 TREC DL passage queries and graded qrels, same collection.
  --beir X ...        X = a BEIR name (downloaded once into --cache_dir), a directory in BEIR
                      layout (corpus.jsonl[.gz], queries.jsonl[.gz], qrels/test.tsv) or a .zip.

Conventions (SPEC.md, "The results table"): scores are exact dot products over an inverted
index; ties go to the larger document id (trec_eval's order); every judged query counts
(no hit = 0); MRR@10 = trec_eval recip_rank on the run cut at 10; TREC DL recall counts
relevance >= 2; BEIR drops a hit whose id is the query's id. FLOPS = sum_v p_q[v] p_d[v].

Document vectors are cached (scipy CSR .npz shards) under --cache_dir, keyed by model weights,
corpus file, max_seq_length and precision, so re-evaluating a model does not re-encode.
Several GPUs: torchrun --nproc_per_node N evaluate.py ... (each rank encodes every N-th shard;
rank 0 waits for the shards, indexes and scores).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

import retrieval
from errors import UserError

TOP_K = 1000
DEFAULT_CACHE_DIR = Path(os.environ.get("SPLADE_CACHE_DIR", "~/.cache/splade-repro")).expanduser()
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
# Documents per cached shard: bounds the memory of one encoding step and of index building, and
# is the unit of resuming and of splitting work between GPUs.
SHARD_SIZE = 100_000
CACHE_FORMAT = 1
# The seed's table: (data set, metric, column title). FLOPS comes from MS MARCO dev.
TABLE_COLUMNS = [
    ("msmarco-dev", "mrr@10", "MS MARCO dev MRR@10"),
    ("msmarco-dev", "recall@1000", "R@1k"),
    ("trec-dl-2019", "ndcg@10", "TREC DL19 nDCG@10"),
    ("trec-dl-2019", "recall@1000", "DL19 R@1k"),
    ("trec-dl-2020", "ndcg@10", "DL20 nDCG@10"),
    ("trec-dl-2020", "recall@1000", "DL20 R@1k"),
    ("beir-mean", "ndcg@10", "BEIR nDCG@10"),
]
MSMARCO_FILES = {  # data set -> (queries file names accepted, qrels file name)
    "msmarco-dev": (["queries.dev.small.tsv"], "qrels.dev.small.tsv"),
    "trec-dl-2019": (["msmarco-test2019-queries.tsv", "dl19-passage.queries.tsv"], "2019qrels-pass.txt"),
    "trec-dl-2020": (["msmarco-test2020-queries.tsv", "dl20.queries.tsv"], "2020qrels-pass.txt"),
}


class InputError(UserError):
    """A problem with the user's files, model or arguments: printed as one line, no traceback."""


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# Reading files (every error names the file and line)
# ---------------------------------------------------------------------------------------------


def open_text(path: Path):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl_line(path: Path, lineno: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"{path}:{lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or "_id" not in record:
        raise InputError(f"{path}:{lineno}: a record needs an '_id' field")
    return record


def read_corpus(path: Path) -> tuple[list[str], list[str]]:
    """Document ids and texts, in file order: ``collection.tsv`` (pid TAB passage) or a BEIR
    ``corpus.jsonl[.gz]`` (text = title + " " + text, as BEIR and sentence-transformers do)."""
    ids, texts = [], []
    is_jsonl = ".jsonl" in Path(path).name
    with open_text(path) as lines:
        for lineno, line in enumerate(
            tqdm(lines, desc=f"read {Path(path).name}", unit=" docs", unit_scale=True, mininterval=2, leave=False),
            start=1,
        ):
            if not line.strip():
                continue
            if is_jsonl:
                record = read_jsonl_line(path, lineno, line)
                if "text" not in record:
                    raise InputError(f"{path}:{lineno}: document {record['_id']!r} has no 'text' field")
                doc_id = str(record["_id"])
                text = f"{record.get('title') or ''} {record['text'] or ''}".strip()
            else:
                doc_id, tab, text = line.rstrip("\n").partition("\t")
                if not tab:
                    raise InputError(f"{path}:{lineno}: expected 'pid<TAB>passage'")
            ids.append(doc_id)
            texts.append(text)
    if not ids:
        raise InputError(f"{path}: the corpus is empty, nothing to index")
    if len(set(ids)) != len(ids):
        seen = {}
        for lineno, doc_id in enumerate(ids, start=1):
            if doc_id in seen:
                raise InputError(f"{path}: document id {doc_id!r} appears twice (records {seen[doc_id]} and {lineno})")
            seen[doc_id] = lineno
    return ids, texts


def read_queries(path: Path) -> dict[str, str]:
    """``qid TAB text`` (MS MARCO / TREC) or BEIR ``queries.jsonl[.gz]``."""
    queries = {}
    is_jsonl = ".jsonl" in Path(path).name
    with open_text(path) as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if is_jsonl:
                record = read_jsonl_line(path, lineno, line)
                qid, text = str(record["_id"]), str(record.get("text") or "")
            else:
                qid, tab, text = line.rstrip("\n").partition("\t")
                if not tab:
                    raise InputError(f"{path}:{lineno}: expected 'qid<TAB>query text'")
            queries[qid] = text
    if not queries:
        raise InputError(f"{path}: no queries")
    return queries


def read_qrels(path: Path) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Relevance judgments and the first line of each query id. Formats: TREC (``qid Q0 docid
    rel``, also MS MARCO's ``qid 0 pid rel``, space or tab) and BEIR (``query-id TAB corpus-id
    TAB score`` after a header line)."""
    qrels, first_line = {}, {}
    with open_text(path) as lines:
        for lineno, line in enumerate(lines, start=1):
            fields = line.split()
            if not fields or (lineno == 1 and fields[0] == "query-id"):
                continue
            if len(fields) == 4:
                qid, _, doc_id, rel = fields
            elif len(fields) == 3:
                qid, doc_id, rel = fields
            else:
                raise InputError(
                    f"{path}:{lineno}: expected 'qid Q0 docid relevance' or "
                    f"'query-id corpus-id score', got {len(fields)} fields"
                )
            try:
                rel = int(rel)
            except ValueError:
                raise InputError(f"{path}:{lineno}: relevance {rel!r} is not an integer") from None
            qrels.setdefault(qid, {})[doc_id] = rel
            first_line.setdefault(qid, lineno)
    if not qrels:
        raise InputError(f"{path}: no judgments")
    return qrels, first_line


# ---------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------


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
    queries = read_queries(queries_file)
    qrels, first_line = read_qrels(qrels_file)
    unknown = [qid for qid in qrels if qid not in queries]
    if unknown:
        raise InputError(
            f"{qrels_file}:{first_line[unknown[0]]}: query id {unknown[0]!r} is not in {queries_file}"
            f" ({len(unknown)} unknown query ids)"
        )
    judged = set(retrieval.judged_query_ids(qrels))
    if not judged:
        raise InputError(f"{qrels_file}: no judgment above 0, nothing to evaluate")
    return EvalSet(
        name=name,
        corpus_file=Path(corpus_file),
        qrels={q: qrels[q] for q in qrels if q in judged},
        queries={q: text for q, text in queries.items() if q in judged},
        **options,
    )


def fetch_msmarco(data_dir: Path, what: str) -> None:
    """The one place that uses the data package's downloader; imported only when a file is missing,
    so evaluation of local files never needs it."""
    try:
        from data import download
    except ImportError as error:
        raise InputError(
            f"{data_dir}: MS MARCO files missing and the downloader (data.download) cannot be imported: {error}"
        ) from None
    fetchers = {
        "collection": lambda: download.download_collection(data_dir),
        "msmarco-dev": lambda: download.download_dev_small(data_dir),
        "trec-dl-2019": lambda: download.download_trec_dl(data_dir, 2019),
        "trec-dl-2020": lambda: download.download_trec_dl(data_dir, 2020),
    }
    log(f"downloading {what} into {data_dir}")
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        fetchers[what]()
    except (OSError, urllib.error.URLError) as error:
        raise InputError(f"downloading {what} into {data_dir} failed: {error}") from None


def msmarco_file(data_dir: Path, names: list[str], what: str, download: bool) -> Path:
    def existing():
        return next((data_dir / name for name in names if (data_dir / name).is_file()), None)

    if existing() is None and download:
        fetch_msmarco(data_dir, what)
    path = existing()
    if path is None:
        raise InputError(f"{data_dir}: missing {' or '.join(names)}" + ("" if download else " (downloads are off)"))
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
    raise InputError(
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


def download_beir(name: str, root: Path, url_template: str = BEIR_URL) -> Path:
    """Fetch a BEIR zip (once) and unpack it into root/name."""
    target = root / name
    if target.is_dir():
        return target
    url = url_template.format(name=name)
    root.mkdir(parents=True, exist_ok=True)
    part = root / f"{name}.zip.part"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            size = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=size, unit="B", unit_scale=True, desc=f"download {name}", leave=False) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (OSError, urllib.error.URLError, ValueError) as error:
        part.unlink(missing_ok=True)
        raise InputError(
            f"BEIR set {name!r}: download from {url} failed ({error}); pass a local directory in BEIR layout instead"
        ) from None
    try:
        return unpack_beir_zip(part, target)
    finally:
        part.unlink(missing_ok=True)


def unpack_beir_zip(archive: Path, target: Path) -> Path:
    """Unpack a BEIR zip (one top folder holding corpus/queries/qrels) into target."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(staging)  # zipfile drops absolute paths and '..' components
        tops = [p for p in staging.iterdir() if p.is_dir()]
        source = tops[0] if len(tops) == 1 and not (staging / "qrels").is_dir() else staging
        os.replace(source, target)
    except zipfile.BadZipFile as error:
        raise InputError(f"{archive}: not a valid zip file ({error})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_beir(spec: str, cache_dir: Path, split: str = "test", url_template: str = BEIR_URL) -> list[EvalSet]:
    path = Path(spec).expanduser()
    if path.is_dir():
        return beir_sets(path, f"beir-{path.resolve().name}", split)
    if path.suffix == ".zip" and path.is_file():
        name = path.name[: -len(".zip")]
        target = cache_dir / "beir" / name
        if not target.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            unpack_beir_zip(path, target)
        return beir_sets(target, f"beir-{name}", split)
    if os.sep in spec or spec.startswith("."):
        raise InputError(f"{spec}: no such BEIR directory or zip file")
    return beir_sets(download_beir(spec, cache_dir / "beir", url_template), f"beir-{spec}", split)


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
    for spec in datasets:
        spec = str(spec)
        if spec in ("msmarco", "msmarco-dev"):
            sets.append(msmarco_set("msmarco-dev", Path(data_dir), download))
        elif spec in ("trec-dl-2019", "trec-dl-2020"):
            sets.append(msmarco_set(spec, Path(data_dir), download))
        elif spec.startswith("beir:"):
            sets.extend(resolve_beir(spec[len("beir:") :], Path(cache_dir), beir_split))
        elif Path(spec).is_dir() and (Path(spec) / "collection.tsv").is_file():
            sets.append(msmarco_set("msmarco-dev", Path(spec), download=False))
        elif Path(spec).is_dir():
            sets.extend(resolve_beir(spec, Path(cache_dir), beir_split))
        else:
            raise InputError(
                f"unknown data set {spec!r}: use msmarco, trec-dl-2019, trec-dl-2020, beir:NAME_OR_DIR or a directory"
            )
    names = [s.name for s in sets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"data set given twice: {', '.join(duplicates)}")
    return sets


# ---------------------------------------------------------------------------------------------
# Model and encoding
# ---------------------------------------------------------------------------------------------


def load_model(model_or_path, max_seq_length: int | None = None):
    """Our SPLADE encoder (a SparseEncoder whose one module computes the chunked max-then-activate head)."""
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path
    from splade_module import load_splade

    try:
        return load_splade(str(model_or_path), max_seq_length=max_seq_length)
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"model {model_or_path}: {error}") from None


def model_fingerprint(model_or_path, model) -> str:
    """What the cached document vectors depend on: a saved model's weight files (path, size,
    mtime), else a hash of the weights themselves (in-memory models, hub ids)."""
    path = Path(str(model_or_path))
    if not isinstance(model_or_path, torch.nn.Module) and path.is_dir():
        # Weights, configs and tokenizer files at the top level (not checkpoint-* folders or outputs).
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".json", ".txt", ".model")
        )
        stamp = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return hashlib.sha256(json.dumps([str(path.resolve()), stamp]).encode()).hexdigest()
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise InputError("--precision fp16 needs a GPU; use fp32 or bf16 on a CPU")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def encode(
    model,
    texts: list[str],
    batch_size: int,
    device: torch.device,
    precision: str,
    desc: str = "encode",
    show_progress: bool = True,
) -> sp.csr_matrix:
    """SPLADE vectors of texts as a CSR matrix (rows in input order). Texts go longest first, so
    batches need little padding (and a too large batch fails at once, not after hours)."""
    order = np.argsort([-len(text) for text in texts], kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    nnz_per_row, columns, values = [], [], []
    # Tokenise the next batch on a second thread while the model runs on this one.
    with ThreadPoolExecutor(max_workers=1) as tokenizer_thread, torch.inference_mode(), autocast(device, precision):
        tokenize = lambda rows: model.preprocess([texts[i] for i in rows])  # noqa: E731
        pending = tokenizer_thread.submit(tokenize, batches[0]) if batches else None
        for b in tqdm(range(len(batches)), desc=desc, unit="batch", disable=not show_progress, mininterval=2):
            features = pending.result()
            if b + 1 < len(batches):
                pending = tokenizer_thread.submit(tokenize, batches[b + 1])
            features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
            vectors = model(features)["sentence_embedding"].float()
            rows, cols = vectors.nonzero(as_tuple=True)  # row-major order, as CSR wants it
            nnz_per_row.append(torch.bincount(rows, minlength=len(vectors)).cpu().numpy())
            columns.append(cols.to(torch.int32).cpu().numpy())
            values.append(vectors[rows, cols].cpu().numpy())
    vocab = vectors.shape[1]
    indptr = np.zeros(len(texts) + 1, dtype=np.int64)
    if texts:
        np.cumsum(np.concatenate(nnz_per_row), out=indptr[1:])
    sorted_rows = sp.csr_matrix(
        (
            np.concatenate(values) if values else np.zeros(0, np.float32),
            np.concatenate(columns) if columns else np.zeros(0, np.int32),
            indptr,
        ),
        shape=(len(texts), vocab),
    )
    return sorted_rows[np.argsort(order)]


# ---------------------------------------------------------------------------------------------
# Document vectors on disk
# ---------------------------------------------------------------------------------------------


@dataclass
class DocVectors:
    shards: list[Path]
    doc_ids: list[str]
    encode_seconds: float  # spent in this call (0 when everything came from the cache)
    cached: bool


def wait_for_shards(paths: list[Path], poll_seconds: float = 10.0) -> None:
    """Rank 0 waits for the shards other ranks write (each appears atomically when complete)."""
    missing = [p for p in paths if not p.is_file()]
    with tqdm(
        total=len(paths), initial=len(paths) - len(missing), desc="shards from other ranks", disable=not missing
    ) as bar:
        while missing:
            time.sleep(poll_seconds)
            still = [p for p in missing if not p.is_file()]
            bar.update(len(missing) - len(still))
            missing = still


def document_vectors(
    corpus_file: Path,
    model,
    fingerprint: str,
    cache_root: Path,
    batch_size: int,
    device: torch.device,
    precision: str,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = True,
) -> DocVectors | None:
    """Encode a corpus into shard files under a directory named by everything the vectors depend
    on, skipping shards already there. Returns None on ranks other than 0."""
    stat = corpus_file.stat()
    key = {
        "format": CACHE_FORMAT,
        "model": fingerprint,
        "corpus": [str(corpus_file.resolve()), stat.st_size, stat.st_mtime_ns],
        "max_seq_length": model.max_seq_length,
        "precision": precision,
        "shard_size": SHARD_SIZE,
    }
    directory = cache_root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    manifest = directory / "manifest.json"
    if manifest.is_file():
        if rank != 0:
            return None
        info = json.loads(manifest.read_text())
        with open(directory / "doc_ids.json", encoding="utf-8") as f:
            doc_ids = json.load(f)
        log(f"document vectors of {corpus_file.name} from the cache: {directory}")
        return DocVectors([directory / name for name in info["shards"]], doc_ids, 0.0, True)

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.json").write_text(json.dumps(key, indent=2))
    doc_ids, texts = read_corpus(corpus_file)
    shards = [directory / f"docs-{i:05d}.npz" for i in range(math.ceil(len(texts) / SHARD_SIZE))]
    started = time.perf_counter()
    for i, shard in enumerate(shards):
        if i % world_size != rank or shard.is_file():
            continue
        vectors = encode(
            model,
            texts[i * SHARD_SIZE : (i + 1) * SHARD_SIZE],
            batch_size,
            device,
            precision,
            desc=f"encode {corpus_file.name} [{i + 1}/{len(shards)}]",
            show_progress=show_progress,
        )
        part = shard.with_name(shard.stem + f".rank{rank}.part.npz")
        sp.save_npz(part, vectors, compressed=False)  # float weights barely compress; loading is faster
        os.replace(part, shard)
    encode_seconds = time.perf_counter() - started
    if rank != 0:
        return None
    wait_for_shards(shards)
    part = directory / "doc_ids.json.part"
    with open(part, "w", encoding="utf-8") as f:
        json.dump(doc_ids, f)
    os.replace(part, directory / "doc_ids.json")
    manifest.write_text(json.dumps({"num_docs": len(doc_ids), "shards": [p.name for p in shards]}))
    return DocVectors(shards, doc_ids, encode_seconds, False)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def evaluate_on_index(
    eval_set: EvalSet,
    index: retrieval.InvertedIndex,
    doc_ids: list[str],
    tie_ranks: np.ndarray,
    query_vectors: sp.csr_matrix,
    top_k: int,
    show_progress: bool,
) -> tuple[dict, retrieval.SearchResult]:
    query_ids = list(eval_set.queries)
    exclude = None
    if eval_set.drop_self_hits:
        position = {doc_id: i for i, doc_id in enumerate(doc_ids)}
        exclude = np.array([position.get(qid, -1) for qid in query_ids], dtype=np.int64)
    started = time.perf_counter()
    result = retrieval.search(
        index, query_vectors, k=top_k, tie_ranks=tie_ranks, exclude=exclude, show_progress=show_progress
    )
    search_seconds = time.perf_counter() - started
    run = retrieval.result_to_run(result, query_ids, doc_ids)
    metrics = retrieval.evaluate_run(run, eval_set.qrels, recall_min_rel=eval_set.recall_min_rel)
    metrics.update(
        flops=retrieval.flops_statistic(query_vectors, index),
        query_active_dims=retrieval.mean_active_dims(query_vectors),
        doc_active_dims=index.nnz / index.num_docs,
        num_queries=len(query_ids),
        num_docs=index.num_docs,
        search_seconds=search_seconds,
    )
    return metrics, result


def warn_unjudgeable(eval_set: EvalSet, known_doc_ids: set) -> None:
    judged = {d for hits in eval_set.qrels.values() for d, rel in hits.items() if rel > 0}
    missing = judged - known_doc_ids
    if missing:
        log(
            f"{eval_set.name}: {len(missing)} relevant document ids are not in {eval_set.corpus_file.name} "
            f"(e.g. {sorted(missing)[0]!r}); they count as not retrieved"
        )


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under torchrun, from its environment variables."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def evaluate_model(
    model_or_path,
    datasets: list,
    output_dir=None,
    *,
    data_dir="msmarco-data",
    cache_dir=DEFAULT_CACHE_DIR,
    max_seq_length: int | None = None,
    batch_size: int = 64,
    precision: str = "auto",
    device: str | None = None,
    top_k: int = TOP_K,
    beir_split: str = "test",
    download: bool = True,
    write_runs: bool = True,
    run_name: str | None = None,
    keep_self_hits: bool = False,
    distributed: bool = False,
    show_progress: bool = True,
) -> dict | None:
    """Evaluate a model (a SparseEncoder or a path / hub id) on data sets and return the metrics,
    the same dict that ``output_dir/metrics.json`` receives:

        {"msmarco-dev": {"mrr@10", "ndcg@10", "recall@1000", "flops", "query_active_dims",
                         "doc_active_dims", "num_queries", "num_docs", "encode_seconds",
                         "search_seconds", ...}, ..., "beir-mean": {"ndcg@10", "datasets"}}

    ``datasets``: 'msmarco', 'trec-dl-2019', 'trec-dl-2020', 'beir:NAME_OR_DIR', or directories
    (see resolve_datasets) or EvalSet objects. ``keep_self_hits``: do not apply BEIR's rule that
    drops a hit whose id equals the query id. ``cache_dir=None``: no cache (vectors in a temporary
    directory). ``distributed=True``: call on every torchrun rank; documents are encoded by all
    ranks, the rest by rank 0, which alone returns the metrics (others return None). Call it on
    rank 0 only with distributed=False (the default)."""
    rank, world_size = distributed_rank() if distributed else (0, 1)
    sets = [d for d in datasets if isinstance(d, EvalSet)]
    sets += resolve_datasets(
        [d for d in datasets if not isinstance(d, EvalSet)],
        data_dir,
        cache_dir or DEFAULT_CACHE_DIR,
        beir_split,
        download,
    )
    if not sets:
        raise InputError("nothing to evaluate: name at least one data set")
    if keep_self_hits:
        for eval_set in sets:
            eval_set.drop_self_hits = False

    model = load_model(model_or_path, max_seq_length)
    saved_state = (model.training, model.max_seq_length)
    if max_seq_length:
        model.max_seq_length = max_seq_length
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    original_device = next(model.parameters()).device
    model.to(device).eval()
    if run_name is None:
        run_name = "splade" if isinstance(model_or_path, torch.nn.Module) else Path(str(model_or_path)).name
    fingerprint = model_fingerprint(model_or_path, model)

    if cache_dir is None and world_size > 1:
        raise InputError("several ranks share document vectors through the cache: give a cache_dir")
    temporary = tempfile.TemporaryDirectory(prefix="splade-eval-") if cache_dir is None else None
    cache_root = Path(temporary.name if temporary else cache_dir) / "doc_vectors"
    output_dir = Path(output_dir) if output_dir else None
    if output_dir and rank == 0:
        (output_dir / "runs" if write_runs else output_dir).mkdir(parents=True, exist_ok=True)

    results = {}
    try:
        # Data sets over the same corpus (MS MARCO dev, DL19, DL20) share one encoding and one index.
        corpora = {}
        for eval_set in sets:
            corpora.setdefault(eval_set.corpus_file.resolve(), []).append(eval_set)
        for corpus_file, group in corpora.items():
            docs = document_vectors(
                corpus_file,
                model,
                fingerprint,
                cache_root,
                batch_size,
                device,
                precision,
                rank,
                world_size,
                show_progress,
            )
            if docs is None:  # another rank than 0: its share of the documents is encoded
                continue
            started = time.perf_counter()
            index = retrieval.build_index(docs.shards, show_progress=show_progress)
            tie_ranks = retrieval.trec_tie_ranks(docs.doc_ids)
            index_seconds = time.perf_counter() - started
            log(
                f"index of {corpus_file.name}: {index.num_docs:,} documents, {index.nnz:,} postings, "
                f"{index.nbytes / 2**30:.2f} GiB, {index_seconds:.1f} s"
            )
            known = set(docs.doc_ids)
            for eval_set in group:
                warn_unjudgeable(eval_set, known)
                started = time.perf_counter()
                query_vectors = encode(
                    model,
                    list(eval_set.queries.values()),
                    batch_size,
                    device,
                    precision,
                    desc=f"encode {eval_set.name} queries",
                    show_progress=show_progress,
                )
                query_seconds = time.perf_counter() - started
                metrics, result = evaluate_on_index(
                    eval_set, index, docs.doc_ids, tie_ranks, query_vectors, top_k, show_progress
                )
                metrics.update(
                    encode_seconds=docs.encode_seconds + query_seconds,
                    index_seconds=index_seconds,
                    doc_vectors_cached=docs.cached,
                    recall_min_rel=eval_set.recall_min_rel,
                )
                results[eval_set.name] = metrics
                if output_dir and write_runs:
                    retrieval.write_trec_run(
                        output_dir / "runs" / f"{eval_set.name}.trec",
                        result,
                        list(eval_set.queries),
                        docs.doc_ids,
                        run_name,
                    )
                log(
                    f"{eval_set.name}: nDCG@10 {metrics['ndcg@10']:.4f}  MRR@10 {metrics['mrr@10']:.4f}  "
                    f"R@1k {metrics['recall@1000']:.4f}  FLOPS {metrics['flops']:.3f}"
                )
            del index, known
    finally:
        if temporary:
            temporary.cleanup()
        model.to(original_device).train(saved_state[0])
        model.max_seq_length = saved_state[1]
    if rank != 0:
        return None

    beir = {}
    for eval_set in sets:
        if eval_set.beir_group:
            beir.setdefault(eval_set.beir_group, []).append(results[eval_set.name]["ndcg@10"])
    if beir:
        results["beir-mean"] = {
            "ndcg@10": float(np.mean([np.mean(v) for v in beir.values()])),
            "datasets": sorted(beir),
        }
    if output_dir:
        (output_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    return results


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def results_table(results: dict, model_name: str) -> str:
    """The seed's results table (metrics x 100, FLOPS as is) and one line per data set."""

    def cell(name, metric):
        value = results.get(name, {}).get(metric)
        return "" if value is None else f"{100 * value:.1f}"

    headers = ["model"] + [title for _, _, title in TABLE_COLUMNS] + ["FLOPS"]
    flops = results.get("msmarco-dev", {}).get("flops")
    row = [model_name] + [cell(name, metric) for name, metric, _ in TABLE_COLUMNS]
    row.append("" if flops is None else f"{flops:.2f}")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers), "| " + " | ".join(row) + " |", ""]
    detail = [
        "data set",
        "nDCG@10",
        "MRR@10",
        "R@1k",
        "FLOPS",
        "q dims",
        "d dims",
        "queries",
        "docs",
        "encode s",
        "search s",
    ]
    lines += ["| " + " | ".join(detail) + " |", "|" + "---|" * len(detail)]
    for name, m in results.items():
        if name == "beir-mean":
            lines.append(f"| BEIR mean ({len(m['datasets'])} sets) | {100 * m['ndcg@10']:.1f} |" + " |" * 9)
            continue
        lines.append(
            f"| {name} | {100 * m['ndcg@10']:.1f} | {100 * m['mrr@10']:.1f} | {100 * m['recall@1000']:.1f}"
            + (" (rel>=2)" if m.get("recall_min_rel", 1) > 1 else "")
            + f" | {m['flops']:.2f} | {m['query_active_dims']:.1f} | {m['doc_active_dims']:.1f} | "
            f"{m['num_queries']} | {m['num_docs']} | {m['encode_seconds']:.1f} | {m['search_seconds']:.2f} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="model directory saved by the training scripts, or a SPLADE checkpoint")
    parser.add_argument("--msmarco", action="store_true", help="MS MARCO dev small (MRR@10, R@1k)")
    parser.add_argument(
        "--trec-dl",
        "--trec_dl",
        nargs="*",
        type=int,
        choices=(2019, 2020),
        metavar="YEAR",
        help="TREC DL passage years (no year: 2019 and 2020)",
    )
    parser.add_argument(
        "--beir",
        nargs="+",
        default=[],
        metavar="NAME_OR_DIR",
        help="BEIR set names (downloaded), directories in BEIR layout or .zip files",
    )
    parser.add_argument("--beir_split", default="test", help="qrels file of the BEIR sets (qrels/<split>.tsv)")
    parser.add_argument(
        "--keep_self_hits", action="store_true", help="BEIR: keep a hit whose id equals the query id (BEIR drops it)"
    )
    parser.add_argument("--data_dir", default="msmarco-data", help="MS MARCO / TREC DL files (downloaded if missing)")
    parser.add_argument("--no_download", action="store_true", help="fail instead of downloading missing files")
    parser.add_argument("--output", help="where metrics.json and runs/ go (default: output/eval-<model name>)")
    parser.add_argument(
        "--cache_dir",
        default=str(DEFAULT_CACHE_DIR),
        help="document-vector cache and downloaded BEIR sets (env SPLADE_CACHE_DIR)",
    )
    parser.add_argument("--no_cache", action="store_true", help="do not keep document vectors")
    parser.add_argument("--max_seq_length", type=int, help="truncation in tokens (default: the model's)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="auto",
        help="encoding precision; auto = bf16 on a GPU, fp32 on a CPU",
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: the GPU if there is one)")
    parser.add_argument("--top_k", type=int, default=TOP_K, help="hits per query in runs and metrics")
    parser.add_argument("--run_name", help="last column of the run files (default: the model's folder name)")
    parser.add_argument("--no_runs", action="store_true", help="do not write TREC run files")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    datasets = ["msmarco"] if args.msmarco else []
    if args.trec_dl is not None:
        datasets += [f"trec-dl-{year}" for year in (args.trec_dl or [2019, 2020])]
    datasets += [f"beir:{spec}" for spec in args.beir]
    model_name = Path(args.model.rstrip("/")).name
    output = Path(args.output or Path("output") / f"eval-{model_name}")
    rank, world_size = distributed_rank()
    try:
        if not datasets:
            raise InputError("nothing to evaluate: give --msmarco, --trec-dl and/or --beir")
        if world_size > 1 and torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        results = evaluate_model(
            args.model,
            datasets,
            output,
            data_dir=args.data_dir,
            cache_dir=None if args.no_cache else args.cache_dir,
            max_seq_length=args.max_seq_length,
            batch_size=args.batch_size,
            precision=args.precision,
            device=args.device,
            top_k=args.top_k,
            beir_split=args.beir_split,
            download=not args.no_download,
            write_runs=not args.no_runs,
            run_name=args.run_name,
            keep_self_hits=args.keep_self_hits,
            distributed=world_size > 1,
        )
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if results is not None:
        print(results_table(results, model_name))
        print(f"\nmetrics: {output / 'metrics.json'}" + ("" if args.no_runs else f"   runs: {output / 'runs'}/"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
