"""Peak memory and time of reading the cross-encoder scores and of preparing the training data, on synthetic files.

    python bench/bench_memory.py --ce-only --queries 100000   # ~23M scores: unpickling vs the opcode walk
    python bench/bench_memory.py                              # 500k queries, 8 systems x 50 negatives, 2.2M passages
    python bench/bench_memory.py --queries 50000 --passages 220000   # a tenth, in a minute

Writes the training files in a temporary folder in the real formats (the CE-scores pickle is written opcode by
opcode, as CPython's pickler writes it at protocol 4, so building it needs no memory; `--score-type float32`
writes NumPy float32 scalars, as a cross-encoder's predict returns them). Then, each in a fresh process:
`unpickle` (pickle.load and the dict turned into CSR arrays: what reading the scores cost before
data.ce_pickle) and `walk` (data.ce_scores.read_scores_pickle_gz) read the pickle; the two must give the same
arrays; their peak RSS, time and ratios are printed. Without --ce-only the files are then mined: `max` (first
run: reads the scores, writes the .npz scores cache and the mined-set cache), `max` again (maps the mined set) and
`distill` (mines, from the scores cache), each also building the 30-epoch dataset.
"""

import argparse
import gzip
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402

WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be or has had not first "
    "one their its new after who they two her she been other when there all during into school time may years more "
    "most only over city some world would where later up such used many can state about national out known university "
    "united then made water system light river heat body blood cell food energy price cost average rate year day "
    "month number percent people health disease symptoms treatment doctor cause pain skin weight diet protein sugar "
    "salary income tax pay money bank account loan credit insurance company business market service product online"
).split()


def write_collection(path, n, rng, words=(8, 14)):
    # Passages of five sentences of `words` words (the default gives ~290 characters; (10, 15) MS MARCO's ~335),
    # drawn from a pool of sentences for speed.
    sentences = [" ".join(rng.choice(WORDS, size=rng.integers(*words))) + "." for _ in range(20_000)]
    with open(path, "w") as f:
        for start in tqdm(range(0, n, 100_000), desc="collection.tsv"):
            picks = rng.integers(0, len(sentences), size=(min(100_000, n - start), 5))
            f.writelines(f"{start + i}\t{' '.join(sentences[j] for j in row)}\n" for i, row in enumerate(picks))


def write_queries(path, qids, rng):
    with open(path, "w") as f:
        f.writelines(f"{q}\twhat is the {' '.join(rng.choice(WORDS, size=4))}\n" for q in qids.tolist())


# How CPython's pickler (protocol 4) writes np.float32 scores: the first one defines the reconstructor and the
# dtype (memo entries 4 and 10 once the outer dict, the first row and their MEMOIZEs come before), later ones
# refer back to them. Every bytes, tuple and scalar is memoized, as the pickler does.
FLOAT32_FIRST = (
    b"\x8c\x16numpy._core.multiarray\x94\x8c\x06scalar\x94\x93\x94\x8c\x05numpy\x94\x8c\x05dtype\x94\x93\x94"
    b"\x8c\x02f4\x94\x89\x88\x87\x94R\x94(K\x03\x8c\x01<\x94NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00t\x94b"
)
FLOAT32_LATER = b"h\x04h\n"


def score_records(pids, scores, score_type, first):
    """The opcodes of `pid: score` pairs: BININT pid, then BINFLOAT or a NumPy float32 scalar."""
    if score_type == "float":
        rec = np.zeros(len(pids), dtype=[("J", "u1"), ("pid", "<i4"), ("G", "u1"), ("score", ">f8")])
        rec["J"], rec["pid"], rec["G"], rec["score"] = ord("J"), pids, ord("G"), scores
        return rec.tobytes()
    fields = [("J", "u1"), ("pid", "<i4"), ("get", "S4"), ("C", "S2"), ("bytes", "<f4"), ("tail", "S5")]
    rec = np.zeros(len(pids), dtype=fields)
    rec["J"], rec["pid"], rec["get"], rec["C"] = ord("J"), pids, FLOAT32_LATER, b"C\x04"
    rec["bytes"], rec["tail"] = scores, b"\x94\x86\x94R\x94"
    blob = rec.tobytes()
    return blob[:5] + FLOAT32_FIRST + blob[9:] if first else blob


