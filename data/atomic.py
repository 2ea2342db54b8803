"""Write a file so that it is either complete or absent: a crash never leaves a half-written file under its name."""

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path, keep_partial: bool = False):
    """Yield a temporary path beside `path` (`name.part.ext`, so numpy and scipy keep their extension).

    On success it replaces `path` in one rename; on an exception it is deleted, unless keep_partial (a download
    that resumes from it).
    """
    path = Path(path)
    part = path.with_name(f"{path.stem}.part{path.suffix}" if path.suffix else f"{path.name}.part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield part
    except BaseException:
        if not keep_partial:
            part.unlink(missing_ok=True)
        raise
    os.replace(part, path)


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as part:
        Path(part).write_text(text)
