"""Hand a model's corpus vectors to the engines users serve with: Anserini/Pyserini or Seismic.

  python export.py MODEL CORPUS --format anserini --out DIR   # CORPUS: a BEIR folder or collection.tsv
  python export.py MODEL CORPUS --format seismic --out DIR

The document vectors come from evaluate.py's cache (encoded once, shared with evaluation).
- anserini: JsonVectorCollection files ``docs-00000.jsonl`` ... of at most 1M lines,
  ``{"id", "contents", "vector": {token: int}}`` with int = round(100 * weight), zeros dropped (NAVER's
  quantization for Anserini impact indexes); the queries (BEIR folder, or --queries FILE) as
  ``queries.tsv`` in Anserini's pretokenized form: ``qid TAB tokens``, each token repeated int times.
- seismic: ``docs.jsonl`` in Seismic's input format ``{"id": int, "content": "", "vector": {token: float}}``
  (Seismic wants integer ids: row numbers, whose document ids are ``doc_ids.txt``, one per line) and
  the queries the same way as ``queries.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np
import scipy.sparse as sp

from data.atomic import atomic_path
from data.eval_sets import DEFAULT_CACHE_DIR
from data.readers import read_query_texts
from encoding import Encoder, load_model, log, model_fingerprint, model_on_device, resolve_precision
from errors import UserError, main_exits_2_on_user_error

LINES_PER_FILE = 1_000_000  # Anserini's JsonVectorCollection: files of at most 1M documents
SCALE = 100  # weight -> integer impact, as NAVER indexed these models with Anserini
BLOCK_ROWS = 2048  # lines formatted at a time


def quantize(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """round(100 * w) as int32, zeros dropped."""
    q = sp.csr_matrix((np.rint(matrix.data * SCALE).astype(np.int32), matrix.indices, matrix.indptr), matrix.shape)
    q.eliminate_zeros()
    return q


# The lines are written as bytes by a compiled loop (numba, as the search kernel): one Python string per posting
# made an 8.8M-passage export take an hour, and numpy's padded byte matrices were only ~1.5x faster.


def _concatenated(chunks: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The chunks back to back as uint8, and where each starts (one more entry: the end)."""
    ptr = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum([len(c) for c in chunks], out=ptr[1:])
    return np.frombuffer(b"".join(chunks), dtype=np.uint8), ptr


