"""encoding: our SPLADE vectors equal sentence-transformers' SparseEncoder's, row for row, and the
document-vector cache is reused only when nothing it depends on changed."""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sentence_transformers import SparseEncoder

import encoding
from conftest import BEIR

MAX_SEQ_LENGTH = 128


def cisi_texts(n):
    with open(BEIR / "cisi" / "corpus.jsonl") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


@pytest.mark.slow  # loads splade-tiny twice (ours and sentence-transformers')
def test_encode_equals_sparse_encoder_in_input_order(splade_tiny_path):
    texts = cisi_texts(7) + ["what is information retrieval", "a"]
    model = encoding.load_model(splade_tiny_path, max_seq_length=MAX_SEQ_LENGTH)
    ours = encoding.encode(
        model, texts, batch_size=3, device=torch.device("cpu"), precision="fp32", show_progress=False
    )
    reference = SparseEncoder(splade_tiny_path, device="cpu")
    reference.max_seq_length = MAX_SEQ_LENGTH
    expected = reference.encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False).numpy()
    assert isinstance(ours, sp.csr_matrix) and ours.shape == expected.shape
    np.testing.assert_allclose(ours.toarray(), expected, atol=1e-5, rtol=0)
    assert ours.nnz == (expected > 0).sum()


def test_document_vectors_are_cached_and_keyed_by_max_seq_length(splade_tiny_path, tmp_path):
    corpus = tmp_path / "collection.tsv"
    texts = cisi_texts(10)
    corpus.write_text("".join(f"{i}\t{text}\n" for i, text in enumerate(texts)))
    model = encoding.load_model(splade_tiny_path, max_seq_length=64)
    args = ("fingerprint", tmp_path / "cache", 4, torch.device("cpu"), "fp32")
    first = encoding.document_vectors(corpus, model, *args, show_progress=False)
    again = encoding.document_vectors(corpus, model, *args, show_progress=False)
    assert not first.cached and again.cached and again.doc_ids == first.doc_ids == [str(i) for i in range(10)]
    vectors = sp.load_npz(again.shards[0])
    expected = encoding.encode(model, texts, 4, torch.device("cpu"), "fp32", show_progress=False)
    np.testing.assert_array_equal(vectors.toarray(), expected.toarray())
    assert not list((tmp_path / "cache").rglob("*.part*"))  # every file was written atomically
    model.max_seq_length = 32
    assert not encoding.document_vectors(corpus, model, *args, show_progress=False).cached


def test_a_model_that_cannot_load_is_a_user_error_but_a_type_error_keeps_its_traceback(tmp_path, monkeypatch):
    with pytest.raises(encoding.ModelError, match="no-such-folder"):
        encoding.load_model(tmp_path / "no-such-folder")
    import splade_module

    def buggy(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(splade_module, "load_splade", buggy)
    with pytest.raises(TypeError, match="a bug"):  # not a ModelError: errors.UserError would hide the traceback
        encoding.load_model(tmp_path)


def test_each_rank_reads_only_the_texts_it_encodes(splade_tiny_path, tmp_path, monkeypatch):
    corpus = tmp_path / "collection.tsv"
    texts = cisi_texts(10)
    corpus.write_text("".join(f"{i}\t{text}\n" for i, text in enumerate(texts)))
    model = encoding.load_model(splade_tiny_path, max_seq_length=64)
    args = ("fingerprint", tmp_path / "cache", 4, torch.device("cpu"), "fp32")
    monkeypatch.setattr(encoding, "SHARD_SIZE", 3)  # shards 0-2, 3-5, 6-8, 9: rank 1 of 2 encodes 3-5 and 9
    encoded, encode = [], encoding.encode
    monkeypatch.setattr(
        encoding, "encode", lambda model, t, *a, **k: encoded.append(list(t)) or encode(model, t, *a, **k)
    )
    read, read_corpus = [], encoding.read_corpus
    monkeypatch.setattr(encoding, "read_corpus", lambda *a, **k: read.append(read_corpus(*a, **k)) or read[-1])
    assert encoding.document_vectors(corpus, model, *args, rank=1, world_size=2, show_progress=False) is None
    assert encoded == [texts[3:6], texts[9:]]
    assert [t for t in read[0][1] if t] == texts[3:6] + texts[9:]  # the other texts were never held
    docs = encoding.document_vectors(corpus, model, *args, rank=0, world_size=2, show_progress=False)
    assert encoded[2:] == [texts[0:3], texts[6:9]] and docs.doc_ids == [str(i) for i in range(10)]
    vectors = sp.vstack([sp.load_npz(shard) for shard in docs.shards])
    expected = encode(model, texts, 4, torch.device("cpu"), "fp32", show_progress=False)
    np.testing.assert_array_equal(vectors.toarray(), expected.toarray())
