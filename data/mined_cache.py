"""One mined training set per machine: the first process mines and saves it, every process maps it.

    <data_dir>/mined-cache/<script>-<key>/   the TrainingSet's arrays as .npy files, and report.json

key: a hash of the format version, the script, the mining parameters and each training file's name, size,
mtime and first and last MiB. A changed file or parameter gives a new key, hence a new folder (the old ones stay
until deleted: `rm -r <data_dir>/mined-cache`). Under torchrun the first process to take the lock mines; the
others wait on it, then map what it wrote. The folder appears in one rename, complete or not at all.
"""

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from data.download import file_lock
from data.training_set import TrainingSet

# Bump when the mining code or the saved layout changes what a cache holds: older folders are then ignored.
FORMAT = 1
FINGERPRINT_BYTES = 1 << 20


def cache_folder(data_dir, script, params, paths):
    """The folder of the training set mined by `script` with `params` from the files `paths`."""
    key = {"format": FORMAT, "script": script, "params": params, "files": [_fingerprint(p) for p in paths]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(data_dir) / "mined-cache" / f"{script}-{digest}"


def _fingerprint(path):
    path = Path(path)
    st = path.stat()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(FINGERPRINT_BYTES))
        if st.st_size > 2 * FINGERPRINT_BYTES:
            f.seek(-FINGERPRINT_BYTES, os.SEEK_END)
        h.update(f.read())
    return [path.name, st.st_size, st.st_mtime_ns, h.hexdigest()]


def load_or_mine(folder, mine):
    """The TrainingSet in `folder` (mapped); on a miss, mine() builds it and it is saved there first.

    A data folder where nothing can be written: mine() in memory, with a warning (each process mines its own).
    """
    if not _complete(folder):
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            print(f"warning: cannot create {folder.parent} ({err}); mining in memory, without a cache")
            return mine()
        with file_lock(folder.parent / f"{folder.name}.lock"):
            if not _complete(folder):
                return _mine_and_save(folder, mine)
    start = time.time()
    ts = TrainingSet.load(folder)
    ts.report["cache"] = {"hit": True, "folder": str(folder), "size_mb": _size_mb(folder)}
    ts.report["cache"]["seconds"] = round(time.time() - start, 2)
    return ts


def _complete(folder):
    return (folder / "report.json").is_file()


def _mine_and_save(folder, mine):
    print(f"mined training set: no cache in {folder}, mining")
    ts = mine()
    part = folder.with_name(f"{folder.name}.part-{os.getpid()}")
    for stale in folder.parent.glob(f"{folder.name}.part-*"):  # left by a killed run (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        part.mkdir()
        ts.save(part)
        os.replace(part, folder)
    except OSError as err:
        shutil.rmtree(part, ignore_errors=True)
        print(f"warning: cannot write the mined-set cache {folder} ({err}); the next run mines again")
        return ts
    report = ts.report
    del ts  # map what was written: the page cache then holds the one copy that every process shares
    ts = TrainingSet.load(folder)
    ts.report = report
    ts.report["cache"] = {"hit": False, "folder": str(folder), "size_mb": _size_mb(folder)}
    return ts


def _size_mb(folder):
    return round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20)
