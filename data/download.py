"""Download the MS MARCO files that training and evaluation read.

    python -m data.download train --data_dir msmarco-data   # collection, training queries, hard negatives, CE scores
    python -m data.download eval  --data_dir msmarco-data   # dev-small and TREC DL 2019/2020 queries + qrels
    python -m data.download all   --data_dir msmarco-data

MS MARCO, TREC DL and BEIR files go through data.fetch (resumable `.part` files, size / md5 / gzip checks);
archives are extracted member by member, each file appearing only once complete and its lines counted.
The two Hugging Face files (hard negatives, cross-encoder scores) go through huggingface_hub's hf_hub_download,
which resumes, checks sizes and ETags, and honours HF_ENDPOINT (mirrors) and HF_TOKEN.
Nothing is downloaded at import time. Every failure is a DownloadError whose message says what to try.
"""

import argparse
import contextlib
import gzip
import os
import shutil
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from data.atomic import atomic_path
from data.fetch import CHUNK, DownloadError, count_lines, download_file
from errors import UserError, main_exits_2_on_user_error

MSMARCO = "https://msmarco.z22.web.core.windows.net/msmarcoranking/"
TREC_DL = "https://trec.nist.gov/data/deep/"
HF_DATASET = "sentence-transformers/msmarco-hard-negatives"  # a Hugging Face dataset repository
BEIR_URL = "https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip"
# MS MARCO is served by Azure Blob Storage. Resuming sends `Range: bytes=N-`, which Azure accepts only from API
# version 2011-08-18 on ("Specifying the range header for Blob service operations"); a request without a version
# header may be answered by an older one. So every MS MARCO request names a version.
MSMARCO_HEADERS = {"X-Ms-Version": "2019-12-12"}

# The files the training scripts read, by role.
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
# collection.tar.gz (about 1 GB) has no published exact size: it is checked against the server's
# Content-Length, read to the end and counted (8,841,823 lines). We do not write down sizes we have not seen.
# The Hugging Face files are checked by huggingface_hub against the Hub's size and ETag.
SOURCES = {
    "collection.tar.gz": Source(MSMARCO + "collection.tar.gz", None, None),
    "queries.tar.gz": Source(MSMARCO + "queries.tar.gz", 18_882_551, "c177b2795d5f2dcc524cf00fcd973be1"),
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


class MissingDataError(UserError, FileNotFoundError):
    """A data file is missing and downloads are off; the message gives the command that fetches it."""


def download_command(data_dir, what="train"):
    return f"python -m data.download {what} --data_dir {data_dir}"


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
                with atomic_path(wanted.pop(name)) as part:
                    with (
                        tar.extractfile(member) as src,
                        open(part, "wb") as out,
                        tqdm(total=member.size, unit="B", unit_scale=True, desc=f"extracting {name}") as bar,
                    ):
                        while chunk := src.read(CHUNK):
                            out.write(chunk)
                            bar.update(len(chunk))
                    check_line_count(part, name)
    except (EOFError, tarfile.TarError, OSError, zlib.error) as err:
        raise DownloadError(f"{archive}: cannot be read to the end ({err}); delete it and download again") from err
    if wanted:
        raise DownloadError(f"{archive} does not contain {sorted(wanted)}")


def gunzip(src, dest):
    try:
        with atomic_path(dest) as part, gzip.open(src, "rb") as f, open(part, "wb") as out:
            shutil.copyfileobj(f, out, CHUNK)
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DownloadError(f"{src}: not a complete gzip file ({err}); delete it and download again") from err


def fetch(name, data_dir):
    source = SOURCES[name]
    headers = MSMARCO_HEADERS if source.url.startswith(MSMARCO) else None
    return download_file(source.url, Path(data_dir) / name, source.size, source.md5, headers=headers)


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


def fetch_from_hub(name, data_dir):
    """A file of the Hugging Face dataset HF_DATASET, into data_dir/name (huggingface_hub keeps its
    resume state and metadata under data_dir/.cache/huggingface)."""
    dest = Path(data_dir) / name
    if dest.exists():
        return dest  # no request at all: training works offline once the files are there
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=HF_DATASET, repo_type="dataset", filename=name, local_dir=data_dir))
    except (OSError, EntryNotFoundError) as err:  # HTTP errors, no connection, disk full: all user-fixable
        raise DownloadError(
            f"download of {name} from the Hugging Face dataset {HF_DATASET} failed ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); run the same command again to resume, set HF_ENDPOINT "
            f"for a mirror, or put the file at {dest}"
        ) from err


