"""Ours beside the peer engines on the same vectors (`bench_retrieval.py --peers`): build seconds, index bytes, ms per
query at top-10 and top-1000 (1 and 2 threads where the engine has threads), and agreement with our exact top k.

- ours: retrieval.search, exact over the float32 weights (numba threads: queries spread over them);
- bmp: Block-Max Pruning at alpha = beta = 1 (exact over its own quantization: weights x 100 as integers, then its
  8-bit impacts), one query per call from Python: one thread;
- seismic: its README's build, with every thread given (its summaries take minutes); two search settings, the
  fastest of a small query_cut x heap_factor grid reaching ~90 % and ~97 % recall@10 of our exact top 10 (the grid
  is printed).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numba

import retrieval
from retrieval.peers import BmpEngine, SeismicEngine

TARGETS = {"seismic ~90%": 0.90, "seismic ~97%": 0.97}
GRID = [dict(query_cut=c, heap_factor=h) for c in (5, 10, 20, 40) for h in (0.7, 0.8, 0.9, 1.0)]


def recall_of_exact(result, exact, k: int) -> float:
    """Share of our exact top k (per query, as many as it found) that the engine's top k holds."""
    found = total = 0
    for q in range(len(exact.num_hits)):
        n = min(k, int(exact.num_hits[q]))
        ours = set(exact.doc_index[q, :n].tolist())
        found += len(ours & set(result.doc_index[q, :k].tolist()))
        total += n
    return found / max(total, 1)


def _timed(search, queries) -> tuple[object, float]:
    started = time.perf_counter()
    result = search()
    return result, (time.perf_counter() - started) / queries.shape[0] * 1e3


def _folder_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def tune_seismic(engine: SeismicEngine, index, queries, exact10) -> dict[str, dict]:
    """The fastest grid setting reaching each target recall@10 (or the most accurate one), one thread."""
    engine.num_threads, measured = 1, []
    for setting in GRID:
        if setting:
            engine.setting = setting
        result, ms = _timed(lambda: engine.search(index, queries, 10), queries)
        measured.append((setting, recall_of_exact(result, exact10, 10), ms))
        print(f"  seismic {setting}: recall@10 {measured[-1][1]:.3f}, {ms:.2f} ms/query (1 thread)")
    chosen = {}
    for name, target in TARGETS.items():
        reaching = [m for m in measured if m[1] >= target]
        chosen[name] = min(reaching, key=lambda m: m[2])[0] if reaching else max(measured, key=lambda m: m[1])[0]
    return chosen


def peer_rows(index, queries, build_s=None, threads=(1, 2)) -> list[dict]:
    """One row per engine: build_s, index_bytes, ms/query per (k, threads), recall@10 and @1000 of our exact top k."""
    ks, default_threads = (10, 1000), numba.get_num_threads()
    exact, rows = {}, []
    ours = {"engine": "ours (exact)", "build_s": build_s, "index_bytes": index.nbytes}
    for n in threads:
        numba.set_num_threads(n)
        retrieval.search(index, queries[:2], k=10)  # compiles once (numba's cache keeps it)
        for k in ks:
            exact[k], ours[f"ms@{k}/{n}t"] = _timed(lambda k=k: retrieval.search(index, queries, k=k), queries)
    numba.set_num_threads(default_threads)
    ours.update({f"recall@{k}": 1.0 for k in ks})
    rows.append(ours)

    bmp = BmpEngine(directory=tempfile.mkdtemp(prefix="bench-bmp-"))
    started = time.perf_counter()
    bmp.build(index)
    row = {"engine": "bmp (alpha=beta=1)", "build_s": time.perf_counter() - started}
    row["index_bytes"] = os.path.getsize(bmp.path)
    for k in ks:
        result, row[f"ms@{k}/1t"] = _timed(lambda k=k: bmp.search(index, queries, k), queries)
        row[f"recall@{k}"] = recall_of_exact(result, exact[k], k)
    rows.append(row)

    seismic = SeismicEngine(num_threads=max(threads))  # its build is the slow part: built with every thread
    started = time.perf_counter()
    built = seismic.build(index)
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="bench-seismic-") as folder:
        built.save(os.path.join(folder, "index"))
        seismic_bytes = _folder_bytes(folder)
    for name, setting in tune_seismic(seismic, index, queries, exact[10]).items():
        row = {"engine": f"{name} {setting}", "build_s": build_s, "index_bytes": seismic_bytes}
        seismic.setting = setting
        for n in threads:
            seismic.num_threads = n
            for k in ks:
                result, row[f"ms@{k}/{n}t"] = _timed(lambda k=k: seismic.search(index, queries, k), queries)
                row[f"recall@{k}"] = recall_of_exact(result, exact[k], k)
        rows.append(row)
    return rows


