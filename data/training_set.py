"""The mined training set in compact arrays, and the per-epoch rotation of its positives and negatives.

Memory: passages and query texts live in one utf-8 buffer each (TextTable), ids and scores in numpy arrays.
data.mining builds a TrainingSet and saves it (TrainingSet.save) as .npy files that every process on the machine
maps read-only (TrainingSet.load): one copy in the page cache however many processes and data-loader workers
read it; a mapped set pickles as its folder's path. data.rotation feeds it to the sentence-transformers trainer.
"""

import json
from array import array
from pathlib import Path

import numpy as np

# The files of a saved TrainingSet: (attribute path, file name).
_TABLES, _PARTS = ("queries", "passages"), ("ids", "blob", "offsets")
_POINTERS = ("pos_ptr", "pos_idx", "pos_ce", "neg_ptr", "neg_idx", "neg_ce")
_ARRAYS = [(f"{t}.{part}", f"{t}_{part}") for t in _TABLES for part in _PARTS] + [(n, n) for n in _POINTERS]


class TextTable:
    """Texts by id, in one utf-8 buffer: the text of row k is blob[offsets[k]:offsets[k + 1]].

    8.8M passages as Python str would cost ~2x their size in object headers; here they cost their bytes.
    """

    def __init__(self, ids, blob, offsets):
        self.ids = np.asarray(ids, dtype=np.int64)
        self.blob = blob
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self._order = None  # argsort of ids, made on the first index_of

    @classmethod
    def from_items(cls, items):
        ids, offsets, blob = array("q"), array("q", [0]), bytearray()
        for id_, text in items:
            ids.append(id_)
            blob += text
            offsets.append(len(blob))
        return cls(np.frombuffer(ids, dtype=np.int64), np.frombuffer(blob, dtype=np.uint8), offsets)

    def __len__(self):
        return len(self.ids)

    def text(self, k):
        # errors="replace": a stray invalid byte must not stop a 30-epoch run halfway.
        return self.blob[self.offsets[k] : self.offsets[k + 1]].tobytes().decode("utf-8", errors="replace")

    def index_of(self, ids):
        """Row of each id, -1 where the table does not have it."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(self) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        if self._order is None:
            self._order = np.argsort(self.ids, kind="stable")
        sorted_ids = self.ids[self._order]
        at = np.minimum(np.searchsorted(sorted_ids, ids), len(self) - 1)
        return np.where(sorted_ids[at] == ids, self._order[at], -1)

    def subset(self, rows):
        """A table with only the given rows (in that order)."""
        blob, offsets, src = bytearray(), array("q", [0]), memoryview(self.blob)
        for k in np.asarray(rows, dtype=np.int64).tolist():
            blob += src[self.offsets[k] : self.offsets[k + 1]]
            offsets.append(len(blob))
        return TextTable(self.ids[rows], np.frombuffer(blob, dtype=np.uint8), offsets)


class TrainingSet:
    """The mined training queries: for query i, positives pos[pos_ptr[i]:pos_ptr[i+1]] in file order and
    negatives neg[neg_ptr[i]:neg_ptr[i+1]] shuffled once from the seed; both are rows of `passages`.

    A query may have no positive (train_distill --use_all_queries); every query has at least one negative.
    """

    def __init__(self, queries, pos_ptr, pos_idx, pos_ce, neg_ptr, neg_idx, neg_ce, passages, report):
        self.queries = queries  # TextTable: row i = training query i, ids = qids
        self.pos_ptr, self.pos_idx, self.pos_ce = pos_ptr, pos_idx, pos_ce
        self.neg_ptr, self.neg_idx, self.neg_ce = neg_ptr, neg_idx, neg_ce
        self.passages = passages
        self.report = report
        self.folder = None  # set by load(): the arrays are maps of the files there

    def __len__(self):
        return len(self.queries)

    def save(self, folder):
        """Write the arrays as .npy files and the report as report.json into `folder` (which must exist)."""
        folder = Path(folder)
        for attribute, name in _ARRAYS:
            np.save(folder / f"{name}.npy", np.ascontiguousarray(_get(self, attribute)), allow_pickle=False)
        (folder / "report.json").write_text(json.dumps(self.report, indent=2) + "\n")

    @classmethod
    def load(cls, folder):
        """The TrainingSet saved in `folder`, its arrays mapped read-only (pages load when read, shared)."""
        folder = Path(folder)
        a = {attribute: _map(folder / f"{name}.npy") for attribute, name in _ARRAYS}
        queries, passages = (TextTable(*(a[f"{t}.{part}"] for part in _PARTS)) for t in _TABLES)
        report = json.loads((folder / "report.json").read_text())
        ts = cls(queries, *(a[n] for n in _POINTERS), passages, report)
        ts.folder = folder
        return ts

    def __getstate__(self):
        # A data-loader worker (spawn, forkserver) gets the folder and maps the files itself, not a copy.
        return {"folder": self.folder, "report": self.report} if self.folder else self.__dict__

    def __setstate__(self, state):
        if set(state) == {"folder", "report"}:
            self.__dict__.update(TrainingSet.load(state["folder"]).__dict__, report=state["report"])
        else:
            self.__dict__.update(state)

    @property
    def qids(self):
        return self.queries.ids

    def rotation(self, i, epoch):
        """What queries i take in epochs `epoch`: (positive rows, positive CE, negative rows, negative CE), 1-d
        arrays; rows of `passages`.

        The original kept each query's lists and, at every visit, popped the first entry and appended it at the
        end. Without state: in epoch e, positive pos[e mod |pos|] and negative neg[e mod |neg|]. A query without
        positives had two negatives popped per visit, the first one serving as the "positive": neg[2e mod |neg|]
        and neg[(2e + 1) mod |neg|].
        """
        i, epoch = (a.astype(np.int64) for a in np.broadcast_arrays(np.atleast_1d(i), np.atleast_1d(epoch)))
        n_pos = self.pos_ptr[i + 1] - self.pos_ptr[i]
        n_neg = self.neg_ptr[i + 1] - self.neg_ptr[i]
        has_pos = n_pos > 0
        neg = self.neg_ptr[i] + np.where(has_pos, epoch, 2 * epoch + 1) % n_neg
        first_neg = self.neg_ptr[i] + (2 * epoch) % n_neg
        pos_rows, pos_ce = self.neg_idx[first_neg], self.neg_ce[first_neg]  # right for queries without positives
        pos = self.pos_ptr[i[has_pos]] + epoch[has_pos] % n_pos[has_pos]
        pos_rows[has_pos], pos_ce[has_pos] = self.pos_idx[pos], self.pos_ce[pos]
        return pos_rows, pos_ce, self.neg_idx[neg], self.neg_ce[neg]

    def example(self, i, epoch):
        """(query, positive, negative, label) of query i in epoch `epoch`; label = CE(pos) - CE(neg)."""
        pos_rows, pos_ce, neg_rows, neg_ce = self.rotation(i, epoch)
        return (
            self.queries.text(i),
            self.passages.text(pos_rows[0]),
            self.passages.text(neg_rows[0]),
            float(pos_ce[0]) - float(neg_ce[0]),
        )

    def texts(self):
        """Every query and passage text of the set (e.g. to train a tokenizer on the sample)."""
        for i in range(len(self.queries)):
            yield self.queries.text(i)
        for k in range(len(self.passages)):
            yield self.passages.text(k)

    def save_report(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.report, indent=2) + "\n")

    def format_report(self):
        return format_report(self.report)


def _get(obj, attribute_path):
    for name in attribute_path.split("."):
        obj = getattr(obj, name)
    return obj


def _map(path):
    """An .npy file mapped read-only, as a plain ndarray view (an empty array cannot be mapped: loaded)."""
    array_ = np.load(path, mmap_mode="r", allow_pickle=False)
    return np.asarray(array_) if array_.size else np.load(path, allow_pickle=False)


def format_report(report):
    """The mining report as text, for the console and the log."""
    lines = [
        f"Mining report ({report['script']}, {report['data_dir']})",
        f"  params: {json.dumps(report['params'])}",
        f"  systems used: {', '.join(report['systems_used'])}",
    ]
    unused = [s for s in report["systems_in_file"] if s not in report["systems_used"]]
    if unused:
        lines.append(f"  systems in file, not used: {', '.join(unused)}")
    lines += [
        f"  queries read: {report['queries_read']:,}  kept: {report['queries_kept']:,}",
        *(f"    dropped, {reason}: {count:,}" for reason, count in report["queries_dropped"].items()),
    ]
    if report["queries_with_random_negatives"]:
        lines.append(f"    kept with random negatives (use_all_queries): {report['queries_with_random_negatives']:,}")
    if report["queries_without_positive"]:
        lines.append(
            f"    kept without a positive (use_all_queries: two negatives per epoch): "
            f"{report['queries_without_positive']:,}"
        )
    lines.append(f"  positives: {report['positives']:,}")
    lines += [f"    skipped, {reason}: {count:,}" for reason, count in report["positives_skipped"].items()]
    q = report["negatives_per_query"]
    lines.append(f"  negatives: {report['negatives']:,} (per query min {q['min']}, mean {q['mean']}, max {q['max']})")
    lines += [f"    from {system}: {count:,}" for system, count in report["negatives_per_system"].items()]
    lines += [f"    skipped, {reason}: {count:,}" for reason, count in report["negatives_skipped"].items()]
    c = report["collection"]
    lines.append(
        f"  passages referenced: {report['passages_referenced']:,} (collection lines read: {c['lines_read']:,}"
        + (f", repeated ids (their last text kept): {c['repeated_ids']:,}" if c["repeated_ids"] else "")
        + ")"
    )
    lines.append(f"  took {report['seconds']} s, peak RSS {report['peak_rss_mb']:,} MB")
    cache = report.get("cache")
    if cache:
        lines.append(
            f"  cache: {'hit' if cache['hit'] else 'miss, mined and written to'} {cache['folder']} "
            f"({cache['size_mb']:,} MB{', mapped in ' + str(cache['seconds']) + ' s' if cache['hit'] else ''})"
        )
    return "\n".join(lines)
