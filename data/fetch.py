"""Resumable, checked HTTP downloads: the mechanics, with no knowledge of which files (data.download has the list).

A file is fetched into `<name>.part` and renamed only once checked (size, md5, gzip read to the end), so a
file without `.part` is complete; an interrupted download resumes from the `.part` file (HTTP Range).
"""

import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from errors import UserError

CHUNK = 1 << 20


class DownloadError(UserError, RuntimeError):
    """A download that failed; the message says what to do (resume, or fetch the file by other means)."""


def download_file(url, dest, expected_size=None, expected_md5=None, timeout=60, headers=None):
    """Fetch url into dest, resuming dest.part; check size, md5 and (for .gz) that it reads to the end.

    dest.part has one name for every process: callers hold a lock (data.download.file_lock) around this."""
    dest = Path(dest)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    response = open_from(url, start, dest, timeout, headers)
    if response is not None:
        with response:
            if start and response.status != 206:  # the server ignored Range: start again
                start = 0
            stream_to_part(response, url, part, start, expected_size, dest.name)
    check_part(part, dest.name, expected_size, expected_md5)
    os.replace(part, dest)
    return dest


def open_from(url, start, dest, timeout, extra_headers=None):
    """The response for url from byte `start` on; None when the .part already holds the whole file."""
    headers = {"User-Agent": "splade-reproduction/1.0", **(extra_headers or {})}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        # 416: the .part file already holds the whole file (a crash between download and rename).
        if err.code == 416 and start:
            return None
        raise DownloadError(f"download of {url} failed: HTTP {err.code} {err.reason}") from err
    except urllib.error.URLError as err:
        raise DownloadError(f"cannot reach {url} ({err.reason}); without internet, put the file at {dest}") from err


def stream_to_part(response, url, part, start, expected_size, name):
    """Append the response to the .part file; a lost connection keeps it, to resume from."""
    length = response.headers.get("Content-Length")
    total = start + int(length) if length is not None else expected_size
    if expected_size is not None and total is not None and total != expected_size:
        raise DownloadError(
            f"{url}: the server announces {total:,} bytes, expected {expected_size:,}; "
            f"the file changed upstream or the download is corrupt ({part} kept)"
        )
    with (
        open(part, "ab" if start else "wb") as out,
        tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=name) as bar,
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


def check_part(part, name, expected_size, expected_md5):
    """A short .part can be resumed; a complete but wrong one cannot, so it is deleted."""
    size = part.stat().st_size
    if expected_size is not None and size < expected_size:
        raise DownloadError(f"{part}: {size:,} of {expected_size:,} bytes; run the same command again to resume")
    try:
        if expected_size is not None and size != expected_size:
            raise DownloadError(f"{part}: {size:,} bytes, expected {expected_size:,}")
        if expected_md5 is not None and (md5 := file_md5(part)) != expected_md5:
            raise DownloadError(f"{part}: md5 {md5}, expected {expected_md5}")
        if name.endswith(".gz"):
            check_gzip(part, name)
    except DownloadError as err:
        part.unlink()
        raise DownloadError(f"{err}; deleted it, run the same command again to download it anew") from None


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
