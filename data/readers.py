"""Streaming readers for the MS MARCO training files. Errors name the file, the line and the problem."""

import gzip
import json
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from errors import UserError

PROGRESS_EVERY = 10_000  # lines between progress-bar updates: tqdm per line would cost seconds on 8.8M lines
MAX_ID = 2**31 - 1  # MS MARCO ids are < 9M; ids are kept in int32 arrays


class DataError(UserError, ValueError):
    """A data file is malformed. The message says which file, which line and what is wrong."""


def iter_id_text(path, desc=None):
    """Yield (id, text_bytes) from a `id \\t text` file (collection.tsv, queries.*.tsv).

    Bytes, not str: the collection is 3 GB and we keep only the passages we need, decoded when used.
    """
    path = Path(path)
    with (
        open(path, "rb") as f,
        tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=desc or f"reading {path.name}") as bar,
    ):
        done = 0
        for lineno, line in enumerate(f, 1):
            key, tab, text = line.partition(b"\t")
            if not tab:
                if not line.strip():
                    continue  # a blank line (e.g. at the end) carries nothing
                raise DataError(f"{path}:{lineno}: expected `id<TAB>text`, found {line[:80]!r}")
            try:
                id_ = int(key)
            except ValueError:
                raise DataError(f"{path}:{lineno}: id {key[:40]!r} is not an integer") from None
            if not 0 <= id_ <= MAX_ID:
                raise DataError(f"{path}:{lineno}: id {id_} is out of range [0, {MAX_ID}]")
            yield id_, text.rstrip(b"\r\n")
            done += len(line)
            if lineno % PROGRESS_EVERY == 0:
                bar.update(done - bar.n)
        bar.update(done - bar.n)


def read_queries(path):
    """{qid: query bytes} for a queries file (808,731 training queries take about 120 MB)."""
    return dict(iter_id_text(path))


def _check_ids(path, lineno, what, ids):
    if not isinstance(ids, list):
        raise DataError(f"{path}:{lineno}: {what} must be a list of passage ids, found {type(ids).__name__}")
    # set(map(type)) and min/max run in C: this check costs little on 500k lines of ~600 ids.
    if ids and (set(map(type, ids)) != {int} or min(ids) < 0 or max(ids) > MAX_ID):
        bad = next(p for p in ids if type(p) is not int or not 0 <= p <= MAX_ID)
        raise DataError(f"{path}:{lineno}: {what} holds {bad!r}, not a passage id (int in [0, {MAX_ID}])")
    return ids


def iter_hard_negatives(path):
    """Yield (lineno, qid, pos, neg) from msmarco-hard-negatives.jsonl.gz.

    Each line is `{"qid": int, "pos": [pid, ...], "neg": {system: [pid, ...]}}`. A malformed line, a
    truncated or corrupt gzip raise DataError with the file and line number.
    """
    path = Path(path)
    lineno = 0
    try:
        with (
            open(path, "rb") as raw,
            gzip.GzipFile(fileobj=raw) as f,
            tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}") as bar,
        ):
            for lineno, line in enumerate(f, 1):
                if lineno % 1000 == 0:
                    bar.update(raw.tell() - bar.n)  # compressed bytes consumed
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({err})") from None
                if not isinstance(data, dict) or not {"qid", "pos", "neg"} <= data.keys():
                    raise DataError(f'{path}:{lineno}: expected an object with "qid", "pos", "neg"')
                qid, pos, neg = data["qid"], data["pos"], data["neg"]
                if type(qid) is not int or not 0 <= qid <= MAX_ID:
                    raise DataError(f"{path}:{lineno}: qid {qid!r} is not an int in [0, {MAX_ID}]")
                _check_ids(path, lineno, '"pos"', pos)
                if not isinstance(neg, dict):
                    raise DataError(f'{path}:{lineno}: "neg" must map system names to lists of ids')
                for system, ids in neg.items():
                    _check_ids(path, lineno, f'"neg"["{system}"]', ids)
                yield lineno, qid, pos, neg
            bar.update(raw.tell() - bar.n)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(
            f"{path}: truncated or corrupt gzip after line {lineno} ({err}); delete it and download it again"
        ) from None
