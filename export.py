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
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from data.atomic import atomic_path
from data.eval_sets import DEFAULT_CACHE_DIR
from data.readers import read_query_texts
from encoding import Encoder, load_model, log, model_fingerprint, model_on_device, resolve_precision
from errors import UserError, main_exits_2_on_user_error

LINES_PER_FILE = 1_000_000  # Anserini's JsonVectorCollection: files of at most 1M documents
SCALE = 100  # weight -> integer impact, as NAVER indexed these models with Anserini


def quantize(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """round(100 * w) as int32, zeros dropped."""
    q = sp.csr_matrix((np.rint(matrix.data * SCALE).astype(np.int32), matrix.indices, matrix.indptr), matrix.shape)
    q.eliminate_zeros()
    return q


# The lines are built as bytes by numpy, a posting per row of a byte matrix, instead of one Python string per
# posting: ~10x faster, which is what makes an 8.8M-passage export minutes rather than an hour.


def token_fields(vocab: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """'"token": ' of every token as a row of bytes (zero-padded) and its length."""
    encoded = [(json.dumps(token) + ": ").encode() for token in vocab]
    table = np.zeros((len(encoded), max(map(len, encoded))), dtype=np.uint8)
    for row, field in enumerate(encoded):
        table[row, : len(field)] = np.frombuffer(field, dtype=np.uint8)
    return table, np.array([len(field) for field in encoded])


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] // powers) % 10 + ord("0")).astype(np.uint8)


def int_fields(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive integers in decimal: byte rows and a mask of the digits to keep (no leading zeros)."""
    values = values.astype(np.int64)
    width = len(str(int(values.max(initial=1))))
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    keep = values[:, None] >= powers
    keep[:, -1] = True
    return _digits(values, width), keep


def float_fields(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive float32 values as 9 significant digits and an exponent ('287835360e-09'): 9 digits read back to
    the same float32, always (repr would give the float64 digits of the float32 value, 17 of them, 5x slower)."""
    w = values.astype(np.float64)
    if len(w) and not (w.min() > 0 and w.max() < 1e90):
        raise ValueError("export: weights must be > 0 (zeros are dropped before)")
    exponent = np.floor(np.log10(w)).astype(np.int64) - 8
    mantissa = np.rint(w * 10.0**-exponent)
    exponent += (mantissa >= 1e9).astype(np.int64) - (mantissa < 1e8)  # log10 is off by one next to a power of 10
    mantissa = np.rint(w * 10.0**-exponent).astype(np.int64)
    sign = np.where(exponent < 0, ord("-"), ord("+")).astype(np.uint8)[:, None]
    e = np.full((len(w), 1), ord("e"), dtype=np.uint8)
    fields = np.hstack([_digits(mantissa, 9), e, sign, _digits(np.abs(exponent), 2)])
    return fields, np.ones(fields.shape, dtype=bool)


def vector_lines(matrix: sp.csr_matrix, tokens, heads: list[bytes], values) -> list[bytes]:
    """One JSON line per row: head + '"vector": {"token": value, ...}}\n'. tokens: token_fields(vocab);
    values: int_fields or float_fields."""
    table, lengths = tokens
    names = table[matrix.indices]
    name_keep = np.arange(table.shape[1]) < lengths[matrix.indices][:, None]
    digits, digit_keep = values(matrix.data)
    comma = np.tile(np.frombuffer(b", ", dtype=np.uint8), (matrix.nnz, 1))
    comma_keep = np.ones(comma.shape, dtype=bool)
    ends = matrix.indptr[1:][np.diff(matrix.indptr) > 0] - 1
    comma_keep[ends] = False  # no comma after a row's last pair
    keep = np.hstack([name_keep, digit_keep, comma_keep])
    pairs = np.hstack([names, digits, comma])[keep].tobytes()
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])[matrix.indptr].tolist()
    return [b'%s"vector": {%s}}\n' % (head, pairs[offsets[row] : offsets[row + 1]]) for row, head in enumerate(heads)]


def export(docs, queries, vocab: list[str], out: Path, fmt: str) -> float:
    """Write the files; return documents per second (from the cache: no encoding)."""
    out.mkdir(parents=True, exist_ok=True)
    tokens = token_fields(vocab)
    started, written, part, file_no, lines = time.perf_counter(), 0, None, 0, 0
    ids = [json.dumps(d) for d in docs.doc_ids]
    handle = None
    for shard in docs.shards:
        matrix = sp.load_npz(shard).tocsr()
        matrix.sort_indices()
        rows = range(written, written + matrix.shape[0])
        if fmt == "anserini":
            heads = [f'{{"id": {ids[r]}, "contents": "", '.encode() for r in rows]
            block = vector_lines(quantize(matrix), tokens, heads, int_fields)
        else:
            matrix.eliminate_zeros()
            heads = [f'{{"id": {r}, "content": "", '.encode() for r in rows]
            block = vector_lines(matrix, tokens, heads, float_fields)
        while block:
            if handle is None or (fmt == "anserini" and lines == LINES_PER_FILE):
                if handle:
                    handle.close()
                    part.__exit__(None, None, None)
                name = f"docs-{file_no:05d}.jsonl" if fmt == "anserini" else "docs.jsonl"
                part = atomic_path(out / name)
                handle, lines, file_no = open(part.__enter__(), "wb"), 0, file_no + 1
            room = LINES_PER_FILE - lines if fmt == "anserini" else len(block)
            handle.write(b"".join(block[:room]))
            lines += len(block[:room])
            block = block[room:]
        written += matrix.shape[0]
    if handle:
        handle.close()
        part.__exit__(None, None, None)
    rate = written / max(time.perf_counter() - started, 1e-9)
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
            (out / "queries.jsonl").write_bytes(b"".join(vector_lines(vectors, tokens, heads, float_fields)))
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