def download_hard_negatives(data_dir):
    """msmarco-hard-negatives.jsonl.gz (sentence-transformers/msmarco-hard-negatives on Hugging Face)."""
    return fetch_from_hub(HARD_NEGATIVES_FILE, data_dir)


def download_ce_scores(data_dir):
    """cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz (same dataset). Loaded only by data.ce_scores."""
    return fetch_from_hub(CE_SCORES_FILE, data_dir)


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
        with atomic_path(dest) as part:
            with open(data_dir / "queries.dev.tsv", "rb") as src, open(part, "wb") as out:
                out.writelines(line for line in src if line.split(b"\t", 1)[0] in judged)
            check_line_count(part, dest.name)
    return dest, qrels


def download_trec_dl(data_dir, year):
    """TREC DL {2019,2020} passage: msmarco-test{year}-queries.tsv (200 queries) and {year}qrels-pass.txt."""
    data_dir = Path(data_dir)
    queries = data_dir / f"msmarco-test{year}-queries.tsv"
    if not queries.exists():
        gunzip(fetch(f"msmarco-test{year}-queries.tsv.gz", data_dir), queries)
    return queries, fetch(f"{year}qrels-pass.txt", data_dir)


def download_beir(name, root, url_template=None):
    """A BEIR set's zip (once, resumable) unpacked into root/name; the zip is deleted afterwards. Under the lock of
    root: several processes (torchrun ranks) asking for one set download and unpack it once."""
    target = Path(root) / name
    if target.is_dir():
        return target
    url = (url_template or BEIR_URL).format(name=name)
    Path(root).mkdir(parents=True, exist_ok=True)
    with file_lock(Path(root) / ".download.lock"):
        if target.is_dir():  # another process finished it while we waited
            return target
        try:
            archive = download_file(url, Path(root) / f"{name}.zip")
        except DownloadError as err:
            raise DownloadError(f"BEIR set {name!r}: {err}; or pass a local folder in BEIR layout instead") from err
        unpack_beir_zip(archive, target)
        archive.unlink()
    return target


def unpack_beir_zip(archive, target):
    """Unpack a BEIR zip (one top folder holding corpus/queries/qrels) into target, which appears only when
    complete (unpacked beside it, then renamed)."""
    target = Path(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(staging)  # zipfile drops absolute paths and '..' components
        tops = [p for p in staging.iterdir() if p.is_dir()]
        source = tops[0] if len(tops) == 1 and not (staging / "qrels").is_dir() else staging
        os.replace(source, target)
    except zipfile.BadZipFile as err:
        raise DownloadError(f"{archive}: not a valid zip file ({err}); delete it and try again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
    lock = FileLock(path)
    try:
        lock.acquire()
    except OSError:
        # A read-only folder: still one process at a time (each would walk the CE pickle, gigabytes, at once),
        # through a lock file in the temporary folder, named after the path, that every local process shares.
        fallback = Path(tempfile.gettempdir()) / f"splade-lock-{zlib.crc32(str(Path(path).resolve()).encode()):08x}"
        lock = FileLock(fallback)
        try:
            lock.acquire()
        except OSError as error:
            warnings.warn(
                f"cannot lock {path} nor {fallback} ({error}): several processes may read it at once", stacklevel=3
            )
            yield
            return
    try:
        yield
    finally:
        lock.release()


def train_file_paths(data_dir, download):
    """Paths of the four training files; missing ones are downloaded, or named in a MissingDataError."""
    data_dir = Path(data_dir)
    paths = {name: data_dir / name for name in TRAIN_FILES}
    missing = [name for name, path in paths.items() if not path.exists()]
    if missing and not download:
        raise MissingDataError(
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
    main_exits_2_on_user_error(main)
