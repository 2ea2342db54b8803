"""data.ce_scores / data.ce_pickle: the opcode walker that reads the cross-encoder scores pickle, and the .npz cache.

Pickles are written by CPython's own pickler (NumPy 2 names), or rewritten by hand for NumPy 1's module name and
for the refused cases; the reference for every value is the dict that was pickled. Offline, in tmp_path.
"""

import gzip
import io
import os
import pickle
import pickletools
import warnings

import numpy as np
import pytest

from conftest import CE
from data.ce_pickle import read_scores_pickle
from data.ce_scores import UnsafePickleError, load_ce_scores, read_scores_pickle_gz
from data.mining import mine_max_examples
from data.readers import DataError

PROTOCOLS = [2, 3, 4, 5]
NP2_GLOBAL = {2: b"cnumpy._core.multiarray\nscalar\n", 4: b"\x8c\x16numpy._core.multiarray"}
NP1_GLOBAL = {2: b"cnumpy.core.multiarray\nscalar\n", 4: b"\x8c\x15numpy.core.multiarray"}


def numpy1_spelling(blob, protocol):
    """The pickle NumPy 1 writes for the same scores: its scalar reconstructor lives in numpy.core.multiarray."""
    form = 2 if protocol < 4 else 4
    assert NP2_GLOBAL[form] in blob
    # optimize() re-frames the shorter protocol 4+ pickle (and drops unused memo entries: another layout)
    return pickletools.optimize(blob.replace(NP2_GLOBAL[form], NP1_GLOBAL[form]))


def expected_csr(scores):
    """The CSR arrays CEScores keeps, built directly from the dict: rows by qid, pids sorted, float32 scores."""
    qids = sorted(scores)
    rows = [sorted(scores[q].items()) for q in qids]
    ptr = np.cumsum([0] + [len(r) for r in rows])
    pids = np.array([p for r in rows for p, _ in r], dtype=np.int32)
    values = np.array([float(s) for r in rows for _, s in r], dtype=np.float64).astype(np.float32)
    return np.array(qids, dtype=np.int64), ptr.astype(np.int64), pids, values


def read(blob, chunk=1 << 24, capacity=1):
    return read_scores_pickle(io.BytesIO(blob), "scores.pkl", capacity, chunk=chunk)


def assert_same_arrays(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)


def sample_scores(kind, rng):
    """1200 queries (more than one 1000-pair SETITEMS batch) with 0-7 scores, one with 2500; ids up to 9M."""
    make = {"float": float, "float32": np.float32, "float64": np.float64, "float16": np.float16}[kind]
    scores = {int(q): {} for q in rng.choice(1_200_000, size=1200, replace=False)}
    for row in scores.values():
        for p in rng.choice(9_000_000, size=int(rng.integers(0, 8)), replace=False):
            row[int(p)] = make(rng.normal(-2, 3))
    scores[next(iter(scores))] = {int(p): make(rng.normal()) for p in rng.choice(100_000, 2500, replace=False)}
    return scores


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("kind", ["float", "float32", "float64", "float16"])
def test_every_score_type_and_protocol_reads_as_the_dict_that_was_pickled(tmp_path, kind, protocol):
    scores = sample_scores(kind, np.random.default_rng(protocol))
    blob = pickle.dumps(scores, protocol=protocol)
    want = expected_csr(scores)
    assert_same_arrays(read(blob, chunk=4093), want)  # chunks end mid-opcode many times
    if kind != "float":
        assert_same_arrays(read(numpy1_spelling(blob, protocol)), want)
    (tmp_path / CE).write_bytes(gzip.compress(blob, compresslevel=1))
    ce = read_scores_pickle_gz(tmp_path / CE)
    for q in want[0][::100].tolist():
        assert ce.row(q) == {p: float(np.float32(s)) for p, s in scores[q].items()}


def test_numpy1_pickle_loads_with_pickle_too():
    """The hand-made NumPy 1 spelling is a real pickle: NumPy 2's compatibility module unpickles it to the same."""
    scores = {3: {1: np.float32(1.5), 2: np.float32(-0.25)}}
    for protocol in PROTOCOLS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            assert pickle.loads(numpy1_spelling(pickle.dumps(scores, protocol=protocol), protocol)) == scores


def test_a_chunk_may_end_anywhere():
    scores = {7: {1: np.float32(0.5), 300: np.float64(-2.0), 70000: 1.25, 2**31 - 1: 4}, 1: {}, 2: {5: np.float16(3)}}
    want = expected_csr(scores)
    for protocol in PROTOCOLS:
        blob = pickle.dumps(scores, protocol=protocol)
        for chunk in range(1, 12):
            assert_same_arrays(read(blob, chunk=chunk), want)


