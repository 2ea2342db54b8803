"""Training examples for train_max.py and train_distill.py, mined as the original scripts did.

    ts = mine_max_examples("msmarco-data")      # Splade_max: CE-filtered hard negatives
    ts = mine_distill_examples("msmarco-data")  # DistilSplade: hard negatives + CE margins as labels

From the inside out:
- data.mining_rule.mine_query() is the rule for one line of the hard-negatives file: which positives and
  negatives its query trains on, or why it gives no example (a pure function);
- _read_lines() reads the file, applies the rule and keeps the kept lines' data in flat arrays (_KeptLines);
- _build_training_set() loads the passages those lines need, drops what the collection lacks, shuffles each
  query's negatives once and writes the mining report (ts.report: what was read, kept and dropped, and why).

Only the passages and scores that the kept examples reference are kept (see data.training_set). The result is
saved once per machine in <data_dir>/mined-cache/ and mapped by every process (data.mined_cache); cache=False
mines in memory.
"""

import resource
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data.ce_scores import load_ce_scores
from data.download import (
    CE_SCORES_FILE,
    COLLECTION,
    HARD_NEGATIVES_FILE,
    TRAIN_FILES,
    TRAIN_QUERIES,
    train_file_paths,
)
from data.mined_cache import cache_folder, load_or_mine
from data.mining_rule import mine_query
from data.readers import iter_hard_negatives, iter_id_text, read_queries
from data.training_set import TextTable, TrainingSet, format_report
from errors import UserError, main_exits_2_on_user_error

__all__ = ["MiningError", "TextTable", "TrainingSet", "format_report", "mine_distill_examples", "mine_max_examples"]


class MiningError(UserError, ValueError):
    """Mining parameters that cannot work (an unknown system, nothing left to train on); says what to try."""


def mine_max_examples(
    data_dir,
    num_negs_per_system=5,
    negs_to_use=None,
    ce_score_margin=3.0,
    use_all_queries=False,
    seed=42,
    download=True,
    cache=True,
):
    """Splade_max examples: for each query, threshold = min CE(positives) - ce_score_margin; from each
    system, in file order, up to num_negs_per_system new negatives whose CE score is <= threshold.

    use_all_queries: a query left without negatives by the filter is kept (the original crashed on it)
    and gets num_negs_per_system random negatives drawn, from the seed, among the other queries' mined
    negatives (never its own positives); the report counts them.
    """
    params = dict(num_negs_per_system=num_negs_per_system, negs_to_use=negs_to_use, ce_score_margin=ce_score_margin)
    params.update(use_all_queries=use_all_queries, max_passages=0, seed=seed)
    return _mine(data_dir, "train_max", params, download, cache)


def mine_distill_examples(
    data_dir,
    num_negs_per_system=5,
    negs_to_use=None,
    max_passages=0,
    use_all_queries=False,
    seed=42,
    download=True,
    cache=True,
):
    """DistilSplade examples: no CE filter; label = CE(pos) - CE(neg).

    max_passages: stop reading once this many queries are kept (0 = no cap); a repeated qid does not count twice.
    use_all_queries: a query without positives is kept too; every epoch it takes two of its negatives, the
    first as the "positive" (label CE(n1) - CE(n2)), as the original did. The report counts them.
    """
    params = dict(num_negs_per_system=num_negs_per_system, negs_to_use=negs_to_use, ce_score_margin=None)
    params.update(use_all_queries=use_all_queries, max_passages=max_passages, seed=seed)
    return _mine(data_dir, "train_distill", params, download, cache)


# Reading the file


