"""Training examples for train_max.py and train_distill.py, mined as SPEC.md says.

    ts = mine_max_examples("msmarco-data")      # Splade_max: CE-filtered hard negatives
    ts = mine_distill_examples("msmarco-data")  # DistilSplade: hard negatives + CE margins as labels

Memory: passages and query texts live in one utf-8 buffer each (TextTable), ids and scores in numpy
arrays; only the passages and scores the kept examples reference are kept. The mining report (ts.report)
says what was read, kept and dropped, and why.
"""

import json
import math
import resource
import time
from array import array
from collections import Counter
from pathlib import Path

import numpy as np

from data.ce_scores import load_ce_scores
from data.download import CE_SCORES_FILE, COLLECTION, HARD_NEGATIVES_FILE, TRAIN_QUERIES, train_file_paths
from data.readers import iter_hard_negatives, iter_id_text, read_queries


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
    negatives neg[neg_ptr[i]:neg_ptr[i+1]] shuffled once from the seed; both are rows of `passages`."""

    def __init__(self, queries, pos_ptr, pos_idx, pos_ce, neg_ptr, neg_idx, neg_ce, passages, report):
        self.queries = queries  # TextTable: row i = training query i, ids = qids
        self.pos_ptr, self.pos_idx, self.pos_ce = pos_ptr, pos_idx, pos_ce
        self.neg_ptr, self.neg_idx, self.neg_ce = neg_ptr, neg_idx, neg_ce
        self.passages = passages
        self.report = report

    def __len__(self):
        return len(self.queries)

    @property
    def qids(self):
        return self.queries.ids

    def rotation(self, i, epoch):
        """Entries (into pos_idx / neg_idx) that query(s) i take in epoch(s) e: pos[e mod |pos|], neg[e mod |neg|]."""
        i, epoch = np.asarray(i), np.asarray(epoch)
        n_pos = self.pos_ptr[i + 1] - self.pos_ptr[i]
        n_neg = self.neg_ptr[i + 1] - self.neg_ptr[i]
        return self.pos_ptr[i] + epoch % n_pos, self.neg_ptr[i] + epoch % n_neg

    def example(self, i, epoch):
        """(query, positive, negative, label) of query i in epoch `epoch`; label = CE(pos) - CE(neg)."""
        p, n = self.rotation(i, epoch)
        return (
            self.queries.text(i),
            self.passages.text(self.pos_idx[p]),
            self.passages.text(self.neg_idx[n]),
            float(self.pos_ce[p]) - float(self.neg_ce[n]),
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


def mine_max_examples(
    data_dir,
    num_negs_per_system=5,
    negs_to_use=None,
    ce_score_margin=3.0,
    use_all_queries=False,
    seed=42,
    download=True,
):
    """Splade_max examples: for each query, threshold = min CE(positives) - ce_score_margin; from each
    system, in file order, up to num_negs_per_system new negatives whose CE score is <= threshold.

    use_all_queries: a query left without negatives by the filter is kept (the original crashed on it)
    and gets num_negs_per_system random negatives drawn, from the seed, among the other queries' mined
    negatives (never its own positives); the report counts them.
    """
    return _mine(
        data_dir,
        distill=False,
        num_negs_per_system=num_negs_per_system,
        negs_to_use=negs_to_use,
        ce_score_margin=ce_score_margin,
        use_all_queries=use_all_queries,
        max_passages=0,
        seed=seed,
        download=download,
    )


def mine_distill_examples(data_dir, num_negs_per_system=5, negs_to_use=None, max_passages=0, seed=42, download=True):
    """DistilSplade examples: no CE filter; label = CE(pos) - CE(neg); max_passages caps the number of
    training queries (the first ones kept, in file order; 0 = no cap)."""
    return _mine(
        data_dir,
        distill=True,
        num_negs_per_system=num_negs_per_system,
        negs_to_use=negs_to_use,
        ce_score_margin=None,
        use_all_queries=False,
        max_passages=max_passages,
        seed=seed,
        download=download,
    )


def _systems_list(negs_to_use):
    """None (all systems) or the list of system names from a comma string or a list."""
    if negs_to_use is None:
        return None
    if isinstance(negs_to_use, str):
        negs_to_use = negs_to_use.split(",")
    return [s.strip() for s in negs_to_use if s.strip()] or None


def _mine(
    data_dir,
    *,
    distill,
    num_negs_per_system,
    negs_to_use,
    ce_score_margin,
    use_all_queries,
    max_passages,
    seed,
    download,
):
    start = time.time()
    if num_negs_per_system < 1:
        raise ValueError(f"num_negs_per_system must be >= 1, got {num_negs_per_system}")
    paths = train_file_paths(data_dir, download)
    requested = _systems_list(negs_to_use)
    ce = load_ce_scores(paths[CE_SCORES_FILE])
    queries = read_queries(paths[TRAIN_QUERIES])

    dropped, pos_skipped, neg_skipped, per_system = Counter(), Counter(), Counter(), Counter()
    systems_seen = {}  # an ordered set: the union of systems over the file, in first-seen order
    seen_qids = set()
    kept_qids = array("q")
    pos_pids, pos_ce, pos_count = array("i"), array("f"), array("i")
    neg_pids, neg_ce, neg_count = array("i"), array("f"), array("i")
    without_negatives = []  # kept queries that get random negatives (max + use_all_queries)
    read = 0

    for _lineno, qid, pos, neg in iter_hard_negatives(paths[HARD_NEGATIVES_FILE]):
        if max_passages and len(kept_qids) >= max_passages:
            break
        read += 1
        for system in neg:
            systems_seen.setdefault(system, len(systems_seen))
        if qid in seen_qids:
            dropped["qid_repeated_in_file"] += 1
            continue
        seen_qids.add(qid)
        if not pos:
            dropped["no_positive"] += 1
            continue
        if qid not in queries:
            dropped["qid_not_in_queries_file"] += 1
            continue
        scores = ce.row(qid)
        if scores is None:
            dropped["qid_not_in_ce_scores"] += 1
            continue

        positives = list(dict.fromkeys(pos))  # file order, without repeats
        pos_skipped["repeated"] += len(pos) - len(positives)
        if distill:  # each positive needs a CE score for its label
            pairs = [(p, scores[p]) for p in positives if p in scores]
            pos_skipped["no_ce_score"] += len(positives) - len(pairs)
        else:  # CE scores only set the threshold; a positive without one stays a positive
            pairs = [(p, scores.get(p, math.nan)) for p in positives]
            known = [s for _, s in pairs if not math.isnan(s)]
            pos_skipped["no_ce_score_kept"] += len(pairs) - len(known)
            if known:
                threshold = min(known) - ce_score_margin
            else:
                pairs = []
        if not pairs:
            dropped["positives_without_ce_score"] += 1
            continue

        chosen = {}  # pid -> system; a dict keeps the order of choice
        positive_set = set(positives)
        for system in requested or systems_seen:
            added = 0
            for pid in neg.get(system, ()):
                if pid in positive_set:  # never train a positive as a negative
                    neg_skipped["is_a_positive"] += 1
                    continue
                if pid in chosen:
                    neg_skipped["already_chosen"] += 1
                    continue
                score = scores.get(pid)
                if score is None:  # max: cannot rule out a false negative; distill: no label
                    neg_skipped["no_ce_score"] += 1
                    continue
                if not distill and score > threshold:  # likely a false negative
                    neg_skipped["above_ce_threshold"] += 1
                    continue
                chosen[pid] = system
                added += 1
                if added >= num_negs_per_system:
                    break
        if not chosen:
            if distill or not use_all_queries:
                dropped["no_negative_left" if distill else "no_negative_after_ce_filter"] += 1
                continue
            without_negatives.append(len(kept_qids))

        kept_qids.append(qid)
        for p, s in pairs:
            pos_pids.append(p)
            pos_ce.append(s)
        pos_count.append(len(pairs))
        for pid, system in chosen.items():
            neg_pids.append(pid)
            neg_ce.append(scores[pid])
            per_system[system] += 1
        neg_count.append(len(chosen))

    systems_used = [s for s in (requested or systems_seen) if s in systems_seen]
    if requested and len(systems_used) < len(requested):
        missing = [s for s in requested if s not in systems_seen]
        raise ValueError(
            f"negs_to_use names {missing}, which {paths[HARD_NEGATIVES_FILE]} does not have "
            f"(in the {read:,} lines read); its systems: {list(systems_seen)}"
        )
    del ce, seen_qids

    # array.array -> numpy (copies: writable, and the arrays' buffers are released)
    kept_qids, pos_pids, pos_ce, pos_count, neg_pids, neg_ce, neg_count = (
        np.frombuffer(a, dtype=a.typecode).copy()
        for a in (kept_qids, pos_pids, pos_ce, pos_count, neg_pids, neg_ce, neg_count)
    )

    if without_negatives:
        neg_pids, neg_ce, neg_count, no_pool = _add_random_negatives(
            pos_pids, pos_count, neg_pids, neg_ce, neg_count, without_negatives, num_negs_per_system, seed
        )
        dropped["no_negative_and_no_random_pool"] += no_pool

    # Keep only the passages the examples reference: one pass over the collection.
    needed = np.unique(np.concatenate([pos_pids, neg_pids]))
    passages, collection_stats = _load_passages(paths[COLLECTION], needed)

    # Passages missing from the collection: drop them, then the queries left without a positive or a negative.
    pos_q = np.repeat(np.arange(len(kept_qids)), pos_count)
    neg_q = np.repeat(np.arange(len(kept_qids)), neg_count)
    pos_idx, neg_idx = passages.index_of(pos_pids), passages.index_of(neg_pids)
    pos_ok, neg_ok = pos_idx >= 0, neg_idx >= 0
    pos_skipped["not_in_collection"] += int((~pos_ok).sum())
    neg_skipped["not_in_collection"] += int((~neg_ok).sum())
    n_pos = np.bincount(pos_q[pos_ok], minlength=len(kept_qids))
    n_neg = np.bincount(neg_q[neg_ok], minlength=len(kept_qids))
    had_negatives = neg_count > 0  # the others were counted above (no random pool)
    dropped["positives_not_in_collection"] += int(((n_pos == 0) & had_negatives).sum())
    dropped["negatives_not_in_collection"] += int(((n_neg == 0) & (n_pos > 0) & had_negatives).sum())
    keep_query = (n_pos > 0) & (n_neg > 0)
    pos_keep, neg_keep = pos_ok & keep_query[pos_q], neg_ok & keep_query[neg_q]
    renumber = np.cumsum(keep_query) - 1
    pos_q, pos_idx, pos_ce = renumber[pos_q[pos_keep]], pos_idx[pos_keep], pos_ce[pos_keep]
    neg_q, neg_idx, neg_ce = renumber[neg_q[neg_keep]], neg_idx[neg_keep], neg_ce[neg_keep]
    kept_qids = kept_qids[keep_query]
    random_negatives = int(keep_query[without_negatives].sum()) if without_negatives else 0

    # Shuffle each query's negatives once: sort by a hash of (seed, qid, pid), a pure function of the data.
    order = np.lexsort((_hash64(seed, kept_qids[neg_q], passages.ids[neg_idx]), neg_q))
    neg_idx, neg_ce = neg_idx[order], neg_ce[order]

    # Drop the passages that only dropped queries referenced.
    used = np.unique(np.concatenate([pos_idx, neg_idx]))
    if len(used) < len(passages):
        passages = passages.subset(used)
        pos_idx, neg_idx = np.searchsorted(used, pos_idx), np.searchsorted(used, neg_idx)

    query_table = TextTable.from_items((q, queries[q]) for q in kept_qids.tolist())
    del queries
    n = len(kept_qids)
    pos_ptr = np.concatenate([[0], np.cumsum(np.bincount(pos_q, minlength=n))]).astype(np.int64)
    neg_ptr = np.concatenate([[0], np.cumsum(np.bincount(neg_q, minlength=n))]).astype(np.int64)
    neg_per_query = np.diff(neg_ptr)

    report = {
        "script": "train_distill" if distill else "train_max",
        "data_dir": str(data_dir),
        "params": {
            "num_negs_per_system": num_negs_per_system,
            "negs_to_use": requested,
            "ce_score_margin": ce_score_margin,
            "use_all_queries": use_all_queries,
            "max_passages": max_passages,
            "seed": seed,
        },
        "systems_in_file": list(systems_seen),
        "systems_used": systems_used,
        "queries_read": read,
        "queries_kept": n,
        "queries_dropped": dict(sorted((k, v) for k, v in dropped.items() if v)),
        "queries_with_random_negatives": random_negatives,
        "positives": int(len(pos_idx)),
        "positives_skipped": dict(sorted((k, v) for k, v in pos_skipped.items() if v)),
        "negatives": int(len(neg_idx)),
        "negatives_per_system": {s: per_system[s] for s in systems_used},
        "negatives_skipped": dict(sorted((k, v) for k, v in neg_skipped.items() if v)),
        "negatives_per_query": {
            "min": int(neg_per_query.min()) if n else 0,
            "mean": round(float(neg_per_query.mean()), 3) if n else 0.0,
            "max": int(neg_per_query.max()) if n else 0,
        },
        "passages_referenced": len(passages),
        "collection": collection_stats,
        "seconds": round(time.time() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    ts = TrainingSet(query_table, pos_ptr, pos_idx, pos_ce, neg_ptr, neg_idx, neg_ce, passages, report)
    print(ts.format_report())
    if n == 0:
        raise ValueError(f"no training query left in {data_dir}; see the mining report above")
    return ts


def _hash64(seed, a, b):
    """splitmix64-style mix of (seed, a, b), elementwise: a stable pseudo-random key per pair."""

    def mix(x):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

    with np.errstate(over="ignore"):
        s = mix(np.full(1, seed % 2**64, dtype=np.uint64))
        return mix(mix(s ^ np.asarray(a).astype(np.uint64)) ^ np.asarray(b).astype(np.uint64))


def _add_random_negatives(pos_pids, pos_count, neg_pids, neg_ce, neg_count, queries, k, seed):
    """Give each query in `queries` (indexes, which have no negatives) k random negatives drawn from
    the pool of mined negatives, never one of its own positives.

    Returns the new neg arrays and the number of queries left without (empty pool).
    """
    pool = np.unique(neg_pids)
    pos_ptr = np.concatenate([[0], np.cumsum(pos_count)])
    neg_ptr = np.concatenate([[0], np.cumsum(neg_count)])
    rng = np.random.default_rng([seed % 2**63, 1])
    at, values, no_pool = [], [], 0
    for i in queries:
        own = set(pos_pids[pos_ptr[i] : pos_ptr[i + 1]].tolist())
        # Draw k + |own| distinct pool entries and drop the query's own positives: O(k), not O(pool).
        draw = pool[rng.choice(len(pool), size=min(len(pool), k + len(own)), replace=False)] if len(pool) else pool
        picked = [p for p in draw.tolist() if p not in own][:k]
        if not picked:
            no_pool += 1
            continue
        at += [neg_ptr[i]] * len(picked)
        values += picked
        neg_count[i] = len(picked)
    neg_pids = np.insert(neg_pids, at, values).astype(np.int32)
    neg_ce = np.insert(neg_ce, at, np.nan).astype(np.float32)  # no CE score: max training needs none
    return neg_pids, neg_ce, neg_count, no_pool


def _load_passages(path, needed):
    """TextTable of the passages whose ids are in `needed` (sorted unique), in one pass over the collection."""
    # One byte per id up to the largest needed: 0 = not needed, 1 = needed, 2 = taken. A bytearray
    # because indexing it from Python is several times faster than a numpy scalar lookup.
    state = np.zeros(int(needed[-1]) + 1 if len(needed) else 0, dtype=np.uint8)
    state[needed] = 1
    state = bytearray(state.tobytes())
    stats = Counter()

    def wanted_items():
        for pid, text in iter_id_text(path, desc=f"reading {Path(path).name} ({len(needed):,} passages needed)"):
            stats["lines_read"] += 1
            s = state[pid] if pid < len(state) else 0
            if s == 1:
                state[pid] = 2
                yield pid, text
            elif s == 2:  # a repeated id keeps its first text
                stats["repeated_ids"] += 1

    table = TextTable.from_items(wanted_items())
    return table, {"lines_read": stats["lines_read"], "repeated_ids": stats["repeated_ids"]}


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
    lines.append(f"  positives: {report['positives']:,}")
    lines += [f"    skipped, {reason}: {count:,}" for reason, count in report["positives_skipped"].items()]
    q = report["negatives_per_query"]
    lines.append(f"  negatives: {report['negatives']:,} (per query min {q['min']}, mean {q['mean']}, max {q['max']})")
    lines += [f"    from {system}: {count:,}" for system, count in report["negatives_per_system"].items()]
    lines += [f"    skipped, {reason}: {count:,}" for reason, count in report["negatives_skipped"].items()]
    c = report["collection"]
    lines.append(
        f"  passages referenced: {report['passages_referenced']:,} (collection lines read: {c['lines_read']:,}"
        + (f", repeated ids ignored: {c['repeated_ids']:,}" if c["repeated_ids"] else "")
        + ")"
    )
    lines.append(f"  took {report['seconds']} s, peak RSS {report['peak_rss_mb']:,} MB")
    return "\n".join(lines)


def main(argv=None):
    """python -m data.mining {max,distill} [--data_dir DIR] [...]: mine once, print and save the report.

    Also a way to prepare a run: it downloads what is missing and builds the CE-score cache.
    """
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("script", choices=["max", "distill"])
    parser.add_argument("--data_dir", default="msmarco-data")
    parser.add_argument("--num_negs_per_system", type=int, default=5)
    parser.add_argument("--negs_to_use", default=None, help="comma list of systems (default: all in the file)")
    parser.add_argument("--ce_score_margin", type=float, default=3.0, help="max only")
    parser.add_argument("--use_all_queries", action="store_true", help="max only")
    parser.add_argument("--max_passages", type=int, default=0, help="distill only: cap on training queries")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--report", help="write the report as JSON to this path")
    parser.add_argument("--no_download", action="store_true", help="fail on a missing file instead")
    args = parser.parse_args(argv)
    common = dict(
        num_negs_per_system=args.num_negs_per_system,
        negs_to_use=args.negs_to_use,
        seed=args.seed,
        download=not args.no_download,
    )
    if args.script == "max":
        ts = mine_max_examples(
            args.data_dir, ce_score_margin=args.ce_score_margin, use_all_queries=args.use_all_queries, **common
        )
    else:
        ts = mine_distill_examples(args.data_dir, max_passages=args.max_passages, **common)
    if args.report:
        ts.save_report(args.report)


if __name__ == "__main__":
    main()
