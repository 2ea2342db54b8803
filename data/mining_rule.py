"""The original recipe's rule for one line of the hard-negatives file: which positives and negatives its
query trains on, or why it gives no training example. Pure functions of the line and its query's CE scores.

    mined = mine_query(pos, neg, scores, systems=["bm25", ...], num_negs_per_system=5, ce_score_margin=3.0)
    mined.positives, mined.negatives, mined.dropped

data.mining applies it to every line of the file.
"""

import math
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class MinedQuery:
    """What the rule makes of one line: its query's positives and negatives, or the reason it gives no example."""

    positives: list = field(default_factory=list)  # [(pid, CE score)], file order; NaN: a max positive without one
    negatives: list = field(default_factory=list)  # [(pid, system)], in the order chosen
    positives_skipped: Counter = field(default_factory=Counter)
    negatives_skipped: Counter = field(default_factory=Counter)
    dropped: str | None = None


def mine_query(
    pos,
    neg,
    scores,
    *,
    systems,
    num_negs_per_system,
    ce_score_margin=None,
    keep_without_positive=False,
    keep_without_negative=False,
):
    """The rule for one line {"pos": pos, "neg": neg} of the hard-negatives file; `scores` = {pid: CE score}
    of its query.

    ce_score_margin (train_max): threshold = min CE(positives) - margin; a positive without a CE score stays a
    positive. None (train_distill): no filter, and a positive needs a CE score (it makes the label).
    keep_without_positive (train_distill --use_all_queries): a line without positives still gives its negatives.
    keep_without_negative (train_max --use_all_queries): a query left without negatives is kept.
    """
    positives = list(dict.fromkeys(pos))  # file order, without repeats
    mined = MinedQuery(positives_skipped=_nonzero(repeated=len(pos) - len(positives)))
    if not positives and not keep_without_positive:
        mined.dropped = "no_positive"
        return mined
    threshold = None
    if ce_score_margin is None:
        mined.positives = [(p, scores[p]) for p in positives if p in scores]
        mined.positives_skipped += _nonzero(no_ce_score=len(positives) - len(mined.positives))
    else:
        known = [scores[p] for p in positives if p in scores]
        mined.positives_skipped += _nonzero(no_ce_score_kept=len(positives) - len(known))
        if known:
            threshold = min(known) - ce_score_margin
            mined.positives = [(p, scores.get(p, math.nan)) for p in positives]
    if positives and not mined.positives:
        mined.dropped = "positives_without_ce_score"
        return mined
    chosen, mined.negatives_skipped = choose_negatives(positives, neg, scores, systems, num_negs_per_system, threshold)
    mined.negatives = list(chosen.items())
    if not chosen and not keep_without_negative:
        mined.dropped = "no_negative_left" if ce_score_margin is None else "no_negative_after_ce_filter"
    return mined


def choose_negatives(positives, negatives_by_system, scores, systems, num_negs_per_system, threshold=None):
    """The original's walk: for each system in `systems`, its negatives in file order, until num_negs_per_system
    new ones are taken. Skipped: a positive, a pid already chosen (from any system), a pid without a CE score
    and, given a threshold (train_max), a pid scoring above it (a likely false negative).

    Returns ({pid: system} in the order chosen, Counter of skipped negatives by reason).
    """
    chosen, skipped = {}, Counter()
    positive_set = set(positives)
    for system in systems:
        added = 0
        for pid in negatives_by_system.get(system, ()):
            if pid in positive_set:  # never train a positive as a negative
                skipped["is_a_positive"] += 1
                continue
            if pid in chosen:
                skipped["already_chosen"] += 1
                continue
            score = scores.get(pid)
            if score is None:  # max: cannot rule out a false negative; distill: no label
                skipped["no_ce_score"] += 1
                continue
            if threshold is not None and score > threshold:
                skipped["above_ce_threshold"] += 1
                continue
            chosen[pid] = system
            added += 1
            if added >= num_negs_per_system:
                break
    return chosen, skipped


def _nonzero(**counts):
    return Counter({k: v for k, v in counts.items() if v})
