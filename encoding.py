"""Texts to SPLADE vectors: load a model, encode texts into a CSR matrix, and keep a corpus's
document vectors on disk (sharded, keyed by everything they depend on) so that a model is
encoded once however often it is evaluated.

    load_model(path_or_model)          our SpladeMax SparseEncoder (splade_module.load_splade)
    encode(model, texts, ...)          CSR matrix, one row per text, in input order
    document_vectors(corpus_file, ...) DocVectors: the shard files and document ids of a corpus
    model_on_device, Encoder           a model ready to encode, and the settings encoding takes, in one object
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

from data.atomic import atomic_path, write_text_atomic
from data.readers import read_corpus
from errors import UserError

# Documents per cached shard: bounds the memory of one encoding step and of index building, and
# is the unit of resuming and of splitting work between GPUs.
SHARD_SIZE = 100_000
CACHE_FORMAT = 1
# How long the first process waits without a new shard from the others before it gives up (a rank died or hangs):
# the trainer's ddp_timeout default. One shard (100k passages) takes about a minute on a GPU.
SHARD_TIMEOUT = 1800.0


class ModelError(UserError):
    """The model cannot be loaded, or cannot run in the precision asked for."""


def log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def load_model(model_or_path, max_seq_length: int | None = None):
    """Our SPLADE encoder (a SparseEncoder whose one module computes the chunked max-then-activate head)."""
    if isinstance(model_or_path, torch.nn.Module):
        return model_or_path
    from splade_module import load_splade

    try:
        return load_splade(str(model_or_path), max_seq_length=max_seq_length)
    except (OSError, ValueError) as error:  # a TypeError is a bug: it keeps its traceback
        raise ModelError(f"model {model_or_path}: {error}") from None


def model_fingerprint(model_or_path, model) -> str:
    """What the cached document vectors depend on: a saved model's weight files (path, size,
    mtime), else a hash of the weights themselves (in-memory models, hub ids)."""
    path = Path(str(model_or_path))
    if not isinstance(model_or_path, torch.nn.Module) and path.is_dir():
        # Weights, configs and tokenizer files at the top level (not checkpoint-* folders or outputs).
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".json", ".txt", ".model")
        )
        stamp = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return hashlib.sha256(json.dumps([str(path.resolve()), stamp]).encode()).hexdigest()
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gpu_computes_bf16(device: torch.device | None = None) -> bool:
    """Whether the GPU has bf16 matrix units (compute capability >= 8: Ampere and later). Not
    `torch.cuda.is_bf16_supported()`, which also says yes on V100 and T4 (7.x), where bf16 is emulated and its
    matrix products run many times slower than fp16."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 on a GPU that computes it natively, fp16 on an older GPU, fp32 on a CPU."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if gpu_computes_bf16(device) else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ModelError("--precision fp16 needs a GPU; use fp32 or bf16 on a CPU")
    return precision


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def encode(
    model,
    texts: list[str],
    batch_size: int,
    device: torch.device,
    precision: str,
    desc: str = "encode",
    show_progress: bool = True,
) -> sp.csr_matrix:
    """SPLADE vectors of texts as a CSR matrix (rows in input order). Texts go longest first, so
    batches need little padding (and a too large batch fails at once, not after hours)."""
    order = np.argsort([-len(text) for text in texts], kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    nnz_per_row, columns, values = [], [], []
    # Tokenise the next batch on a second thread while the model runs on this one.
    with ThreadPoolExecutor(max_workers=1) as tokenizer_thread, torch.inference_mode(), autocast(device, precision):
        tokenize = lambda rows: model.preprocess([texts[i] for i in rows])  # noqa: E731
        pending = tokenizer_thread.submit(tokenize, batches[0]) if batches else None
        for b in tqdm(range(len(batches)), desc=desc, unit="batch", disable=not show_progress, mininterval=2):
            features = pending.result()
            if b + 1 < len(batches):
                pending = tokenizer_thread.submit(tokenize, batches[b + 1])
            features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in features.items()}
            vectors = model(features)["sentence_embedding"].float()
            rows, cols = vectors.nonzero(as_tuple=True)  # row-major order, as CSR wants it
            nnz_per_row.append(torch.bincount(rows, minlength=len(vectors)).cpu().numpy())
            columns.append(cols.to(torch.int32).cpu().numpy())
            values.append(vectors[rows, cols].cpu().numpy())
    vocab = vectors.shape[1]
    indptr = np.zeros(len(texts) + 1, dtype=np.int64)
    if texts:
        np.cumsum(np.concatenate(nnz_per_row), out=indptr[1:])
    sorted_rows = sp.csr_matrix(
        (
            np.concatenate(values) if values else np.zeros(0, np.float32),
            np.concatenate(columns) if columns else np.zeros(0, np.int32),
            indptr,
        ),
        shape=(len(texts), vocab),
    )
    return sorted_rows[np.argsort(order)]


@dataclass
class DocVectors:
    shards: list[Path]
    doc_ids: list[str]
    encode_seconds: float  # spent in this call (0 when everything came from the cache)
    cached: bool


class ShardsMissing(UserError):
    """Other ranks did not deliver their document-vector shards in time."""


