"""Cross-encoder scores: a safe loader for the gzip pickle `{qid: {pid: float}}` and a compact cache.

The scores file comes from the internet, and unpickling runs whatever the pickle asks for (any
`__reduce__` can call os.system). RestrictedUnpickler refuses every global, so the only things a
pickle can build are the plain types that pickle encodes without a global (dict, list, str, int,
float, ...); the result is then checked to be exactly dict[int, dict[int, float]]. Anything else is
refused with UnsafePickleError before any of it is used; nothing in it is ever called.

Unpickling builds ~100 bytes of Python objects per score: 13 GB peak for 116 million synthetic scores
(python -m data.bench_memory), so ~18 GB for the real file's 160 million, once. What we derive (CSR
arrays, 8 bytes per score) is cached in an .npz next to the pickle, keyed by its size and mtime: later
runs load the arrays in seconds and never unpickle again.
"""

import gzip
import io
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from data.download import file_lock
from data.readers import MAX_ID, DataError


class UnsafePickleError(DataError):
    """The pickle asks for something other than plain dicts, ints and floats."""


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds plain containers and numbers only and refuses every global."""

    def find_class(self, module, name):
        # Every way a pickle can reach code (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) goes through here.
        raise UnsafePickleError(
            f"refusing to load global {module}.{name}: a CE scores pickle holds only dicts, ints and floats"
        )

    def persistent_load(self, pid):
        raise UnsafePickleError(f"refusing persistent id {pid!r}")


class _ProgressRaw(io.RawIOBase):
    """Raw stream over the decompressed pickle that moves a progress bar by the compressed bytes read.

    Wrapped in an io.BufferedReader: the C unpickler then reads through peek() in large chunks; a
    Python-level read() per opcode would make loading the real file ~30x slower.
    """

    def __init__(self, raw, gz, bar):
        self.raw, self.gz, self.bar = raw, gz, bar

    def readable(self):
        return True

    def readinto(self, buf):
        n = self.gz.readinto(buf)
        self.bar.update(self.raw.tell() - self.bar.n)
        return n


def safe_load_pickle_gz(path):
    """Unpickle a gzip pickle with RestrictedUnpickler. Truncation and corruption raise DataError."""
    path = Path(path)
    try:
        with (
            open(path, "rb") as raw,
            gzip.GzipFile(fileobj=raw) as gz,
            tqdm(
                total=path.stat().st_size, unit="B", unit_scale=True, desc=f"unpickling {path.name} (restricted)"
            ) as bar,
        ):
            return RestrictedUnpickler(io.BufferedReader(_ProgressRaw(raw, gz, bar), 1 << 20)).load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{path}: {err}") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: truncated or corrupt gzip ({err}); delete it and download it again") from None
    except (pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError) as err:
        raise DataError(f"{path}: not a valid pickle ({type(err).__name__}: {err})") from None


class CEScores:
    """Scores in CSR form: row r holds qid qids[r], its pids pids[ptr[r]:ptr[r+1]] (sorted) and scores."""

    def __init__(self, qids, ptr, pids, scores):
        self.qids, self.ptr, self.pids, self.scores = qids, ptr, pids, scores

    def __len__(self):
        return len(self.pids)

    def row(self, qid):
        """{pid: score} for one query (a small dict: lookups in the mining loop are then ~50 ns), or None."""
        r = int(np.searchsorted(self.qids, qid))
        if r == len(self.qids) or self.qids[r] != qid:
            return None
        a, b = self.ptr[r], self.ptr[r + 1]
        return dict(zip(self.pids[a:b].tolist(), self.scores[a:b].tolist()))

    @classmethod
    def from_dict(cls, scores, path="scores"):
        """Check that `scores` is exactly dict[int, dict[int, float]] and convert it, row by row.

        Consumes `scores` (rows are popped as they are converted, so the dicts and the arrays are
        never both whole in memory).
        """
        if type(scores) is not dict:
            raise UnsafePickleError(f"{path}: expected a dict {{qid: {{pid: score}}}}, found {type(scores).__name__}")
        qids = sorted(scores) if set(map(type, scores)) <= {int} else None
        if qids is None:
            bad = next(k for k in scores if type(k) is not int)
            raise UnsafePickleError(f"{path}: query id {bad!r} ({type(bad).__name__}) is not an int")
        for qid in qids:
            if type(scores[qid]) is not dict:
                raise UnsafePickleError(f"{path}: scores[{qid}] is a {type(scores[qid]).__name__}, not a dict")
        total = sum(len(scores[q]) for q in qids)
        ptr = np.zeros(len(qids) + 1, dtype=np.int64)
        pids = np.empty(total, dtype=np.int32)
        values = np.empty(total, dtype=np.float32)
        pos = 0
        for r, qid in enumerate(tqdm(qids, desc="converting CE scores", mininterval=2)):
            row = scores.pop(qid)
            # type() checks run in C (set(map(type, ...))): bool is not int here, str/None/list are refused.
            if not set(map(type, row)) <= {int}:
                bad = next(k for k in row if type(k) is not int)
                raise UnsafePickleError(f"{path}: scores[{qid}] has key {bad!r} ({type(bad).__name__}), not an int")
            if not set(map(type, row.values())) <= {float, int}:
                bad = next(v for v in row.values() if type(v) not in (float, int))
                raise UnsafePickleError(f"{path}: scores[{qid}] holds {bad!r} ({type(bad).__name__}), not a float")
            n = len(row)
            keys = np.fromiter(row.keys(), dtype=np.int64, count=n)
            if n and (keys.min() < 0 or keys.max() > MAX_ID or not 0 <= qid <= MAX_ID):
                raise DataError(f"{path}: scores[{qid}] has an id outside [0, {MAX_ID}]")
            order = np.argsort(keys, kind="stable")
            pids[pos : pos + n] = keys[order]
            values[pos : pos + n] = np.fromiter(row.values(), dtype=np.float64, count=n)[order]
            pos += n
            ptr[r + 1] = pos
        return cls(np.asarray(qids, dtype=np.int64), ptr, pids, values)


def cache_path(path):
    st = Path(path).stat()
    return Path(path).with_name(f"{Path(path).name}.cache-{st.st_size}-{st.st_mtime_ns}.npz")


def load_ce_scores(path):
    """CEScores for a `{qid: {pid: float}}` gzip pickle, from its .npz cache when it has one."""
    path = Path(path)
    cache = cache_path(path)
    if not cache.exists():
        # One process unpickles (~16 GB for the real file) and writes the cache; others wait, then read it.
        with file_lock(path.with_name(path.name + ".lock")):
            if not cache.exists():
                return _unpickle_and_cache(path, cache)
    with np.load(cache, allow_pickle=False) as z:  # allow_pickle=False: the cache cannot carry code either
        print(f"CE scores: {cache.name} (cache)")
        return CEScores(z["qids"], z["ptr"], z["pids"], z["scores"])


def _unpickle_and_cache(path, cache):
    raw = safe_load_pickle_gz(path)
    ce = CEScores.from_dict(raw, path)
    del raw
    # Write the cache through a temporary name: an interrupted write never looks like a cache.
    tmp = cache.with_name(cache.name + ".tmp.npz")
    try:
        np.savez(tmp, qids=ce.qids, ptr=ce.ptr, pids=ce.pids, scores=ce.scores)
        os.replace(tmp, cache)
        for old in path.parent.glob(f"{path.name}.cache-*.npz"):
            if old != cache:
                old.unlink()
    except OSError as err:  # a read-only data dir: work without a cache
        print(f"warning: cannot write the CE scores cache {cache} ({err}); the next run unpickles again")
        tmp.unlink(missing_ok=True)
    return ce