def write_scores(ce, qids, rows, score_type):
    """The pickle {qid: {pid: score}} of (pids, scores) rows, SETITEMS in batches of 1000 as the pickler does."""
    ce.write(b"\x80\x04}\x94")  # PROTO 4, EMPTY_DICT, MEMOIZE
    for start in range(0, len(qids), 1000):
        ce.write(b"(")  # MARK
        for i, qid in enumerate(qids[start : start + 1000].tolist()):
            pids, scores = next(rows)
            records = score_records(pids, scores, score_type, first=start == i == 0)
            ce.write(b"J" + struct.pack("<i", qid) + b"}\x94(" + records + b"u")
        ce.write(b"u")  # SETITEMS into the outer dict
    ce.write(b".")  # STOP


def write_hard_negatives_and_scores(hn_path, ce_path, qids, args, rng):
    """Each query: 1 positive; each system ranks 50 of a shared pool of `candidates` passages, as real
    retrievers overlap. The CE pickle scores the positive and every mined negative (~160M pairs on the
    real file)."""
    names = [f"system-{k}" for k in range(args.systems)]
    pairs = 0

    def rows():
        nonlocal pairs
        for qid in tqdm(qids.tolist(), desc="hard negatives + CE scores", mininterval=5):
            pool = rng.integers(0, args.passages, size=args.candidates)
            ranked = [pool[rng.permutation(args.candidates)[: args.negs]] for _ in names]
            pos = int(rng.integers(0, args.passages))
            if hn:
                neg = ", ".join(f'"{s}": [{", ".join(map(str, r.tolist()))}]' for s, r in zip(names, ranked))
                hn.write(f'{{"qid": {qid}, "pos": [{pos}], "neg": {{{neg}}}}}\n')
            scored = np.unique(np.concatenate([[pos], *ranked]))
            pairs += len(scored)
            yield scored, np.where(scored == pos, 8.0, rng.normal(-2.0, 3.0, size=len(scored)))  # logits

    with gzip.open(ce_path, "wb", compresslevel=1) as ce:
        hn = None if hn_path is None else gzip.open(hn_path, "wt", compresslevel=1)
        write_scores(ce, qids, rows(), args.score_type)
        if hn:
            hn.close()
    return pairs


CE_FILE = "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz"
RESULT = """
usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds: what a busy machine distorts least
print("RESULT " + json.dumps({"seconds": round(time.time() - t, 1), **result, "cpu_s_incl_import": round(
      usage.ru_utime + usage.ru_stime, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024)}))
"""
READ_CE = (
    """
import gzip, hashlib, json, pickle, resource, sys, time
import numpy as np
t = time.time()
if sys.argv[2] == "walk":
    import io
    from data.ce_pickle import read_scores_pickle
    from data.ce_scores import read_scores_pickle_gz
    # numba compiles the walker once per install (cached in __pycache__): timed apart from the reading
    read_scores_pickle(io.BytesIO(pickle.dumps({1: {2: np.float32(1)}})), "warm-up", 1)
    compile_s, t = round(time.time() - t, 1), time.time()
    ce = read_scores_pickle_gz(sys.argv[1])
    arrays = (ce.qids, ce.ptr, ce.pids, ce.scores)
else:  # what loading cost before data.ce_pickle: unpickle (our own synthetic file), then dict -> CSR arrays
    with gzip.open(sys.argv[1]) as f:
        scores = pickle.load(f)
    qids = sorted(scores)
    ptr = np.cumsum([0] + [len(scores[q]) for q in qids])
    pids, values = np.empty(ptr[-1], dtype=np.int32), np.empty(ptr[-1], dtype=np.float32)
    for r, q in enumerate(qids):
        row = scores.pop(q)
        keys = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
        order = np.argsort(keys, kind="stable")
        pids[ptr[r] : ptr[r + 1]] = keys[order]
        values[ptr[r] : ptr[r + 1]] = np.fromiter(map(float, row.values()), dtype=np.float64, count=len(row))[order]
    arrays = (np.array(qids, dtype=np.int64), ptr.astype(np.int64), pids, values)
digest = hashlib.sha256(b"".join(a.dtype.str.encode() + a.tobytes() for a in arrays)).hexdigest()[:16]
result = {"scores": len(arrays[2]), "sha256": digest}
if sys.argv[2] == "walk":
    result["import_compile_s"] = compile_s
"""
    + RESULT
)
MINE = (
    """
import json, resource, sys, time
from data.mining import mine_max_examples, mine_distill_examples
from data.rotation import make_train_dataset
t = time.time()
mine = mine_max_examples if sys.argv[2] == "max" else mine_distill_examples
ts = mine(sys.argv[1], download=False)
ds = make_train_dataset(ts, epochs=30, with_labels=sys.argv[2] == "distill")
ds[0]
result = {"queries": len(ts), "passages": len(ts.passages)}
"""
    + RESULT
)


