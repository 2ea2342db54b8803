"""Cross-encoder scores: the gzip pickle `{qid: {pid: score}}` read safely and lean, and its compact .npz cache.

The scores file comes from the internet, and unpickling runs whatever the pickle asks for (any `__reduce__`
can call os.system). So it is never unpickled: data.ce_pickle walks its opcodes and accepts only what a dict of
dicts of ints -> floats is written with (scores may be NumPy float16/32/64 scalars, as a cross-encoder's predict
returns them); anything else raises UnsafePickleError and nothing in the file is ever imported or called.

The walk fills CSR arrays directly (8 bytes per score, ~16 at the peak) instead of building 100-235 bytes of
Python objects per score (bench/bench_memory.py compares both). The arrays are cached in an .npz next to the
pickle, keyed by its size and mtime: later runs load them in seconds.
"""

import gzip
import zlib
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from data.atomic import atomic_path
from data.ce_pickle import UnsafePickleError, read_scores_pickle
from data.download import file_lock
from data.readers import DataError

__all__ = ["CEScores", "UnsafePickleError", "cache_path", "load_ce_scores", "read_scores_pickle_gz"]

# The real file holds ~8.4 compressed bytes per score: start the arrays there, they grow if short.
COMPRESSED_BYTES_PER_SCORE = 8


def read_scores_pickle_gz(path):
    """CEScores from a `{qid: {pid: score}}` gzip pickle. Truncation and corruption raise DataError."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with (
            open(path, "rb") as raw,
            gzip.GzipFile(fileobj=raw) as gz,
            tqdm(total=size, unit="B", unit_scale=True, desc=f"reading {path.name}") as bar,
        ):
            arrays = read_scores_pickle(
                gz, path, size // COMPRESSED_BYTES_PER_SCORE, lambda: bar.update(raw.tell() - bar.n)
            )
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: truncated or corrupt gzip ({err}); delete it and download it again") from None
    return CEScores(*arrays)


class CEScores:
    """Scores in CSR form: row r holds qid qids[r], its pids pids[ptr[r]:ptr[r+1]] (sorted) and scores."""

    def __init__(self, qids, ptr, pids, scores):
        self.qids, self.ptr, self.pids, self.scores = qids, ptr, pids, scores
        self._row_of = self._ptr = None

    def __len__(self):
        return len(self.pids)

    def row(self, qid):
        """{pid: score} for one query (a small dict: lookups in the mining loop are then ~50 ns), or None."""
        if self._row_of is None:  # {qid: row}: ~10x faster than a searchsorted per call
            self._row_of, self._ptr = dict(zip(self.qids.tolist(), range(len(self.qids)))), self.ptr.tolist()
        r = self._row_of.get(qid)
        if r is None:
            return None
        a, b = self._ptr[r], self._ptr[r + 1]
        return dict(zip(self.pids[a:b].tolist(), self.scores[a:b].tolist()))


def cache_path(path):
    st = Path(path).stat()
    return Path(path).with_name(f"{Path(path).name}.cache-{st.st_size}-{st.st_mtime_ns}.npz")


def load_ce_scores(path):
    """CEScores for a `{qid: {pid: score}}` gzip pickle, from its .npz cache when it has one."""
    path = Path(path)
    cache = cache_path(path)
    if not cache.exists():
        # One process reads the pickle and writes the cache; others wait, then load the cache.
        with file_lock(path.with_name(path.name + ".lock")):
            if not cache.exists():
                return _read_and_cache(path, cache)
    with np.load(cache, allow_pickle=False) as z:  # allow_pickle=False: the cache cannot carry code either
        print(f"CE scores: {cache.name} (cache)")
        return CEScores(z["qids"], z["ptr"], z["pids"], z["scores"])


def _read_and_cache(path, cache):
    ce = read_scores_pickle_gz(path)
    try:
        with atomic_path(cache) as part:  # an interrupted write never looks like a cache
            np.savez(part, qids=ce.qids, ptr=ce.ptr, pids=ce.pids, scores=ce.scores)
        for old in path.parent.glob(f"{path.name}.cache-*.npz"):
            if old != cache:
                old.unlink()
    except OSError as err:  # a read-only data dir: work without a cache
        print(f"warning: cannot write the CE scores cache {cache} ({err}); the next run reads the pickle again")
    return ce