class _KeptLines:
    """The kept lines' data in flat arrays, in file order.

    The original stored train_queries[qid] = {...}: a later kept line of the same qid replaces the earlier
    line's data and keeps its place. `latest` does the same, so len(self) is the original's len(train_queries).
    """

    def __init__(self):
        self.qids = array("q")
        self.pos_pid, self.pos_ce, self.pos_count = array("i"), array("f"), array("i")
        self.neg_pid, self.neg_ce, self.neg_system, self.neg_count = array("i"), array("f"), array("h"), array("i")
        self.latest = {}  # qid -> its latest kept line; a dict keeps the first-kept order
        self.replaced = 0

    def __len__(self):
        return len(self.latest)

    def add(self, qid, mined, scores, system_ids):
        self.replaced += qid in self.latest
        self.latest[qid] = len(self.qids)
        self.qids.append(qid)
        self.pos_pid.extend([pid for pid, _ in mined.positives])
        self.pos_ce.extend([score for _, score in mined.positives])
        self.pos_count.append(len(mined.positives))
        self.neg_pid.extend([pid for pid, _ in mined.negatives])
        self.neg_ce.extend([scores[pid] for pid, _ in mined.negatives])
        self.neg_system.extend([system_ids[system] for _, system in mined.negatives])
        self.neg_count.append(len(mined.negatives))

    def arrays(self):
        """numpy copies, one row per kept query in first-kept order, holding its latest line's data."""
        a = {name: np.frombuffer(v, dtype=v.typecode).copy() for name, v in vars(self).items() if isinstance(v, array)}
        if self.replaced:  # keep the latest line of each qid, at its first line's place
            lines = np.fromiter(self.latest.values(), dtype=np.int64, count=len(self.latest))
            pos_entries, neg_entries = _entries_of(a["pos_count"], lines), _entries_of(a["neg_count"], lines)
            for name in ("pos_pid", "pos_ce"):
                a[name] = a[name][pos_entries]
            for name in ("neg_pid", "neg_ce", "neg_system"):
                a[name] = a[name][neg_entries]
            for name in ("qids", "pos_count", "neg_count"):
                a[name] = a[name][lines]
        return a


def _entries_of(counts, lines):
    """Indexes of the entries of `lines`, in that order, in a flat array where line k owns counts[k] entries."""
    starts = np.concatenate([[0], np.cumsum(counts)])[lines]
    sizes = counts[lines]
    return np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(sizes.sum())


@dataclass
class _Counts:
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    positives_skipped: Counter = field(default_factory=Counter)
    negatives_skipped: Counter = field(default_factory=Counter)


def _read_lines(path, queries, ce, rule, requested, max_passages):
    """Apply the rule to every line of the hard-negatives file: (_KeptLines, _Counts, systems seen in file order)."""
    kept, counts = _KeptLines(), _Counts()
    systems_seen = {}  # an ordered set: the union of systems over the file, in first-seen order
    for _lineno, qid, pos, neg in iter_hard_negatives(path):
        if max_passages and len(kept) >= max_passages:
            break
        counts.read += 1
        for system in neg:
            systems_seen.setdefault(system, len(systems_seen))
        if not pos and not rule["keep_without_positive"]:  # first, as the original: its reason is no_positive
            counts.dropped["no_positive"] += 1
            continue
        if qid not in queries:
            counts.dropped["qid_not_in_queries_file"] += 1
            continue
        scores = ce.row(qid)
        if scores is None:
            counts.dropped["qid_not_in_ce_scores"] += 1
            continue
        mined = mine_query(pos, neg, scores, systems=requested or systems_seen, **rule)
        counts.positives_skipped.update(mined.positives_skipped)
        counts.negatives_skipped.update(mined.negatives_skipped)
        if mined.dropped:
            counts.dropped[mined.dropped] += 1
        else:
            kept.add(qid, mined, scores, systems_seen)
    counts.dropped["qid_repeated_in_file"] += kept.replaced  # the replaced lines
    return kept, counts, systems_seen


def _systems_list(negs_to_use):
    """None (all systems) or the list of system names from a comma string or a list."""
    if negs_to_use is None:
        return None
    if isinstance(negs_to_use, str):
        negs_to_use = negs_to_use.split(",")
    return [s.strip() for s in negs_to_use if s.strip()] or None


