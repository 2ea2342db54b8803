"""Download the MS MARCO files that training and evaluation read.

    python -m data.download train --data_dir msmarco-data   # collection, training queries, hard negatives, CE scores
    python -m data.download eval  --data_dir msmarco-data   # dev-small and TREC DL 2019/2020 queries + qrels
    python -m data.download all   --data_dir msmarco-data

Every file is fetched into `<name>.part` and renamed only once it has been checked, so a file
without `.part` is complete. An interrupted download resumes from the `.part` file (HTTP Range).
Nothing is downloaded at import time.
"""

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import http.client
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from errors import UserError

MSMARCO = "https://msmarco.z22.web.core.windows.net/msmarcoranking/"
HARD_NEGATIVES = "https://huggingface.co/datasets/sentence-transformers/msmarco-hard-negatives/resolve/main/"
TREC_DL = "https://trec.nist.gov/data/deep/"

# The files the training scripts read (SPEC.md, "Data"), by role.
COLLECTION = "collection.tsv"
TRAIN_QUERIES = "queries.train.tsv"
HARD_NEGATIVES_FILE = "msmarco-hard-negatives.jsonl.gz"
CE_SCORES_FILE = "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"
TRAIN_FILES = (COLLECTION, TRAIN_QUERIES, HARD_NEGATIVES_FILE, CE_SCORES_FILE)
# The files the evaluation reads.
EVAL_FILES = (
    "queries.dev.small.tsv",
    "qrels.dev.small.tsv",
    "msmarco-test2019-queries.tsv",
    "2019qrels-pass.txt",
    "msmarco-test2020-queries.tsv",
    "2020qrels-pass.txt",
)


@dataclass(frozen=True)
class Source:
    url: str
    size: int | None  # exact size in bytes; None = not published, checked against Content-Length only
    md5: str | None


# Sizes and md5 sums: for queries.tar.gz and the TREC DL files, those that ir_datasets publishes
# (allenai/ir_datasets, ir_datasets/etc/downloads.json); qrels.dev.small.tsv: the original file.
# collection.tar.gz (about 1 GB), the hard negatives and the CE scores have no published exact size:
# they are checked against the server's Content-Length, read to the end (gzip/tar) and, for the
# collection, counted (8,841,823 lines). We do not write down sizes we have not seen.
SOURCES = {
    "collection.tar.gz": Source(MSMARCO + "collection.tar.gz", None, None),
    "queries.tar.gz": Source(MSMARCO + "queries.tar.gz", 18_882_551, "c177b2795d5f2dcc524cf00fcd973be1"),
    HARD_NEGATIVES_FILE: Source(HARD_NEGATIVES + HARD_NEGATIVES_FILE, None, None),
    CE_SCORES_FILE: Source(HARD_NEGATIVES + CE_SCORES_FILE, None, None),
    "qrels.dev.small.tsv": Source(MSMARCO + "qrels.dev.small.tsv", 143_300, "38a80559a561707ac2ec0f150ecd1e8a"),
    "msmarco-test2019-queries.tsv.gz": Source(
        MSMARCO + "msmarco-test2019-queries.tsv.gz", 4_276, "eda71eccbe4d251af83150abe065368c"
    ),
    "2019qrels-pass.txt": Source(TREC_DL + "2019qrels-pass.txt", 187_092, "2f4be390198da108f6845c822e5ada14"),
    "msmarco-test2020-queries.tsv.gz": Source(
        MSMARCO + "msmarco-test2020-queries.tsv.gz", 4_131, "00a406fb0d14ed3752d70d1e4eb98600"
    ),
    "2020qrels-pass.txt": Source(TREC_DL + "2020qrels-pass.txt", 218_617, "0355ccee7509ac0463e8278186cdd8d1"),
}

# Line counts of extracted files: proof that extraction ran to the end. Only counts we are sure of.
LINE_COUNTS = {
    COLLECTION: 8_841_823,
    TRAIN_QUERIES: 808_731,
    "queries.dev.tsv": 101_093,
    "queries.dev.small.tsv": 6_980,
    "qrels.dev.small.tsv": 7_437,
}

CHUNK = 1 << 20


class DownloadError(UserError, RuntimeError):
    """A download that failed; the message says what to do (resume, or fetch the file by other means)."""


def download_command(data_dir, what="train"):
    return f"python -m data.download {what} --data_dir {data_dir}"


