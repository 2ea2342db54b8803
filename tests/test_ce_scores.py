"""data.ce_scores: the restricted unpickler and the .npz cache of the cross-encoder scores.

Every test builds its files in tmp_path in the real formats (or copies data/sample there): offline.
"""

import gzip
import os
import pickle

import pytest

from conftest import CE
from data.ce_scores import UnsafePickleError, load_ce_scores
from data.mining import mine_max_examples
from data.readers import DataError


def test_truncated_scores_pickle_is_an_error(filter_case):
    blob = (filter_case / CE).read_bytes()
    (filter_case / CE).write_bytes(blob[:-12])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        mine_max_examples(filter_case, download=False)


@pytest.mark.parametrize(
    "payload, message",
    [
        ({1: {1: "5.0"}}, "holds '5.0'"),
        ({1: {"1": 5.0}}, "has key '1'"),
        ({1: [5.0]}, "is a list, not a dict"),
        ({1: {1: True}}, "holds True"),
        ([(1, 1, 5.0)], "found list"),
        ({"1": {1: 5.0}}, "query id '1'"),
    ],
)
def test_scores_pickle_with_other_types_is_refused(filter_case, payload, message):
    (filter_case / CE).write_bytes(gzip.compress(pickle.dumps(payload)))
    with pytest.raises(UnsafePickleError, match=message):
        mine_max_examples(filter_case, download=False)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_run(filter_case, tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({1: {10: 5.0, 11: Payload(marker)}})
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))  # the payload does run when unpickled plainly
    assert (tmp_path / "control").exists()
    (filter_case / CE).write_bytes(gzip.compress(evil))
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os)\.system"):
        mine_max_examples(filter_case, download=False)
    assert not marker.exists()
    evil = pickle.dumps({1: {10: 5.0}, 2: Payload(marker)}, protocol=0)  # the text protocol, same refusal
    (filter_case / CE).write_bytes(gzip.compress(evil))
    with pytest.raises(UnsafePickleError, match="refusing to load global"):
        load_ce_scores(filter_case / CE)
    assert not marker.exists()


def test_scores_are_cached_and_the_cache_follows_the_file(filter_case, monkeypatch):
    import data.ce_scores as ce_scores

    first = load_ce_scores(filter_case / CE)
    assert len(list(filter_case.glob(f"{CE}.cache-*.npz"))) == 1
    monkeypatch.setattr(ce_scores, "safe_load_pickle_gz", lambda path: pytest.fail("unpickled again"))
    second = load_ce_scores(filter_case / CE)
    assert (
        second.row(1)
        == first.row(1)
        == {
            10: 5.0,
            11: 3.0,
            20: 4.0,
            21: -1.0,
            22: 0.0,
            23: -2.0,
            24: -3.0,
            25: -4.0,
            30: 0.5,
            31: -0.5,
            32: -0.75,
            40: -5.0,
            41: -6.0,
        }
    )
    monkeypatch.undo()
    (filter_case / CE).write_bytes(gzip.compress(pickle.dumps({1: {10: 1.0}})))
    os.utime(filter_case / CE, ns=(1, 1))  # a new file (size and mtime): a new cache, the old one removed
    assert load_ce_scores(filter_case / CE).row(1) == {10: 1.0}
    assert len(list(filter_case.glob(f"{CE}.cache-*.npz"))) == 1