def wait_for_shards(
    paths: list[Path], timeout: float = SHARD_TIMEOUT, world_size: int = 1, poll_seconds: float = 10.0
) -> None:
    """Rank 0 waits for the shards other ranks write (each appears atomically when complete, shard i from rank
    i % world_size). It gives up when no shard has appeared for `timeout` seconds, naming the missing ones."""
    missing = [p for p in paths if not p.is_file()]
    last_progress = time.monotonic()
    with tqdm(
        total=len(paths), initial=len(paths) - len(missing), desc="shards from other ranks", disable=not missing
    ) as bar:
        while missing:
            waited = time.monotonic() - last_progress
            if waited >= timeout:
                names = ", ".join(f"{p.name} (rank {paths.index(p) % world_size})" for p in missing[:8])
                raise ShardsMissing(
                    f"gave up after {waited:.0f} s without a new shard from the other processes: {len(missing)} of "
                    f"{len(paths)} missing in {missing[0].parent}: {names}{' ...' if len(missing) > 8 else ''}. "
                    "The process that writes them died or hangs. The finished shards are kept: run the same command "
                    "again and only the missing ones are encoded (a process that is only slow: raise --shard_timeout)"
                )
            time.sleep(min(poll_seconds, timeout - waited))
            still = [p for p in missing if not p.is_file()]
            if len(still) < len(missing):
                last_progress = time.monotonic()
            bar.update(len(missing) - len(still))
            missing = still


def cache_directory(corpus_file: Path, model, fingerprint: str, cache_root: Path, precision: str) -> Path:
    """The folder of a corpus's vectors, named by a hash of everything they depend on."""
    stat = corpus_file.stat()
    key = {
        "format": CACHE_FORMAT,
        "model": fingerprint,
        "corpus": [str(corpus_file.resolve()), stat.st_size, stat.st_mtime_ns],
        "max_seq_length": model.max_seq_length,
        "precision": precision,
        "shard_size": SHARD_SIZE,
    }
    directory = cache_root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    if not (directory / "key.json").is_file():
        write_text_atomic(directory / "key.json", json.dumps(key, indent=2))  # for a person inspecting the cache
    return directory


def document_vectors(
    corpus_file: Path,
    model,
    fingerprint: str,
    cache_root: Path,
    batch_size: int,
    device: torch.device,
    precision: str,
    rank: int = 0,
    world_size: int = 1,
    show_progress: bool = True,
    shard_timeout: float = SHARD_TIMEOUT,
) -> DocVectors | None:
    """Encode a corpus into shard files under a directory named by everything the vectors depend
    on, skipping shards already there. Returns None on ranks other than 0."""
    directory = cache_directory(corpus_file, model, fingerprint, cache_root, precision)
    manifest = directory / "manifest.json"
    if manifest.is_file():
        if rank != 0:
            return None
        info = json.loads(manifest.read_text())
        doc_ids = json.loads((directory / "doc_ids.json").read_text(encoding="utf-8"))
        log(f"document vectors of {corpus_file.name} from the cache: {directory}")
        return DocVectors([directory / name for name in info["shards"]], doc_ids, 0.0, True)

    # Each rank holds the texts of its own shards only (the ids of all: rank 0 writes them).
    mine = None if world_size == 1 else lambda k: (k // SHARD_SIZE) % world_size == rank
    doc_ids, texts = read_corpus(corpus_file, keep=mine)
    shards = [directory / f"docs-{i:05d}.npz" for i in range(math.ceil(len(texts) / SHARD_SIZE))]
    started = time.perf_counter()
    for i, shard in enumerate(shards):
        if i % world_size != rank or shard.is_file():
            continue
        vectors = encode(
            model,
            texts[i * SHARD_SIZE : (i + 1) * SHARD_SIZE],
            batch_size,
            device,
            precision,
            desc=f"encode {corpus_file.name} [{i + 1}/{len(shards)}]",
            show_progress=show_progress,
        )
        with atomic_path(shard) as part:  # a shard file exists only once complete: ranks and resumes rely on it
            sp.save_npz(part, vectors, compressed=False)  # float weights barely compress; loading is faster
    encode_seconds = time.perf_counter() - started
    if rank != 0:
        return None
    wait_for_shards(shards, shard_timeout, world_size)
    write_text_atomic(directory / "doc_ids.json", json.dumps(doc_ids))
    # The manifest is written last: its presence means the whole cache entry is complete.
    write_text_atomic(manifest, json.dumps({"num_docs": len(doc_ids), "shards": [p.name for p in shards]}))
    return DocVectors(shards, doc_ids, encode_seconds, False)


@dataclass
class Encoder:
    """What encoding needs besides the texts: one object instead of nine arguments."""

    model: torch.nn.Module
    fingerprint: str
    cache_root: Path
    batch_size: int
    device: torch.device
    precision: str
    rank: int
    world_size: int
    show_progress: bool
    shard_timeout: float = SHARD_TIMEOUT

    def documents(self, corpus_file: Path):
        """The corpus's DocVectors (from the cache when there); None on ranks other than 0."""
        return document_vectors(
            corpus_file,
            self.model,
            self.fingerprint,
            self.cache_root,
            self.batch_size,
            self.device,
            self.precision,
            self.rank,
            self.world_size,
            self.show_progress,
            self.shard_timeout,
        )

    def texts(self, texts: list[str], desc: str) -> sp.csr_matrix:
        return encode(
            self.model, texts, self.batch_size, self.device, self.precision, desc=desc, show_progress=self.show_progress
        )


@contextlib.contextmanager
def model_on_device(model, max_seq_length: int | None, device: str | None):
    """The model in eval mode on the device (under torchrun: this rank's GPU); put back as it was after."""
    saved_training, saved_length = model.training, model.max_seq_length
    original_device = next(model.parameters()).device
    if max_seq_length:
        model.max_seq_length = max_seq_length
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model.to(device).eval()
    try:
        yield device
    finally:
        model.to(original_device).train(saved_training)
        model.max_seq_length = saved_length
