"""Peak memory of preparing the training data, on synthetic files of realistic size.

    python -m data.bench_memory                       # 500k queries, 8 systems x 50 negatives, 2.2M passages
    python -m data.bench_memory --queries 50000 --passages 220000   # a tenth, in a minute

Writes the four training files in a temporary folder (the real formats; the CE-scores pickle is
written opcode by opcode, so building it needs no memory), then mines them in fresh processes and
prints each one's peak RSS: `max` (first run: unpickles the scores and writes the .npz cache), `max`
again (from the cache) and `distill` (from the cache). Each process also builds the 30-epoch dataset.
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

WORDS = (
    "the of and to in is was for on that with as by at from his an were are which this be or has had not first "
    "one their its new after who they two her she been other when there all during into school time may years more "
    "most only over city some world would where later up such used many can state about national out known university "
    "united then made water system light river heat body blood cell food energy price cost average rate year day "
    "month number percent people health disease symptoms treatment doctor cause pain skin weight diet protein sugar "
    "salary income tax pay money bank account loan credit insurance company business market service product online"
).split()


def write_collection(path, n, rng):
    # Passages of ~330 characters (MS MARCO's mean), drawn from a pool of sentences for speed.
    sentences = [" ".join(rng.choice(WORDS, size=rng.integers(8, 14))) + "." for _ in range(20_000)]
    with open(path, "w") as f:
        for start in tqdm(range(0, n, 100_000), desc="collection.tsv"):
            picks = rng.integers(0, len(sentences), size=(min(100_000, n - start), 5))
            f.writelines(f"{start + i}\t{' '.join(sentences[j] for j in row)}\n" for i, row in enumerate(picks))


def write_queries(path, qids, rng):
    with open(path, "w") as f:
        f.writelines(f"{q}\twhat is the {' '.join(rng.choice(WORDS, size=4))}\n" for q in qids.tolist())


def write_hard_negatives_and_scores(hn_path, ce_path, qids, n_passages, systems, negs, candidates, rng):
    """Each query: 1 positive; each system ranks 50 of a shared pool of `candidates` passages, as real
    retrievers overlap. The CE pickle scores the positive and every mined negative (~160M pairs on the
    real file), written as protocol-4 opcodes: {qid: {pid: float}}, SETITEMS in batches of 1000."""
    names = [f"system-{k}" for k in range(systems)]
    pairs = 0
    with gzip.open(hn_path, "wt", compresslevel=1) as hn, gzip.open(ce_path, "wb", compresslevel=1) as ce:
        ce.write(b"\x80\x04}")  # PROTO 4, EMPTY_DICT
        for start in tqdm(range(0, len(qids), 1000), desc="hard negatives + CE scores"):
            ce.write(b"(")  # MARK
            for qid in qids[start : start + 1000].tolist():
                pool = rng.integers(0, n_passages, size=candidates)
                ranked = [pool[rng.permutation(candidates)[:negs]] for _ in names]
                pos = int(rng.integers(0, n_passages))
                neg = ", ".join(f'"{s}": [{", ".join(map(str, r.tolist()))}]' for s, r in zip(names, ranked))
                hn.write(f'{{"qid": {qid}, "pos": [{pos}], "neg": {{{neg}}}}}\n')
                scored = np.unique(np.concatenate([[pos], *ranked]))
                rec = np.zeros(len(scored), dtype=[("J", "u1"), ("pid", "<i4"), ("G", "u1"), ("score", ">f8")])
                rec["J"], rec["pid"], rec["G"] = ord("J"), scored, ord("G")  # BININT pid, BINFLOAT score
                rec["score"] = np.where(scored == pos, 8.0, rng.normal(-2.0, 3.0, size=len(scored)))  # logits
                ce.write(b"J" + struct.pack("<i", qid) + b"}(" + rec.tobytes() + b"u")
                pairs += len(scored)
            ce.write(b"u")  # SETITEMS into the outer dict
        ce.write(b".")  # STOP
    return pairs


CHILD = """
import json, resource, sys, time
from data.mining import mine_max_examples, mine_distill_examples
from data.rotation import make_train_dataset
t = time.time()
mine = mine_max_examples if sys.argv[2] == "max" else mine_distill_examples
ts = mine(sys.argv[1], download=False)
ds = make_train_dataset(ts, epochs=30, with_labels=sys.argv[2] == "distill")
ds[0]
print("RESULT " + json.dumps({"seconds": round(time.time() - t, 1),
      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
      "queries": len(ts), "passages": len(ts.passages)}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=500_000)
    parser.add_argument("--passages", type=int, default=2_200_000)
    parser.add_argument("--systems", type=int, default=8)
    parser.add_argument("--negs", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=300, help="pool per query the systems draw from")
    parser.add_argument("--dir", help="where to write the files (default: a temporary folder, removed after)")
    args = parser.parse_args()

    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="splade-bench-")
    d = Path(args.dir or tmp.name)
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = time.time()
    qids = np.sort(rng.choice(1_200_000, size=args.queries, replace=False))
    write_collection(d / "collection.tsv", args.passages, rng)
    write_queries(d / "queries.train.tsv", qids, rng)
    pairs = write_hard_negatives_and_scores(
        d / "msmarco-hard-negatives.jsonl.gz",
        d / "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz",
        qids,
        args.passages,
        args.systems,
        args.negs,
        args.candidates,
        rng,
    )
    sizes = {p.name: round(p.stat().st_size / 2**20) for p in d.iterdir()}
    print(f"files written in {time.time() - t:.0f} s: {sizes} MB; {pairs:,} CE scores")

    results = {"config": vars(args) | {"ce_scores": pairs, "file_mb": sizes}}
    for label, mode in [
        ("max (unpickle + write cache)", "max"),
        ("max (cache)", "max"),
        ("distill (cache)", "distill"),
    ]:
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
        out = subprocess.run([sys.executable, "-c", CHILD, str(d), mode], env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{label} failed:\n{out.stderr[-3000:]}")
        result = json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))[7:])
        results[label] = result
        print(
            f"{label}: peak RSS {result['peak_rss_mb']:,} MB, {result['seconds']} s, "
            f"{result['queries']:,} queries, {result['passages']:,} passages"
        )
    print(json.dumps(results, indent=2))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