def download_file(url, dest, expected_size=None, expected_md5=None, timeout=60):
    """Fetch url into dest, resuming dest.part; check size, md5 and (for .gz) that it reads to the end."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0

    headers = {"User-Agent": "splade-reproduction/1.0"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        # 416: the .part file already holds the whole file (a crash between download and rename).
        if not (err.code == 416 and start):
            raise DownloadError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
        response = None
    except urllib.error.URLError as err:
        raise DownloadError(f"cannot reach {url} ({err.reason}); without internet, put the file at {dest}") from err

    if response is not None:
        with response:
            if start and response.status != 206:  # the server ignored Range: start again
                start = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else expected_size
            if expected_size is not None and total is not None and total != expected_size:
                raise DownloadError(
                    f"{url}: the server announces {total:,} bytes, expected {expected_size:,}; "
                    f"the file changed upstream or the download is corrupt ({part} kept)"
                )
            with (
                open(part, "ab" if start else "wb") as out,
                tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar,
            ):
                try:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                except (http.client.HTTPException, OSError) as err:  # connection lost: keep .part to resume
                    raise DownloadError(
                        f"{url}: download interrupted at {out.tell():,} bytes ({err!r}); "
                        f"run the same command again to resume from {part}"
                    ) from err
            if total is not None and part.stat().st_size != total:
                raise DownloadError(
                    f"{url}: got {part.stat().st_size:,} of {total:,} bytes; run the same command again to resume"
                )

    size = part.stat().st_size
    if expected_size is not None and size < expected_size:
        raise DownloadError(f"{part}: {size:,} of {expected_size:,} bytes; run the same command again to resume")
    try:  # a .part that is complete but wrong cannot be mended by resuming: delete it
        if expected_size is not None and size != expected_size:
            raise DownloadError(f"{part}: {size:,} bytes, expected {expected_size:,}")
        if expected_md5 is not None and (md5 := file_md5(part)) != expected_md5:
            raise DownloadError(f"{part}: md5 {md5}, expected {expected_md5}")
        if dest.name.endswith(".gz"):
            check_gzip(part, dest.name)
    except RuntimeError as err:
        part.unlink()
        raise DownloadError(f"{err}; deleted it, run the same command again to download it anew") from None
    os.replace(part, dest)
    return dest


def file_md5(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_gzip(path, name=None):
    """Decompress to the end: a truncated or corrupt gzip raises here, not halfway through training."""
    name = name or Path(path).name
    with (
        gzip.open(path, "rb") as f,
        tqdm(total=Path(path).stat().st_size, unit="B", unit_scale=True, desc=f"checking {name}") as bar,
    ):
        raw = f.fileobj  # the compressed stream: its position drives the bar
        try:
            while f.read(CHUNK):
                bar.update(raw.tell() - bar.n)
        except (EOFError, OSError, zlib.error) as err:
            raise DownloadError(f"{path}: not a complete gzip file ({err})") from err


def count_lines(path):
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(CHUNK), b""))


def check_line_count(path, name=None):
    """Raise unless the file has the known line count of `name` (default: its own name), if one is known."""
    name = name or Path(path).name
    expected = LINE_COUNTS.get(name)
    if expected is not None:
        found = count_lines(path)
        if found != expected:
            raise DownloadError(f"{path}: {found:,} lines, expected {expected:,} for {name}")


def extract_from_tar(archive, members, data_dir):
    """Extract the named members (by base name) of a .tar.gz into data_dir, each via a .part file.

    Members are written under their base name only: a hostile path in the archive cannot escape data_dir.
    """
    wanted = {m: Path(data_dir) / m for m in members if not (Path(data_dir) / m).exists()}
    if not wanted:
        return
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = Path(member.name).name
                if name not in wanted or not member.isfile():
                    continue
                dest = wanted.pop(name)
                part = dest.with_name(dest.name + ".part")
                with (
                    tar.extractfile(member) as src,
                    open(part, "wb") as out,
                    tqdm(total=member.size, unit="B", unit_scale=True, desc=f"extracting {name}") as bar,
                ):
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                check_line_count(part, name)
                os.replace(part, dest)
    except (EOFError, tarfile.TarError, OSError, zlib.error) as err:
        raise DownloadError(f"{archive}: cannot be read to the end ({err}); delete it and download again") from err
    if wanted:
        raise DownloadError(f"{archive} does not contain {sorted(wanted)}")


def gunzip(src, dest):
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    with gzip.open(src, "rb") as f, open(part, "wb") as out:
        shutil.copyfileobj(f, out, CHUNK)
    os.replace(part, dest)


def fetch(name, data_dir):
    source = SOURCES[name]
    return download_file(source.url, Path(data_dir) / name, source.size, source.md5)


# One function per data set.


def download_collection(data_dir):
    """collection.tsv (8,841,823 passages, `pid \\t passage`) from MS MARCO's collection.tar.gz."""
    dest = Path(data_dir) / COLLECTION
    if not dest.exists():
        extract_from_tar(fetch("collection.tar.gz", data_dir), [COLLECTION], data_dir)
    return dest