def test_a_big_endian_dtype_reads_as_pickle_reads_it():
    blob = pickle.dumps({1: {2: np.float32(1.5), 3: np.float64(-0.1)}}, protocol=4)
    be = blob.replace(b"\x8c\x01<", b"\x8c\x01>")  # the dtype's byte order, then each value's bytes reversed
    f64 = np.float64(-0.1).tobytes()
    be = be.replace(b"C\x04\x00\x00\xc0?", b"C\x04?\xc0\x00\x00").replace(f64, f64[::-1])
    assert be.count(b"\x8c\x01>") == 1 and pickle.loads(be) == {1: {2: 1.5, 3: -0.1}}
    assert_same_arrays(read(be), expected_csr({1: {2: np.float32(1.5), 3: -0.1}}))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def float32_pickle(protocol, payload=None):
    """{1: {2: float32(1.5), 4: payload}}: the scalar's dtype and bytes come before the payload's global."""
    row = {2: np.float32(1.5)} | ({4: payload} if payload else {})
    return pickle.dumps({1: row}, protocol=protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "old, new, message",
    [
        (b"f4", b"O8", "tuple of 3 items"),  # an object dtype: refused before numpy.dtype would be called
        (b"f4", b"i4", "tuple of 3 items"),  # an int dtype
        # 3 bytes for a 4-byte float (protocol 2 writes bytes as a latin-1 str: 1.5 is '\x00\x00\xc0?' in UTF-8)
        ((b"C\x04\x00\x00\xc0?", b"X\x05\x00\x00\x00\x00\x00\xc3\x80?"), b"", "REDUCE calls a global"),
        (b"K\x03", b"K\x04", "tuple of 8 items"),  # another dtype state version (could carry fields)
        (b"scalar", b"system", "refusing to load global numpy._core.multiarray.system"),
    ],
)
def test_numpy_scalars_other_than_floats_are_refused_before_the_payload(tmp_path, protocol, old, new, message):
    marker = tmp_path / "pwned"
    blob = float32_pickle(protocol, Payload(marker))
    if isinstance(old, tuple):  # the scalar's bytes, one byte short
        old = old[0] if protocol >= 3 else old[1]
        new = old[:1] + bytes([old[1] - 1]) + old[2:-1]
    assert old in blob
    blob = blob.replace(old, new, 1)  # the first: the marker's path (in the payload) may hold the word too
    with pytest.raises(UnsafePickleError, match=message):
        read(blob)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1, *PROTOCOLS])
def test_malicious_pickle_is_refused_and_never_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))  # the payload does run when unpickled plainly
    assert (tmp_path / "control").exists()
    for evil in ({1: {10: 5.0, 11: Payload(marker)}}, {1: {10: 5.0}, 2: Payload(marker)}):
        blob = pickle.dumps(evil, protocol=protocol)
        # protocol 0's text opcodes are not read at all; 1+ name the refused global
        message = r"refusing to load global (posix|os)\.system" if protocol >= 1 else "opcode .* is not part"
        with pytest.raises(UnsafePickleError, match=message):
            read(blob)
    assert not marker.exists()


def test_other_numpy_globals_are_refused():
    with pytest.raises(UnsafePickleError, match=r"refusing to load global numpy\._core\.multiarray\._reconstruct"):
        read(pickle.dumps({1: {2: np.array([1.0])}}, protocol=4))


def test_truncated_scores_pickle_is_an_error(filter_case):
    blob = (filter_case / CE).read_bytes()
    (filter_case / CE).write_bytes(blob[:-12])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        mine_max_examples(filter_case, download=False)
    with pytest.raises(DataError, match="before its STOP opcode"):
        read(pickle.dumps({1: {2: 3.0}})[:-1])


@pytest.mark.parametrize(
    "payload, message",
    [
        ({1: {1: "5.0"}}, r"scores\[1\] holds a str, not a float"),
        ({1: {"1": 5.0}}, r"scores\[1\] has a str key"),
        ({1: [5.0]}, "opcode EMPTY_LIST"),
        ({1: {1: True}}, r"scores\[1\] holds a bool"),
        ({1: {1: None}}, r"scores\[1\] holds a None"),
        ({1: {1: {2: 3.0}}}, r"scores\[1\] holds a dict"),
        ({1: 5.0}, r"scores\[1\] is a float, not a dict"),
        ([(1, 1, 5.0)], "opcode EMPTY_LIST"),
        ({"1": {1: 5.0}}, "a query id is a str"),
        (5.0, "top object is a float"),
    ],
)
def test_scores_pickle_with_other_types_is_refused(filter_case, payload, message):
    (filter_case / CE).write_bytes(gzip.compress(pickle.dumps(payload)))
    with pytest.raises(UnsafePickleError, match=message):
        mine_max_examples(filter_case, download=False)


def test_ids_out_of_range_and_repeated_keys_are_errors():
    with pytest.raises(DataError, match=f"id {2**31} is outside"):
        read(pickle.dumps({1: {2**31: 1.0}}))
    with pytest.raises(DataError, match="id -1 is outside"):
        read(pickle.dumps({-1: {2: 1.0}}))
    # A dict pickle never repeats a key: SETITEMS with pid 2 twice, by hand.
    twice = b"\x80\x04}(K\x01}(K\x02G?\xf0\x00\x00\x00\x00\x00\x00K\x02G@\x00\x00\x00\x00\x00\x00\x00uu."
    with pytest.raises(DataError, match=r"passage 2 in scores\[1\] appears twice"):
        read(twice)


def test_scores_are_cached_and_the_cache_follows_the_file(filter_case, monkeypatch):
    import data.ce_scores as ce_scores

    first = load_ce_scores(filter_case / CE)
    assert len(list(filter_case.glob(f"{CE}.cache-*.npz"))) == 1
    monkeypatch.setattr(ce_scores, "read_scores_pickle_gz", lambda path: pytest.fail("read again"))
    second = load_ce_scores(filter_case / CE)
    want = {10: 5.0, 11: 3.0, 20: 4.0, 21: -1.0, 22: 0.0, 23: -2.0, 24: -3.0, 25: -4.0}
    want |= {30: 0.5, 31: -0.5, 32: -0.75, 40: -5.0, 41: -6.0}
    assert second.row(1) == first.row(1) == want
    assert second.row(2) is None and len(second) == len(want)
    monkeypatch.undo()
    (filter_case / CE).write_bytes(gzip.compress(pickle.dumps({1: {10: np.float32(1.0)}})))
    os.utime(filter_case / CE, ns=(1, 1))  # a new file (size and mtime): a new cache, the old one removed
    assert load_ce_scores(filter_case / CE).row(1) == {10: 1.0}
    assert len(list(filter_case.glob(f"{CE}.cache-*.npz"))) == 1