def token_fields(vocab: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """'"token": ' of every token, JSON-escaped, back to back, and where each starts."""
    return _concatenated([(json.dumps(token) + ": ").encode() for token in vocab])


_POW10 = 10.0 ** np.arange(-80, 81)  # _POW10[80 + k] = 10**k, spanning float32's range
_TEN, _E2, _E4, _E8 = np.uint64(10), np.uint64(100), np.uint64(10**4), np.uint64(10**8)
_DIGIT_PAIRS = np.frombuffer(b"".join(b"%02d" % n for n in range(100)), dtype=np.uint8)  # "00" "01" ... "99"


@numba.njit(inline="always")
def _write_int(value, out, pos):
    """Decimal digits of value >= 0; returns the position after them."""
    digits, limit = 1, 10
    while value >= limit:
        digits, limit = digits + 1, limit * 10
    for d in range(digits - 1, -1, -1):
        out[pos + d] = 48 + value % 10
        value //= 10
    return pos + digits


@numba.njit(inline="always")
def _write_pair(n, out, pos):
    out[pos] = _DIGIT_PAIRS[2 * n]
    out[pos + 1] = _DIGIT_PAIRS[2 * n + 1]


@numba.njit(inline="always")
def _write_float(w, out, pos):
    """w > 0 as 9 significant digits and an exponent ('287835360e-09'). 9 digits read back to the same float32,
    always; repr would write the float64 digits of the float32 value, 17 of them. The formatting is the export's
    main cost, so no log10, pow or digit loop: 10**floor(log10 w) from the binary exponent and a table, then the
    digits two at a time (3x faster)."""
    e10 = int(math.floor((math.frexp(w)[1] - 1) * 0.30102999566398120))  # floor(log10 w), or one less
    if w >= _POW10[81 + e10]:
        e10 += 1
    exponent = e10 - 8
    value = np.uint64(np.rint(w * _POW10[80 - exponent]))
    if value < _E8 or value >= _E8 * _TEN:
        # Next to a power of 10 (float64 input only): 8 or 10 digits, which still read back to the same float32.
        pos = _write_int(value, out, pos)
    else:  # unsigned: numba's // on signed integers adds floor corrections, and mixed with int64 goes float64
        first = value // _E8
        rest = value - first * _E8
        high, low = rest // _E4, rest % _E4
        out[pos] = 48 + first
        _write_pair(high // _E2, out, pos + 1)
        _write_pair(high % _E2, out, pos + 3)
        _write_pair(low // _E2, out, pos + 5)
        _write_pair(low % _E2, out, pos + 7)
        pos += 9
    out[pos] = 101  # e
    out[pos + 1] = 45 if exponent < 0 else 43  # - or +
    _write_pair(abs(exponent), out, pos + 2)
    return pos + 4


@numba.njit(cache=True, nogil=True)
def _write_lines(indptr, indices, values, as_floats, tok_buf, tok_ptr, head_buf, head_ptr, out, line_end):
    """Row r: head r, then '"vector": {' pairs '}}\n' (the head ends where the vector begins)."""
    pos = 0
    for row in range(len(indptr) - 1):
        for b in range(head_ptr[row], head_ptr[row + 1]):
            out[pos] = head_buf[b]
            pos += 1
        for p in range(indptr[row], indptr[row + 1]):
            if p > indptr[row]:
                out[pos] = 44  # ,
                out[pos + 1] = 32
                pos += 2
            t = indices[p]
            for b in range(tok_ptr[t], tok_ptr[t + 1]):
                out[pos] = tok_buf[b]
                pos += 1
            pos = _write_float(np.float64(values[p]), out, pos) if as_floats else _write_int(int(values[p]), out, pos)
        out[pos] = 125  # }
        out[pos + 1] = 125
        out[pos + 2] = 10  # newline
        pos += 3
        line_end[row] = pos
    return pos


def vector_lines(matrix: sp.csr_matrix, tokens, heads: list[bytes], as_floats: bool) -> tuple[memoryview, np.ndarray]:
    """One JSON line per row, head + '"vector": {"token": value, ...}}\n', back to back, and where each line ends.
    tokens: token_fields(vocab); values: positive integers, or positive floats (as_floats) read back exactly."""
    low, high = (1e-45, 3.4e38) if as_floats else (1, 2**62)  # floats: float32's positive range
    if matrix.nnz and not (matrix.data.min() >= low and matrix.data.max() < high):
        raise ValueError(f"export: weights must be in [{low}, {high}) (zeros are dropped before)")
    tok_buf, tok_ptr = tokens
    head_buf, head_ptr = _concatenated([head + b'"vector": {' for head in heads])
    widest = int(np.diff(tok_ptr).max(initial=0)) + 2 + 20  # a token, ", " and a number (int64 or float)
    out = np.empty(len(head_buf) + matrix.nnz * widest + 3 * len(heads), dtype=np.uint8)
    line_end = np.zeros(len(heads), dtype=np.int64)
    values = matrix.data if as_floats else matrix.data.astype(np.int64)
    used = _write_lines(matrix.indptr.astype(np.int64), matrix.indices, values, as_floats, tok_buf, tok_ptr,
                        head_buf, head_ptr, out, line_end)  # fmt: skip
    return memoryview(out[:used]), line_end


class DocumentFiles:
    """docs.jsonl (seismic), or docs-00000.jsonl ... of at most LINES_PER_FILE lines each (anserini); each file is
    complete under its name or absent (atomic_path), also when the export fails half-way."""

    def __init__(self, out: Path, fmt: str):
        self.out, self.fmt = out, fmt
        self.limit = LINES_PER_FILE if fmt == "anserini" else sys.maxsize
        self.current, self.handle, self.lines, self.files = contextlib.ExitStack(), None, 0, 0

    def write(self, text: memoryview, line_end: np.ndarray) -> None:
        done = 0  # lines of this block written
        while done < len(line_end):
            if self.handle is None or self.lines == self.limit:
                self._next_file()
            take = min(self.limit - self.lines, len(line_end) - done)
            start = line_end[done - 1] if done else 0
            self.handle.write(text[start : line_end[done + take - 1]])
            self.lines, done = self.lines + take, done + take

    def _next_file(self) -> None:
        self.current.close()  # the previous file, complete: renamed to its name
        name = f"docs-{self.files:05d}.jsonl" if self.fmt == "anserini" else "docs.jsonl"
        self.current = contextlib.ExitStack()
        self.handle = open(self.current.enter_context(atomic_path(self.out / name)), "wb")
        self.current.enter_context(self.handle)
        self.lines, self.files = 0, self.files + 1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return self.current.__exit__(*exc_info)  # an exception: the unfinished file is deleted


def export(docs, queries, vocab: list[str], out: Path, fmt: str) -> float:
    """Write the files; return documents per second (from the cache: no encoding)."""
    out.mkdir(parents=True, exist_ok=True)
    tokens = token_fields(vocab)
    # Load (or, on a fresh checkout, compile) the writer first: a one-off cost, reported apart from the rate.
    started = time.perf_counter()
    for values in (np.float32, np.int64):
        vector_lines(sp.csr_matrix((1, len(vocab)), dtype=values), tokens, [b"{"], as_floats=values is np.float32)
    log(f"export: line writer ready in {time.perf_counter() - started:.1f} s (numba; cached after the first run)")
    started, cpu, written = time.perf_counter(), time.process_time(), 0
    ids = [json.dumps(d) for d in docs.doc_ids]
    # One thread writes a block while the next is formatted (the writer releases the GIL): the file write costs
    # about as much as the formatting, so on 2 cores the two overlap.
    with DocumentFiles(out, fmt) as files, ThreadPoolExecutor(1) as writer:
        pending = None
        for shard in docs.shards:
            matrix = sp.load_npz(shard).tocsr()
            matrix.sort_indices()
            if fmt == "anserini":
                matrix = quantize(matrix)
            else:
                matrix.eliminate_zeros()
            for lo in range(0, matrix.shape[0], BLOCK_ROWS):
                rows = range(written + lo, written + min(lo + BLOCK_ROWS, matrix.shape[0]))
                if fmt == "anserini":
                    heads = [f'{{"id": {ids[r]}, "contents": "", '.encode() for r in rows]
                else:
                    heads = [f'{{"id": {r}, "content": "", '.encode() for r in rows]
                lines = vector_lines(matrix[lo : lo + BLOCK_ROWS], tokens, heads, as_floats=fmt == "seismic")
                if pending:
                    pending.result()  # raises the writer's error, if any
                pending = writer.submit(files.write, *lines)
            written += matrix.shape[0]
        if pending:
            pending.result()
    rate = written / max(time.perf_counter() - started, 1e-9)
    per_cpu_s = written / max(time.process_time() - cpu, 1e-9)
    log(f"export: {written:,} documents, {rate:,.0f}/s wall, {per_cpu_s:,.0f} per CPU-second")
    if fmt == "seismic":
        (out / "doc_ids.txt").write_text("".join(f"{d}\n" for d in docs.doc_ids), encoding="utf-8")
    if queries is not None:
        query_ids, vectors = queries
        if fmt == "anserini":
            q = quantize(vectors)
            with open(out / "queries.tsv", "w", encoding="utf-8") as f:
                for row, qid in enumerate(query_ids):
                    lo, hi = q.indptr[row], q.indptr[row + 1]
                    words = [" ".join([vocab[t]] * int(n)) for t, n in zip(q.indices[lo:hi], q.data[lo:hi])]
                    f.write(f"{qid}\t{' '.join(words)}\n")
        else:
            vectors = vectors.tocsr()
            vectors.eliminate_zeros()
            heads = [f'{{"id": {json.dumps(q)}, '.encode() for q in query_ids]
            (out / "queries.jsonl").write_bytes(vector_lines(vectors, tokens, heads, as_floats=True)[0])
    return rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("corpus", type=Path, help="a BEIR folder (corpus.jsonl, queries.jsonl) or collection.tsv")
    parser.add_argument("--format", choices=("anserini", "seismic"), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--queries", type=Path, help="queries file (default: the BEIR folder's queries.jsonl)")
    parser.add_argument("--cache_dir", default=str(DEFAULT_CACHE_DIR))
    parser.add_argument("--max_seq_length", type=int)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device")
    args = parser.parse_args(argv)

    def in_folder(stem):  # BEIR folders hold name.jsonl or name.jsonl.gz
        found = [args.corpus / f"{stem}{ext}" for ext in (".jsonl", ".jsonl.gz")]
        return next((path for path in found if path.is_file()), None)

    corpus_file = in_folder("corpus") if args.corpus.is_dir() else args.corpus
    if corpus_file is None or not corpus_file.is_file():
        raise UserError(f"{args.corpus}: no corpus (a BEIR folder with corpus.jsonl[.gz], or collection.tsv)")
    queries_file = args.queries or (in_folder("queries") if args.corpus.is_dir() else None)
    model = load_model(args.model, args.max_seq_length)
    vocab = [t for t, _ in sorted(model.tokenizer.get_vocab().items(), key=lambda item: item[1])]
    with model_on_device(model, args.max_seq_length, args.device) as device:
        precision = resolve_precision("auto", device)
        encoder = Encoder(
            model, model_fingerprint(args.model, model), Path(args.cache_dir) / "doc_vectors",
            args.batch_size, device, precision, 0, 1, True,
        )  # fmt: skip
        docs = encoder.documents(corpus_file)
        queries = None
        if queries_file:
            texts = read_query_texts(queries_file)
            queries = (list(texts), encoder.texts(list(texts.values()), desc="encode queries"))
    rate = export(docs, queries, vocab, args.out, args.format)
    log(f"exported {len(docs.doc_ids):,} documents to {args.out} ({args.format}): {rate:,.0f} docs/s from the cache")
    return 0


if __name__ == "__main__":
    sys.exit(main_exits_2_on_user_error(main))
