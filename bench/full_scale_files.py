"""Synthetic MS MARCO training and dev files in the exact real formats, at S x the real counts, streamed.

Used by bench/bench_full_scale.py. Nothing here holds more than a chunk of queries in memory: the CE-scores
pickle, whose real counterpart holds ~160M scores, is written opcode by opcode with numpy, byte for byte as
CPython's pickler writes the equivalent dict at protocol 4 (FRAME opcodes included; tests/test_full_scale.py
checks the bytes against pickle.dumps).
"""

import gzip
import struct
from pathlib import Path

import numpy as np
from bench_memory import write_collection, write_queries
from tqdm.auto import tqdm

from data.download import CE_SCORES_FILE, COLLECTION, HARD_NEGATIVES_FILE, TRAIN_QUERIES

# The real files' counts (collection.tsv, queries.train.tsv, msmarco-hard-negatives.jsonl.gz, dev small).
REAL = dict(
    passages=8_841_823,
    train_queries=808_731,
    with_positive=502_939,  # the other 305,792 hard-negative lines have "pos": []
    dev_queries=6_980,
    dev_qrels=7_437,
)
# The 13 systems of msmarco-hard-negatives.jsonl.gz, 50 negatives each.
SYSTEMS = [
    "bm25",
    "msmarco-distilbert-base-tas-b",
    "msmarco-distilbert-base-v3",
    "msmarco-MiniLM-L-6-v3",
    "distilbert-margin_mse-cls-dot-v2",
    "distilbert-margin_mse-cls-dot-v1",
    "distilbert-margin_mse-mean-dot-v1",
    "mpnet-margin_mse-mean-v1",
    "co-condenser-margin_mse-cls-v1",
    "distilbert-margin_mse-mnrl-mean-v1",
    "distilbert-margin_mse-sym_mnrl-mean-v1",
    "distilbert-margin_mse-sym_mnrl-mean-v2",
    "co-condenser-margin_mse-sym_mnrl-mean-v1",
]
NEGS = 50
# Each system ranks 50 of one pool of POOL passages per query: 13 draws overlap to ~195 unique negatives, so
# that the CE file scores ~198 (query, passage) pairs per query, ~160M in all, as the real one does.
POOL = 202
DEV_FILES = ("queries.dev.small.tsv", "qrels.dev.small.tsv")
CHUNK = 4096  # queries per vectorised chunk

# pickle protocol 4, as CPython's C pickler writes it
FRAME_TARGET, FRAME_MIN = 64 * 1024, 4


def counts(scale):
    """The real counts times scale (at least a few of each, so that a tiny scale still exercises everything)."""
    return {k: max(4, round(v * scale)) for k, v in REAL.items()}


def _int_records(values):
    """(bytes matrix, lengths) of BININT1 / BININT2 / BININT opcodes for non-negative int32 values."""
    values = np.asarray(values, dtype=np.int64)
    m = np.zeros((len(values), 5), dtype=np.uint8)
    m[:, 1:5] = values.astype("<i4").view(np.uint8).reshape(-1, 4)
    small, medium = values < 256, values < 65536
    m[:, 0] = np.where(small, ord("K"), np.where(medium, ord("M"), ord("J")))
    return m, np.where(small, 2, np.where(medium, 3, 5))


