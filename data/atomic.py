"""Write a file so that it is either complete or absent: a crash never leaves a half-written file under its name.

Several processes may write the same file at once (every torchrun rank writes a cache's key.json): each writes its
own temporary file, and each rename is atomic, so a reader sees one complete version, the last one renamed.
"""

import contextlib
import os
import re
import secrets
import socket
from pathlib import Path

# Host and process in every temporary name: a leftover of a killed process on this host can be recognised as such.
HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def part_name(path: Path, pid: int, token: str) -> str:
    """`name.part-HOST-PID-TOKEN.ext`: numpy and scipy keep their extension."""
    return f"{path.stem}.part-{HOST}-{pid}-{token}{path.suffix}"


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`, unique to this process and this call. On success it replaces `path` in
    one rename; on an exception it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    part = path.with_name(part_name(path, os.getpid(), secrets.token_hex(4)))
    try:
        yield part
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, path)


def remove_leftovers(path: Path) -> None:
    """Delete the temporary files of `path` left by processes of this host that no longer run (killed mid-write):
    an extracted collection.tsv is 3 GB, and a name per process would otherwise leave one per kill."""
    prefix, suffix = f"{path.stem}.part-{HOST}-", path.suffix
    for entry in os.scandir(path.parent):
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not process_runs(int(pid)):
            Path(entry.path).unlink(missing_ok=True)


def process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, under another user
        return True
    return True


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as part:
        Path(part).write_text(text)