def run_child(label, script, *argv):
    """Run a child script in a fresh process (its own peak RSS) and return the dict it prints."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{label} failed:\n{out.stderr[-3000:]}")
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(f"{label}: peak RSS {result['peak_rss_mb']:,} MB, {result['seconds']} s, {result}")
    return result


def compare_ce_readers(d, results):
    """Read the scores pickle both ways (no cache); they must agree; print the ratios walk / unpickle."""
    for mode in ("unpickle", "walk"):
        results[mode] = run_child(f"CE scores, {mode}", READ_CE, str(d / CE_FILE), mode)
    old, new = results["unpickle"], results["walk"]
    if old["sha256"] != new["sha256"]:
        sys.exit(f"the two readers disagree: {old} vs {new}")
    print(
        f"walk / unpickle: peak RSS {new['peak_rss_mb'] / old['peak_rss_mb']:.3f}, "
        f"time {new['seconds'] / old['seconds']:.3f}, CPU {new['cpu_s_incl_import'] / old['cpu_s_incl_import']:.3f} "
        f"(same arrays: sha256 {new['sha256']})"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=500_000)
    parser.add_argument("--passages", type=int, default=2_200_000)
    parser.add_argument("--systems", type=int, default=8)
    parser.add_argument("--negs", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=300, help="pool per query the systems draw from")
    parser.add_argument("--score-type", choices=["float", "float32"], default="float32")
    parser.add_argument("--ce-only", action="store_true", help="write only the scores and compare the two readers")
    parser.add_argument("--dir", help="where to write the files (default: a temporary folder, removed after)")
    args = parser.parse_args()

    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="splade-bench-")
    d = Path(args.dir or tmp.name)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = time.time()
    qids = np.sort(rng.choice(1_200_000, size=args.queries, replace=False))
    if not args.ce_only:
        write_collection(d / "collection.tsv", args.passages, rng)
        write_queries(d / "queries.train.tsv", qids, rng)
    hn = None if args.ce_only else d / "msmarco-hard-negatives.jsonl.gz"
    pairs = write_hard_negatives_and_scores(hn, d / CE_FILE, qids, args, rng)
    sizes = {p.name: round(p.stat().st_size / 2**20) for p in d.iterdir()}
    print(f"files written in {time.time() - t:.0f} s: {sizes} MB; {pairs:,} CE scores")

    results = {"config": vars(args) | {"ce_scores": pairs, "file_mb": sizes}}
    compare_ce_readers(d, results)
    if not args.ce_only:
        for label, mode in [
            ("max (first run: reads the scores, mines, writes both caches)", "max"),
            ("max (mined-set cache)", "max"),
            ("distill (mines, from the scores cache)", "distill"),
        ]:
            results[label] = run_child(label, MINE, str(d), mode)
    print(json.dumps(results, indent=2))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
