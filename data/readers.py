"""One reader per file format, shared by training and evaluation. Errors name the file, the line and the problem.

iter_tsv_lines     `id TAB text` (collection.tsv, queries.*.tsv; gzip too): the one TSV parser
iter_id_text       training: (int id, text bytes) from a TSV, ids checked to fit int32
iter_jsonl         one JSON object per line (BEIR corpus/queries, the hard negatives; gzip too)
iter_hard_negatives  the checked records of msmarco-hard-negatives.jsonl.gz
read_corpus / read_query_texts / read_qrels   evaluation: TSV or BEIR JSONL, and TREC/BEIR qrels
"""

import gzip
import itertools
import zlib
from pathlib import Path

import orjson
from tqdm.auto import tqdm

from errors import UserError

PROGRESS_EVERY = 10_000  # lines between progress-bar updates: tqdm per line would cost seconds on 8.8M lines
MAX_ID = 2**31 - 1  # MS MARCO ids are < 9M; ids are kept in int32 arrays


class DataError(UserError, ValueError):
    """A data file is missing or malformed. The message says which file, which line and what is wrong."""


def open_binary(path):
    """The file's bytes, decompressed if its name ends in .gz; a missing file is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def iter_tsv_lines(path, desc=None):
    """Yield (lineno, key, text) as bytes from a `key \\t text` file, skipping blank lines.

    Bytes, not str: the collection is 3 GB and training keeps only the passages it needs, decoded when used.
    """
    path = Path(path)
    with (
        open_binary(path) as f,
        tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc or f"reading {path.name}") as bar,
    ):
        raw = getattr(f, "fileobj", f)  # for a gzip, the compressed stream: its position drives the bar
        for lineno, line in enumerate(f, 1):
            if lineno % PROGRESS_EVERY == 0:
                bar.update(raw.tell() - bar.n)
            key, tab, text = line.partition(b"\t")
            if not tab:
                if not line.strip():
                    continue  # a blank line (e.g. at the end) carries nothing
                raise DataError(f"{path}:{lineno}: expected `id<TAB>text`, found {line[:80]!r}")
            yield lineno, key, text.rstrip(b"\r\n")
        bar.update(raw.tell() - bar.n)


def iter_id_text(path, desc=None):
    """Yield (id, text_bytes) from a `id \\t text` file (collection.tsv, queries.*.tsv) with integer ids."""
    for lineno, key, text in iter_tsv_lines(path, desc):
        try:
            id_ = int(key)
        except ValueError:
            raise DataError(f"{path}:{lineno}: id {key[:40]!r} is not an integer") from None
        if not 0 <= id_ <= MAX_ID:
            raise DataError(f"{path}:{lineno}: id {id_} is out of range [0, {MAX_ID}]")
        yield id_, text


def read_queries(path):
    """{qid: query bytes} for a queries file (808,731 training queries take about 120 MB)."""
    return dict(iter_id_text(path))


def _check_ids(path, lineno, what, ids):
    if not isinstance(ids, list):
        raise DataError(f"{path}:{lineno}: {what} must be a list of passage ids, found {type(ids).__name__}")
    if not _all_ids(ids):
        bad = next(p for p in ids if type(p) is not int or not 0 <= p <= MAX_ID)
        raise DataError(f"{path}:{lineno}: {what} holds {bad!r}, not a passage id (int in [0, {MAX_ID}])")
    return ids


def _all_ids(ids):
    # set(map(type)) and min/max run in C: this check costs little on 800k lines of ~650 ids.
    return not ids or (set(map(type, ids)) == {int} and min(ids) >= 0 and max(ids) <= MAX_ID)


def _iter_lines(f, chunk=1 << 24):
    """The lines of a binary file, read in large chunks (a readline per line costs ~1 us more)."""
    rest = b""
    while block := f.read(chunk):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def iter_jsonl(path, desc=None):
    """Yield (lineno, object) for each non-blank line of a JSON-lines file (gzip too).

    A line that is not a JSON object, a truncated or corrupt gzip raise DataError with the file and line.
    """
    path = Path(path)
    lineno = 0
    try:
        with (
            open_binary(path) as f,
            tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc or f"reading {path.name}") as bar,
        ):
            raw = getattr(f, "fileobj", f)  # for a gzip, the compressed stream: its position drives the bar
            for lineno, line in enumerate(_iter_lines(f), 1):
                if lineno % 1000 == 0:
                    bar.update(raw.tell() - bar.n)
                if not line.strip():
                    continue
                try:
                    record = orjson.loads(line)  # ~5x faster than json on the hard negatives' long id lists
                except orjson.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({err})") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, found {type(record).__name__}")
                yield lineno, record
            bar.update(raw.tell() - bar.n)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(
            f"{path}: truncated or corrupt gzip after line {lineno} ({err}); delete it and download it again"
        ) from None


def iter_hard_negatives(path):
    """Yield (lineno, qid, pos, neg) from msmarco-hard-negatives.jsonl.gz.

    Each line is `{"qid": int, "pos": [pid, ...], "neg": {system: [pid, ...]}}`. A malformed line, a
    truncated or corrupt gzip raise DataError with the file and line number.
    """
    for lineno, data in iter_jsonl(path):
        if not {"qid", "pos", "neg"} <= data.keys():
            raise DataError(f'{path}:{lineno}: expected an object with "qid", "pos", "neg"')
        qid, pos, neg = data["qid"], data["pos"], data["neg"]
        if type(qid) is not int or not 0 <= qid <= MAX_ID:
            raise DataError(f"{path}:{lineno}: qid {qid!r} is not an int in [0, {MAX_ID}]")
        if not isinstance(neg, dict):
            raise DataError(f'{path}:{lineno}: "neg" must map system names to lists of ids')
        lists = [pos, *neg.values()]
        # One check over all of the line's ids; only a line that fails it is checked list by list, for the message.
        if not all(type(ids) is list for ids in lists) or not _all_ids(list(itertools.chain.from_iterable(lists))):
            _check_ids(path, lineno, '"pos"', pos)
            for system, ids in neg.items():
                _check_ids(path, lineno, f'"neg"["{system}"]', ids)
        yield lineno, qid, pos, neg


# Evaluation files: string ids (BEIR's are not numbers), str texts.


def _is_jsonl(path) -> bool:
    return ".jsonl" in Path(path).name


def _beir_records(path, what):
    """(lineno, id, record) of a BEIR corpus/queries file; every record needs an '_id'."""
    for lineno, record in iter_jsonl(path, desc=f"reading {Path(path).name}"):
        if "_id" not in record:
            raise DataError(f"{path}:{lineno}: a {what} record needs an '_id' field")
        yield lineno, str(record["_id"]), record


def _check_unique(path, ids, linenos):
    if len(set(ids)) != len(ids):
        seen = {}
        for doc_id, lineno in zip(ids, linenos):
            if doc_id in seen:
                raise DataError(f"{path}: document id {doc_id!r} appears twice (lines {seen[doc_id]} and {lineno})")
            seen[doc_id] = lineno


def read_corpus(path, keep=None) -> tuple[list[str], list[str]]:
    """Document ids and texts, in file order: `collection.tsv` (pid TAB passage) or a BEIR
    `corpus.jsonl[.gz]` (text = title + " " + text, as BEIR and sentence-transformers join them).

    keep: a function of the document's position; where it is false the text is "" (a torchrun rank keeps only
    the documents it encodes: 8.8M passages as str are ~4.7 GB)."""
    ids, texts, linenos = [], [], []
    if _is_jsonl(path):
        for lineno, doc_id, record in _beir_records(path, "document"):
            if "text" not in record:
                raise DataError(f"{path}:{lineno}: document {doc_id!r} has no 'text' field")
            keep_text = keep is None or keep(len(ids))
            ids.append(doc_id)
            texts.append(f"{record.get('title') or ''} {record['text'] or ''}".strip() if keep_text else "")
            linenos.append(lineno)
    else:
        for lineno, key, text in iter_tsv_lines(path):
            texts.append(text.decode("utf-8", "replace") if keep is None or keep(len(ids)) else "")
            ids.append(key.decode("utf-8", "replace"))
            linenos.append(lineno)
    if not ids:
        raise DataError(f"{path}: the corpus is empty, nothing to index")
    _check_unique(path, ids, linenos)
    return ids, texts


def read_query_texts(path) -> dict[str, str]:
    """{query id: text} from `qid TAB text` (MS MARCO / TREC) or BEIR `queries.jsonl[.gz]`."""
    if _is_jsonl(path):
        queries = {qid: str(record.get("text") or "") for _, qid, record in _beir_records(path, "query")}
    else:
        queries = {key.decode(): text.decode("utf-8", "replace") for _, key, text in iter_tsv_lines(path)}
    if not queries:
        raise DataError(f"{path}: no queries")
    return queries


def read_qrels(path) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Relevance judgments and the first line of each query id. Formats: TREC (`qid Q0 docid rel`,
    also MS MARCO's `qid 0 pid rel`, space or tab) and BEIR (`query-id TAB corpus-id TAB score` after
    a header line)."""
    qrels, first_line = {}, {}
    with open_binary(path) as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.decode("utf-8", "replace").split()
            if not fields or (lineno == 1 and fields[0] == "query-id"):
                continue
            if len(fields) not in (3, 4):
                raise DataError(
                    f"{path}:{lineno}: expected 'qid Q0 docid relevance' or "
                    f"'query-id corpus-id score', got {len(fields)} fields"
                )
            qid, doc_id, rel = fields[0], fields[-2], fields[-1]
            try:
                rel = int(rel)
            except ValueError:
                raise DataError(f"{path}:{lineno}: relevance {rel!r} is not an integer") from None
            qrels.setdefault(qid, {})[doc_id] = rel
            first_line.setdefault(qid, lineno)
    if not qrels:
        raise DataError(f"{path}: no judgments")
    return qrels, first_line