class ScoresPickleWriter:
    """Writes {qid: {pid: float}} to a binary file exactly as pickle.dump(obj, f, protocol=4) does, from chunks
    of CSR rows (add), so the dict never exists. Inner dicts hold < 1000 items (one SETITEMS batch), as here.

    The C pickler batches a dict's items 1000 per MARK ... SETITEMS (a dict of one item: key value SETITEM; a
    size that is a multiple of 1000 ends with an empty MARK SETITEMS); a frame is closed where a save() (of a
    key, a value or a dict) begins once it holds >= 64 KiB; a last frame under 4 bytes has no header."""

    def __init__(self, f, total_queries):
        self.f, self.total, self.done = f, total_queries, 0
        f.write(b"\x80\x04")  # PROTO 4, before the first frame
        self.pending = bytearray(b"}\x94")  # EMPTY_DICT MEMOIZE: the outer dict
        if total_queries > 1:
            self.pending += b"("

    def add(self, qids, ptr, pids, scores):
        """Append queries qids (in order); query i's items are pids[ptr[i]:ptr[i+1]] with float scores."""
        n_items = np.diff(ptr)
        if len(n_items) and n_items.max() >= 1000:
            raise ValueError("inner dicts of 1000 items or more are not supported")
        g = self.done + np.arange(len(qids))  # global query numbers
        # per query: [qid key] } MEMOIZE [MARK] items [SETITEMS | SETITEM] [outer SETITEMS [MARK] | SETITEM]
        key_m, key_len = _int_records(qids)
        inner_pre = (n_items > 1).astype(np.int64)
        inner_suf = (n_items >= 1).astype(np.int64)
        last = g == self.total - 1
        batch_end = ((g % 1000) == 999) | last
        outer_suf = np.where(batch_end, 1, 0) + np.where(batch_end & ~last, 1, 0)  # 'u' then '(' of the next
        if self.total > 1 and self.total % 1000 == 0:
            outer_suf = outer_suf + np.where(last, 2, 0)  # the empty batch: MARK SETITEMS
        # items: [pid key] BINFLOAT score (8 bytes big-endian)
        item_m, item_key_len = _int_records(pids)
        item = np.zeros((len(pids), 14), dtype=np.uint8)
        item[:, :5] = item_m
        item[:, 5] = ord("G")
        item[:, 6:] = np.asarray(scores, dtype=">f8").view(np.uint8).reshape(-1, 8)
        item_len = item_key_len + 9
        keep = np.ones((len(pids), 14), dtype=bool)
        keep[:, 1:5] = np.arange(4) < (item_key_len - 1)[:, None]
        item_bytes = item[keep].tobytes()
        item_end = np.cumsum(item_len)  # in item_bytes
        item_start = item_end - item_len
        items_of_q = np.concatenate([[0], item_end])[ptr]  # byte offset of each query's first item

        q_len = key_len + 2 + inner_pre + np.diff(items_of_q) + inner_suf + outer_suf
        q_start = len(self.pending) + np.concatenate([[0], np.cumsum(q_len)[:-1]])
        items_at = q_start + key_len + 2 + inner_pre  # where each query's items land
        shift = np.repeat(items_at - items_of_q[:-1], n_items)
        bounds = np.concatenate(
            [
                q_start,  # a qid's save begins
                q_start + key_len,  # its inner dict's save begins
                shift + item_start,  # a pid's save begins
                shift + item_start + item_key_len,  # a score's save begins
            ]
        )
        bounds.sort()

        out = self.pending
        keys = key_m.tobytes()
        outer_tail = {0: b"", 1: b"u", 2: b"u(", 3: b"u(u"}
        for i in range(len(qids)):
            a, b = items_of_q[i], items_of_q[i + 1]
            out += keys[5 * i : 5 * i + key_len[i]]
            out += b"}\x94(" if inner_pre[i] else b"}\x94"
            out += item_bytes[a:b]
            if inner_suf[i]:
                out += b"u" if inner_pre[i] else b"s"
            if outer_suf[i]:
                out += b"s" if self.total == 1 else outer_tail[int(outer_suf[i])]
        self.done += len(qids)
        self._flush(bounds)

    def _flush(self, bounds):
        """Write every frame that a boundary closes; keep the rest pending."""
        start = 0
        while True:
            i = int(np.searchsorted(bounds, start + FRAME_TARGET))
            if i == len(bounds):
                break
            end = int(bounds[i])
            self.f.write(b"\x95" + struct.pack("<Q", end - start) + self.pending[start:end])
            start = end
        del self.pending[:start]

    def close(self):
        if self.done != self.total:
            raise ValueError(f"{self.done} queries written, {self.total} announced")
        data = bytes(self.pending) + b"."  # STOP
        self.f.write(b"\x95" + struct.pack("<Q", len(data)) + data if len(data) >= FRAME_MIN else data)


def hard_negative_lines(qids, pos, neg):
    """The JSON lines, as json.dumps writes {"qid", "pos", "neg": {system: [...]}} (neg: queries x systems x 50)."""
    lines = []
    for qid, p, ranked in zip(qids.tolist(), pos.tolist(), neg.tolist()):
        systems = ", ".join(f'"{s}": [{", ".join(map(str, r))}]' for s, r in zip(SYSTEMS, ranked))
        lines.append(f'{{"qid": {qid}, "pos": [{"" if p < 0 else p}], "neg": {{{systems}}}}}\n')
    return "".join(lines)