def print_table(rows: list[dict], title: str) -> None:
    columns = [c for c in rows[0] if c != "engine"] + sorted({c for r in rows for c in r} - set(rows[0]))
    print(f"\n{title}\n| engine | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append(
                "–" if v is None else f"{v / 2**20:,.0f} MB" if c == "index_bytes"
                else f"{v:.3f}" if c.startswith(("recall", "ndcg")) else f"{v:,.2f}"
            )  # fmt: skip
        print(f"| {row['engine']} | " + " | ".join(cells) + " |")


def beir_rows(model_path: str, folder: str, cache_dir: str) -> list[dict]:
    """A real corpus: encode it with the model (evaluate.py's cache), then every engine's nDCG@10 and R@1k on the
    qrels, its agreement with our exact top k and its ms/query (one thread), exactly as evaluate.py scores them."""
    import evaluate
    from encoding import Encoder, load_model, model_fingerprint, model_on_device, resolve_precision

    [eval_set] = evaluate.eval_sets_of([folder], None, Path(cache_dir), "test", False, False)
    model = load_model(model_path, None)
    with model_on_device(model, None, None) as device:
        fingerprint = model_fingerprint(model_path, model)
        encoder = Encoder(model, fingerprint, Path(cache_dir) / "doc_vectors", 64, device,
                          resolve_precision("auto", device), 0, 1, True)  # fmt: skip
        docs = encoder.documents(eval_set.corpus_file)
        queries = encoder.texts(list(eval_set.queries.values()), desc="encode queries")
    index = retrieval.build_index(docs.shards)
    ties = retrieval.trec_tie_ranks(docs.doc_ids)
    numba.set_num_threads(1)

    def scored(name, engine, k=1000):
        metrics, result = evaluate.evaluate_on_index(eval_set, index, docs.doc_ids, ties, queries, k, False, engine)
        row = {"engine": name, "ndcg@10": metrics["ndcg@10"], "R@1k": metrics["recall@1000"]}
        row["ms/query"] = metrics["search_seconds"] / queries.shape[0] * 1e3
        return row, result

    ours, exact = scored("ours (exact)", None)
    bmp = BmpEngine(directory=tempfile.mkdtemp(prefix="bench-bmp-"))
    bmp.build(index)  # built before the timed searches, as ours is
    engines = [("bmp (alpha=beta=1)", bmp, None)]
    seismic = SeismicEngine(num_threads=1)
    exact10 = retrieval.search(index, queries, k=10, tie_ranks=ties)
    for name, setting in tune_seismic(seismic, index, queries, exact10).items():  # builds it
        engines.append((f"{name} {setting}", seismic, setting))
    rows = [ours]
    for name, engine, setting in engines:
        if setting:
            engine.setting = setting
        row, found = scored(name, engine)
        row.update({f"recall@{k}": recall_of_exact(found, exact, k) for k in (10, 1000)})
        rows.append(row)
    ours.update({"recall@10": 1.0, "recall@1000": 1.0})
    print(f"{eval_set.name}: {index.num_docs:,} documents, {queries.shape[0]:,} queries, "
          f"FLOPS {retrieval.flops_statistic(queries, index):.2f}")  # fmt: skip
    return rows