def download_queries(data_dir):
    """queries.train.tsv, queries.dev.tsv, queries.eval.tsv (`qid \\t query`) from queries.tar.gz."""
    names = ["queries.train.tsv", "queries.dev.tsv", "queries.eval.tsv"]
    if not all((Path(data_dir) / n).exists() for n in names):
        extract_from_tar(fetch("queries.tar.gz", data_dir), names, data_dir)
    return Path(data_dir) / TRAIN_QUERIES


def download_hard_negatives(data_dir):
    """msmarco-hard-negatives.jsonl.gz (sentence-transformers/msmarco-hard-negatives on Hugging Face)."""
    return fetch(HARD_NEGATIVES_FILE, data_dir)


def download_ce_scores(data_dir):
    """cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz (same dataset). Loaded only by data.ce_scores."""
    return fetch(CE_SCORES_FILE, data_dir)


def download_dev_small(data_dir):
    """qrels.dev.small.tsv (`qid 0 pid 1`) and queries.dev.small.tsv (6,980 queries).

    MS MARCO publishes queries.dev.small.tsv only inside the 1 GB collectionandqueries.tar.gz; it is
    the queries of queries.dev.tsv (queries.tar.gz) that qrels.dev.small.tsv judges, in file order,
    so we derive it from there instead of downloading the collection a second time.
    """
    data_dir = Path(data_dir)
    qrels = fetch("qrels.dev.small.tsv", data_dir)
    check_line_count(qrels)
    dest = data_dir / "queries.dev.small.tsv"
    if not dest.exists():
        download_queries(data_dir)
        with open(qrels, "rb") as f:
            judged = {line.split(b"\t", 1)[0] for line in f if line.strip()}
        part = dest.with_name(dest.name + ".part")
        with open(data_dir / "queries.dev.tsv", "rb") as src, open(part, "wb") as out:
            out.writelines(line for line in src if line.split(b"\t", 1)[0] in judged)
        check_line_count(part, dest.name)
        os.replace(part, dest)
    return dest, qrels


def download_trec_dl(data_dir, year):
    """TREC DL {2019,2020} passage: msmarco-test{year}-queries.tsv (200 queries) and {year}qrels-pass.txt."""
    data_dir = Path(data_dir)
    queries = data_dir / f"msmarco-test{year}-queries.tsv"
    if not queries.exists():
        gunzip(fetch(f"msmarco-test{year}-queries.tsv.gz", data_dir), queries)
    return queries, fetch(f"{year}qrels-pass.txt", data_dir)


def download_train(data_dir):
    download_collection(data_dir)
    download_queries(data_dir)
    download_hard_negatives(data_dir)
    download_ce_scores(data_dir)


def download_eval(data_dir):
    download_dev_small(data_dir)
    download_trec_dl(data_dir, 2019)
    download_trec_dl(data_dir, 2020)


@contextlib.contextmanager
def file_lock(path):
    """An exclusive lock on `path` (created if needed), so that several processes (one per GPU under
    torchrun) do not download, extract or unpickle the same file at once: one works, the others wait."""
    try:
        f = open(path, "a")
    except OSError:  # a read-only folder: nothing will be written there either, so no lock is needed
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_file_paths(data_dir, download):
    """Paths of the four training files; missing ones are downloaded, or named in a FileNotFoundError."""
    data_dir = Path(data_dir)
    paths = {name: data_dir / name for name in TRAIN_FILES}
    missing = [name for name, path in paths.items() if not path.exists()]
    if missing and not download:
        raise FileNotFoundError(
            f"missing in {data_dir}: {', '.join(missing)}. Download with: {download_command(data_dir)}"
        )
    if missing:
        data_dir.mkdir(parents=True, exist_ok=True)
        with file_lock(data_dir / ".download.lock"):
            download_train(data_dir)  # skips what another process finished while we waited
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["train", "eval", "all"])
    parser.add_argument("--data_dir", default="msmarco-data")
    args = parser.parse_args(argv)
    if args.what in ("train", "all"):
        download_train(args.data_dir)
    if args.what in ("eval", "all"):
        download_eval(args.data_dir)
    print(f"{args.what} files are ready in {args.data_dir}")


if __name__ == "__main__":
    main()