def query_chunk(rng, qids, has_pos, n_passages):
    """One chunk's hard negatives and CE scores: pos (-1: none), neg (q x 13 x 50) and the CSR score rows."""
    n = len(qids)
    pool = rng.integers(0, n_passages, size=(n, POOL), dtype=np.int64)
    order = np.argsort(rng.random((n, len(SYSTEMS), POOL), dtype=np.float32), axis=2)[:, :, :NEGS]
    neg = np.take_along_axis(pool[:, None, :], order, axis=2)
    pos = np.where(has_pos, rng.integers(0, n_passages, size=n), -1)
    # Score rows: the positive and every negative, once each, in ascending pid order.
    cand = np.concatenate([pos[:, None], neg.reshape(n, -1)], axis=1)
    cand = np.where(cand < 0, np.iinfo(np.int64).max, cand)  # no positive: a sentinel, dropped below
    cand.sort(axis=1)
    first = np.ones_like(cand, dtype=bool)
    first[:, 1:] = cand[:, 1:] != cand[:, :-1]
    first &= cand != np.iinfo(np.int64).max
    pids = cand[first]
    ptr = np.concatenate([[0], np.cumsum(first.sum(axis=1))])
    row = np.repeat(np.arange(n), np.diff(ptr))
    scores = np.round(rng.normal(-2.0, 3.0, size=len(pids)), 6)  # cross-encoder logits
    scores[pids == pos[row]] = 8.0  # positives score high: the CE filter keeps most negatives, as on the real file
    return pos, neg, ptr, pids, scores


def write_training_files(directory, scale, seed=0, compresslevel=1):
    """collection.tsv, queries.train.tsv, the hard negatives and the CE scores at scale x the real counts.
    Returns the number of CE scores written."""
    d, c = Path(directory), counts(scale)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_q = c["train_queries"]
    qids = np.sort(rng.choice(max(n_q, round(1_200_000 * scale)), size=n_q, replace=False))
    has_pos = np.zeros(n_q, dtype=bool)
    has_pos[rng.choice(n_q, size=min(n_q, c["with_positive"]), replace=False)] = True
    write_collection(d / COLLECTION, c["passages"], rng, words=(10, 15))  # ~335 characters
    write_queries(d / TRAIN_QUERIES, qids, rng)
    scores_written = 0
    with (
        gzip.open(d / HARD_NEGATIVES_FILE, "wt", compresslevel=compresslevel) as hn,
        gzip.open(d / CE_SCORES_FILE, "wb", compresslevel=compresslevel) as ce,
    ):
        writer = ScoresPickleWriter(ce, n_q)
        for start in tqdm(range(0, n_q, CHUNK), desc="hard negatives + CE scores", unit_scale=CHUNK):
            part = slice(start, start + CHUNK)
            pos, neg, ptr, pids, scores = query_chunk(rng, qids[part], has_pos[part], c["passages"])
            hn.write(hard_negative_lines(qids[part], pos, neg))
            writer.add(qids[part], ptr, pids, scores)
            scores_written += len(pids)
        writer.close()
    return scores_written


def write_dev_files(directory, scale, seed=1):
    """queries.dev.small.tsv and qrels.dev.small.tsv (`qid TAB 0 TAB pid TAB 1`): dev-small's counts."""
    d, c = Path(directory), counts(scale)
    rng = np.random.default_rng(seed)
    qids = np.sort(rng.choice(np.arange(1_200_000, 1_300_000), size=c["dev_queries"], replace=False))
    write_queries(d / DEV_FILES[0], qids, rng)
    # Every query has one relevant passage; the extra judgments go to random queries.
    judged = np.sort(np.concatenate([qids, rng.choice(qids, size=max(0, c["dev_qrels"] - len(qids)))]))
    pids = rng.integers(0, c["passages"], size=len(judged))
    with open(d / DEV_FILES[1], "w") as f:
        f.writelines(f"{q}\t0\t{p}\t1\n" for q, p in zip(judged.tolist(), pids.tolist()))