def _mine(data_dir, script, params, download, cache):
    if params["num_negs_per_system"] < 1:
        raise MiningError(f"num_negs_per_system must be >= 1, got {params['num_negs_per_system']}; the original used 5")
    params["negs_to_use"] = _systems_list(params["negs_to_use"])
    paths = train_file_paths(data_dir, download)
    if cache:
        folder = cache_folder(data_dir, script, params, [paths[name] for name in TRAIN_FILES])
        ts = load_or_mine(folder, lambda: _mine_files(paths, data_dir, script, params))
    else:
        ts = _mine_files(paths, data_dir, script, params)
    ts.report["data_dir"] = str(data_dir)
    print(ts.format_report())
    return ts


def _mine_files(paths, data_dir, script, params):
    start = time.time()
    requested = params["negs_to_use"]
    distill = script == "train_distill"
    rule = dict(num_negs_per_system=params["num_negs_per_system"], ce_score_margin=params["ce_score_margin"])
    rule.update(keep_without_positive=distill and params["use_all_queries"])
    rule.update(keep_without_negative=not distill and params["use_all_queries"])

    ce = load_ce_scores(paths[CE_SCORES_FILE])
    queries = read_queries(paths[TRAIN_QUERIES])
    kept, counts, systems_seen = _read_lines(
        paths[HARD_NEGATIVES_FILE], queries, ce, rule, requested, params["max_passages"]
    )
    del ce
    unknown = [s for s in requested or () if s not in systems_seen]
    if unknown:
        raise MiningError(
            f"negs_to_use names {unknown}, which {paths[HARD_NEGATIVES_FILE]} does not have (in the {counts.read:,} "
            f"lines read); its systems: {list(systems_seen)}. Pick among those, or leave negs_to_use empty for all."
        )
    lines = kept.arrays()
    del kept

    report = {"script": script, "data_dir": str(data_dir), "params": params, "systems_in_file": list(systems_seen)}
    report["systems_used"] = requested or list(systems_seen)
    ts = _build_training_set(paths[COLLECTION], queries, lines, counts, params["seed"], report)
    ts.report.update(
        seconds=round(time.time() - start, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )
    if len(ts) == 0:
        print(ts.format_report())
        raise MiningError(
            f"no training query left in {data_dir}; the mining report above says why each was dropped "
            "(a smaller --ce_score_margin or a larger --num_negs_per_system keeps more)"
        )
    return ts


# From the kept lines to the training set


def _build_training_set(collection_path, queries, lines, counts, seed, report):
    """Passages, per-query pointers and the report of the kept lines (`lines`: _KeptLines.arrays())."""
    systems = report["systems_in_file"]
    per_system = np.bincount(lines["neg_system"], minlength=len(systems))  # mined negatives, not random ones
    negatives_per_system = {s: int(per_system[systems.index(s)]) for s in report["systems_used"]}
    without_negatives = np.flatnonzero(lines["neg_count"] == 0)  # train_max --use_all_queries
    if len(without_negatives):
        no_pool = _add_random_negatives(lines, without_negatives, report["params"]["num_negs_per_system"], seed)
        counts.dropped["no_negative_and_no_random_pool"] += no_pool
    needed = _sorted_unique(np.concatenate([lines["pos_pid"], lines["neg_pid"]]))
    passages, collection_stats = _load_passages(collection_path, needed)
    ex, keep_query = _drop_missing_passages(lines, passages, counts)
    _shuffle_negatives(ex, passages, seed)

    used = _sorted_unique(np.concatenate([ex["pos_idx"], ex["neg_idx"]]))  # drop what only dropped queries referenced
    if len(used) < len(passages):
        passages = passages.subset(used)
        ex["pos_idx"], ex["neg_idx"] = np.searchsorted(used, ex["pos_idx"]), np.searchsorted(used, ex["neg_idx"])

    query_table = TextTable.from_items((q, queries[q]) for q in ex["qids"].tolist())
    n = len(ex["qids"])
    pos_ptr = np.concatenate([[0], np.cumsum(np.bincount(ex["pos_q"], minlength=n))]).astype(np.int64)
    neg_ptr = np.concatenate([[0], np.cumsum(np.bincount(ex["neg_q"], minlength=n))]).astype(np.int64)
    neg_per_query = np.diff(neg_ptr)
    report.update(
        queries_read=counts.read,
        queries_kept=n,
        queries_dropped=_sorted_nonzero(counts.dropped),
        queries_with_random_negatives=int(keep_query[without_negatives].sum()),
        queries_without_positive=int((np.diff(pos_ptr) == 0).sum()),  # train_distill --use_all_queries
        positives=len(ex["pos_idx"]),
        positives_skipped=_sorted_nonzero(counts.positives_skipped),
        negatives=len(ex["neg_idx"]),
        negatives_per_system=negatives_per_system,
        negatives_skipped=_sorted_nonzero(counts.negatives_skipped),
        negatives_per_query={
            "min": int(neg_per_query.min()) if n else 0,
            "mean": round(float(neg_per_query.mean()), 3) if n else 0.0,
            "max": int(neg_per_query.max()) if n else 0,
        },
        passages_referenced=len(passages),
        collection=collection_stats,
    )
    return TrainingSet(
        query_table, pos_ptr, ex["pos_idx"], ex["pos_ce"], neg_ptr, ex["neg_idx"], ex["neg_ce"], passages, report
    )


def _sorted_unique(ids):
    """np.unique of non-negative ids, by marking them in a mask where that is small (several times faster)."""
    if len(ids) == 0 or int(ids.max()) > 4 * len(ids) + 10_000_000:
        return np.unique(ids)
    mask = np.zeros(int(ids.max()) + 1, dtype=bool)
    mask[ids] = True
    return np.flatnonzero(mask).astype(ids.dtype)


def _sorted_nonzero(counter):
    return dict(sorted((k, v) for k, v in counter.items() if v))


def _add_random_negatives(lines, queries, k, seed):
    """Give each query in `queries` (indexes of queries without negatives) k random negatives drawn from the
    pool of mined negatives, never one of its own positives. Updates `lines`; returns how many queries are
    left without (empty pool)."""
    pool = _sorted_unique(lines["neg_pid"])
    pos_ptr = np.concatenate([[0], np.cumsum(lines["pos_count"])])
    neg_ptr = np.concatenate([[0], np.cumsum(lines["neg_count"])])
    rng = np.random.default_rng([seed % 2**63, 1])
    at, values, no_pool = [], [], 0
    for i in queries.tolist():
        own = set(lines["pos_pid"][pos_ptr[i] : pos_ptr[i + 1]].tolist())
        # Draw k + |own| distinct pool entries and drop the query's own positives: O(k), not O(pool).
        draw = pool[rng.choice(len(pool), size=min(len(pool), k + len(own)), replace=False)] if len(pool) else pool
        picked = [p for p in draw.tolist() if p not in own][:k]
        if not picked:
            no_pool += 1
            continue
        at += [neg_ptr[i]] * len(picked)
        values += picked
        lines["neg_count"][i] = len(picked)
    lines["neg_pid"] = np.insert(lines["neg_pid"], at, values).astype(np.int32)
    lines["neg_ce"] = np.insert(lines["neg_ce"], at, np.nan).astype(np.float32)  # max training needs no CE score
    lines["neg_system"] = np.insert(lines["neg_system"], at, -1).astype(np.int16)  # from no system
    return no_pool


def _drop_missing_passages(lines, passages, counts):
    """Drop the passages missing from the collection, then the queries left without a positive (unless they
    never had one) or without a negative. Returns the examples (positives and negatives as rows of `passages`,
    with their query's new index) and the mask of kept queries."""
    n = len(lines["qids"])
    pos_q, neg_q = np.repeat(np.arange(n), lines["pos_count"]), np.repeat(np.arange(n), lines["neg_count"])
    pos_idx, neg_idx = passages.index_of(lines["pos_pid"]), passages.index_of(lines["neg_pid"])
    pos_ok, neg_ok = pos_idx >= 0, neg_idx >= 0
    counts.positives_skipped["not_in_collection"] += int((~pos_ok).sum())
    counts.negatives_skipped["not_in_collection"] += int((~neg_ok).sum())
    n_pos, n_neg = np.bincount(pos_q[pos_ok], minlength=n), np.bincount(neg_q[neg_ok], minlength=n)
    had_negatives = lines["neg_count"] > 0  # the others were counted already (no random pool)
    lost_positives = (lines["pos_count"] > 0) & (n_pos == 0) & had_negatives
    counts.dropped["positives_not_in_collection"] += int(lost_positives.sum())
    counts.dropped["negatives_not_in_collection"] += int(((n_neg == 0) & ~lost_positives & had_negatives).sum())
    keep_query = ~lost_positives & (n_neg > 0)

    pos_keep, neg_keep = pos_ok & keep_query[pos_q], neg_ok & keep_query[neg_q]
    renumber = np.cumsum(keep_query) - 1
    examples = {
        "qids": lines["qids"][keep_query],
        "pos_q": renumber[pos_q[pos_keep]],
        "pos_idx": pos_idx[pos_keep],
        "pos_ce": lines["pos_ce"][pos_keep],
        "neg_q": renumber[neg_q[neg_keep]],
        "neg_idx": neg_idx[neg_keep],
        "neg_ce": lines["neg_ce"][neg_keep],
    }
    return examples, keep_query


def _shuffle_negatives(examples, passages, seed):
    """Each query's negatives in one shuffled order: sorted by a hash of (seed, qid, pid), a pure function of
    the data. (neg_q is sorted already and stays so.)"""
    ex = examples
    order = np.lexsort((_hash64(seed, ex["qids"][ex["neg_q"]], passages.ids[ex["neg_idx"]]), ex["neg_q"]))
    ex["neg_idx"], ex["neg_ce"] = ex["neg_idx"][order], ex["neg_ce"][order]


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


def _load_passages(path, needed):
    """TextTable of the passages whose ids are in `needed` (sorted unique), in one pass over the collection."""
    # One byte per id up to the largest needed: 0 = not needed, 1 = needed, 2 = taken. A bytearray
    # because indexing it from Python is several times faster than a numpy scalar lookup.
    state = np.zeros(int(needed[-1]) + 1 if len(needed) else 0, dtype=np.uint8)
    state[needed] = 1
    state = bytearray(state.tobytes())
    stats, repeats = Counter(), {}

    def wanted_items():
        for pid, text in iter_id_text(path, desc=f"reading {Path(path).name} ({len(needed):,} passages needed)"):
            stats["lines_read"] += 1
            s = state[pid] if pid < len(state) else 0
            if s == 1:
                state[pid] = 2
                yield pid, text
            elif s == 2:
                stats["repeated_ids"] += 1
                repeats[pid] = text

    table = TextTable.from_items(wanted_items())
    if repeats:  # the original's dict kept a repeated id's last text (the real collection.tsv repeats none)
        table = TextTable.from_items(
            (pid, repeats[pid] if pid in repeats else table.blob[table.offsets[k] : table.offsets[k + 1]].tobytes())
            for k, pid in enumerate(table.ids.tolist())
        )
    return table, {"lines_read": stats["lines_read"], "repeated_ids": stats["repeated_ids"]}


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
    parser.add_argument(
        "--use_all_queries",
        action="store_true",
        help="max: keep queries left without negatives (random ones); distill: keep queries without positives",
    )
    parser.add_argument("--max_passages", type=int, default=0, help="distill only: cap on training queries")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--report", help="write the report as JSON to this path")
    parser.add_argument("--no_download", action="store_true", help="fail on a missing file instead")
    args = parser.parse_args(argv)
    common = dict(
        num_negs_per_system=args.num_negs_per_system,
        negs_to_use=args.negs_to_use,
        use_all_queries=args.use_all_queries,
        seed=args.seed,
        download=not args.no_download,
    )
    if args.script == "max":
        ts = mine_max_examples(args.data_dir, ce_score_margin=args.ce_score_margin, **common)
    else:
        ts = mine_distill_examples(args.data_dir, max_passages=args.max_passages, **common)
    if args.report:
        ts.save_report(args.report)


if __name__ == "__main__":
    main_exits_2_on_user_error(main)
