"""Write data/sample/: a small MS MARCO look-alike in exactly the real formats, deterministically.

    python -m data.make_sample [--out data/sample]

Files: collection.tsv, queries.train.tsv, msmarco-hard-negatives.jsonl.gz,
cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz, queries.dev.small.tsv, qrels.dev.small.tsv.

Built so that a small model can learn something in minutes on CPU: passages are English sentences
about a subject (a thing in a topic) and a place; a query asks about its passage's subject and place,
often in other words (synonyms); hard negatives share the topic, the subject or the place but not
both; cross-encoder-like scores rank positives above negatives, with noise. About 8% of queries have
a near-duplicate of their positive among the "negatives", scored like a positive: the false negatives
that the CE filter of train_max exists to remove. Dev queries ask about passages that no training
query is about, so dev retrieval measures generalisation.
"""

import argparse
import gzip
import json
import pickle
import random
import re
from pathlib import Path

# topic: (subjects, verbs, adjectives, related nouns)
TOPICS = {
    "volcanoes": (
        ["volcano", "crater", "lava", "magma", "geyser", "caldera"],
        ["erupt", "smoke", "collapse", "rumble"],
        ["active", "dormant", "molten", "steep"],
        ["ash", "rock", "heat", "pressure", "gas"],
    ),
    "astronomy": (
        ["telescope", "comet", "planet", "nebula", "galaxy", "asteroid"],
        ["orbit", "shine", "rotate", "drift"],
        ["distant", "bright", "icy", "massive"],
        ["star", "light", "gravity", "moon", "sky"],
    ),
    "cooking": (
        ["bread", "soup", "pasta", "curry", "omelette", "pancake"],
        ["bake", "simmer", "boil", "season"],
        ["spicy", "crispy", "savory", "fresh"],
        ["flour", "butter", "garlic", "oven", "salt"],
    ),
    "medicine": (
        ["vaccine", "antibiotic", "fever", "allergy", "migraine", "infection"],
        ["heal", "spread", "treat", "ache"],
        ["chronic", "mild", "severe", "contagious"],
        ["doctor", "patient", "symptom", "dose", "clinic"],
    ),
    "gardening": (
        ["tomato", "orchid", "rose", "lettuce", "cactus", "tulip"],
        ["bloom", "grow", "wilt", "sprout"],
        ["green", "leafy", "hardy", "fragrant"],
        ["soil", "seed", "water", "compost", "sunlight"],
    ),
    "finance": (
        ["mortgage", "pension", "bond", "stock", "loan", "budget"],
        ["invest", "borrow", "save", "grow"],
        ["fixed", "risky", "annual", "taxable"],
        ["interest", "bank", "market", "income", "debt"],
    ),
    "music": (
        ["guitar", "violin", "piano", "drum", "trumpet", "choir"],
        ["play", "tune", "perform", "echo"],
        ["loud", "classical", "acoustic", "melodic"],
        ["song", "chord", "rhythm", "concert", "note"],
    ),
    "football": (
        ["goalkeeper", "striker", "stadium", "referee", "penalty", "league"],
        ["score", "tackle", "train", "win"],
        ["fast", "professional", "famous", "young"],
        ["ball", "team", "match", "goal", "coach"],
    ),
    "computing": (
        ["laptop", "processor", "database", "compiler", "router", "keyboard"],
        ["compute", "crash", "store", "connect"],
        ["digital", "wireless", "portable", "secure"],
        ["software", "memory", "network", "data", "code"],
    ),
    "birds": (
        ["eagle", "parrot", "penguin", "owl", "sparrow", "flamingo"],
        ["fly", "nest", "migrate", "sing"],
        ["wild", "colorful", "nocturnal", "tiny"],
        ["feather", "wing", "egg", "beak", "forest"],
    ),
    "oceans": (
        ["coral", "whale", "tide", "shark", "seaweed", "reef"],
        ["swim", "dive", "drift", "feed"],
        ["deep", "salty", "tropical", "cold"],
        ["wave", "current", "fish", "shore", "water"],
    ),
    "weather": (
        ["hurricane", "tornado", "blizzard", "drought", "monsoon", "fog"],
        ["form", "strike", "blow", "last"],
        ["humid", "stormy", "windy", "seasonal"],
        ["rain", "wind", "cloud", "temperature", "snow"],
    ),
    "history": (
        ["castle", "empire", "treaty", "revolution", "pharaoh", "monastery"],
        ["rule", "fall", "build", "sign"],
        ["ancient", "medieval", "royal", "powerful"],
        ["king", "army", "war", "century", "city"],
    ),
    "cars": (
        ["engine", "battery", "tire", "brake", "sedan", "truck"],
        ["drive", "stop", "charge", "steer"],
        ["electric", "heavy", "reliable", "quiet"],
        ["fuel", "road", "speed", "driver", "wheel"],
    ),
    "law": (
        ["contract", "lawsuit", "verdict", "patent", "warrant", "tenant"],
        ["sue", "appeal", "rule", "sign"],
        ["legal", "federal", "binding", "civil"],
        ["court", "judge", "lawyer", "right", "fine"],
    ),
    "geology": (
        ["glacier", "canyon", "earthquake", "mineral", "fossil", "cave"],
        ["erode", "shift", "form", "crack"],
        ["rocky", "frozen", "layered", "ancient"],
        ["stone", "river", "ice", "plate", "sand"],
    ),
    "insects": (
        ["bee", "ant", "butterfly", "mosquito", "beetle", "spider"],
        ["sting", "crawl", "pollinate", "bite"],
        ["small", "busy", "poisonous", "winged"],
        ["hive", "flower", "colony", "leg", "honey"],
    ),
    "architecture": (
        ["bridge", "tower", "cathedral", "skyscraper", "dome", "museum"],
        ["stand", "rise", "span", "attract"],
        ["tall", "modern", "gothic", "historic"],
        ["steel", "glass", "arch", "tourist", "design"],
    ),
    "nutrition": (
        ["protein", "vitamin", "fiber", "sugar", "calcium", "iron"],
        ["absorb", "digest", "boost", "lower"],
        ["healthy", "daily", "essential", "rich"],
        ["diet", "meal", "body", "energy", "blood"],
    ),
    "farming": (
        ["wheat", "cattle", "tractor", "rice", "vineyard", "barn"],
        ["harvest", "plant", "graze", "irrigate"],
        ["rural", "organic", "fertile", "dry"],
        ["field", "crop", "farmer", "grain", "rain"],
    ),
    "painting": (
        ["portrait", "fresco", "watercolor", "canvas", "mural", "sketch"],
        ["paint", "restore", "display", "fade"],
        ["famous", "vivid", "abstract", "early"],
        ["artist", "color", "brush", "gallery", "light"],
    ),
    "trains": (
        ["locomotive", "subway", "railway", "tram", "platform", "carriage"],
        ["travel", "depart", "arrive", "run"],
        ["crowded", "underground", "express", "steam"],
        ["station", "track", "ticket", "passenger", "line"],
    ),
    "dogs": (
        ["poodle", "beagle", "terrier", "sheepdog", "puppy", "retriever"],
        ["bark", "fetch", "guard", "chase"],
        ["loyal", "playful", "clever", "gentle"],
        ["owner", "leash", "tail", "bone", "walk"],
    ),
    "chemistry": (
        ["acid", "molecule", "crystal", "catalyst", "solvent", "polymer"],
        ["react", "dissolve", "bond", "melt"],
        ["toxic", "stable", "organic", "liquid"],
        ["atom", "element", "lab", "heat", "salt"],
    ),
}

PLACES = [
    "Iceland",
    "Japan",
    "Chile",
    "Kenya",
    "Norway",
    "Peru",
    "Italy",
    "Canada",
    "Egypt",
    "India",
    "Brazil",
    "Mexico",
    "Scotland",
    "Spain",
    "Greece",
    "Vietnam",
    "Morocco",
    "Alaska",
    "Texas",
    "Sweden",
    "Ireland",
    "Nepal",
    "Australia",
    "Portugal",
    "Turkey",
    "Finland",
    "Cuba",
    "Ghana",
    "Chicago",
    "London",
    "Paris",
    "Tokyo",
    "Berlin",
    "Boston",
    "Vienna",
    "Dublin",
    "Lisbon",
    "Madrid",
    "Oslo",
    "Sydney",
    "Toronto",
    "Cairo",
]

# Paraphrases a query may use instead of the passage's word.
SYNONYMS = {
    "volcano": "mountain",
    "lava": "molten rock",
    "planet": "world",
    "telescope": "observatory",
    "bread": "loaf",
    "soup": "broth",
    "fever": "high temperature",
    "infection": "disease",
    "tomato": "vegetable",
    "mortgage": "home loan",
    "pension": "retirement fund",
    "stock": "share",
    "loan": "credit",
    "guitar": "instrument",
    "stadium": "arena",
    "laptop": "notebook computer",
    "database": "data store",
    "eagle": "bird of prey",
    "whale": "marine mammal",
    "shark": "predator fish",
    "hurricane": "storm",
    "tornado": "twister",
    "drought": "dry spell",
    "castle": "fortress",
    "empire": "kingdom",
    "engine": "motor",
    "truck": "lorry",
    "lawsuit": "legal case",
    "verdict": "ruling",
    "tenant": "renter",
    "glacier": "ice sheet",
    "earthquake": "tremor",
    "cave": "cavern",
    "bee": "honeybee",
    "tower": "spire",
    "skyscraper": "high rise",
    "vitamin": "nutrient",
    "cattle": "cows",
    "portrait": "painting",
    "subway": "metro",
    "railway": "railroad",
    "puppy": "young dog",
    "acid": "corrosive",
    "crystal": "mineral",
    "big": "large",
    "famous": "well known",
    "ancient": "very old",
    "fast": "quick",
    "tiny": "very small",
    "tall": "high",
    "loud": "noisy",
    "cold": "chilly",
    "healthy": "nutritious",
    "toxic": "poisonous",
}

# What a query says when it names only the kind of thing, not the thing: several passages fit.
GENERIC = {
    "volcanoes": "volcanic site",
    "astronomy": "space object",
    "cooking": "dish",
    "medicine": "illness",
    "gardening": "plant",
    "finance": "investment",
    "music": "musical instrument",
    "football": "football",
    "computing": "computer",
    "birds": "bird",
    "oceans": "sea life",
    "weather": "weather event",
    "history": "historic site",
    "cars": "car part",
    "law": "legal matter",
    "geology": "landform",
    "insects": "insect",
    "architecture": "building",
    "nutrition": "food component",
    "farming": "farm",
    "painting": "artwork",
    "trains": "train",
    "dogs": "dog",
    "chemistry": "chemical",
}

SENTENCES = [
    "The {adj} {subject} of {place} is known for its {noun}.",
    "In {place}, the {subject} can {verb} when the {noun2} changes.",
    "Visitors to {place} often ask how the {subject} is able to {verb}.",
    "Experts say the {subject} in {place} depends on {noun} and {noun2}.",
    "Many people think the {subject} of {place} is {adj} and {adj2}.",
    "A {adj2} {subject} needs {noun} to {verb}, and {place} has plenty of it.",
    "Records from {place} show that the {subject} began to {verb} long ago.",
]
FILLER = [
    "This makes the {topic} of the region unusual.",
    "It is a common topic in books about {topic}.",
    "Local guides explain the {noun} to every group.",
    "The {noun} is measured every year.",
    "Some of this is still debated.",
]
QUERY_TEMPLATES = [
    "what is the {detail} {thing} {place}",
    "{place} {thing} {detail}",
    "how {detail} is the {thing} {place}",
    "{thing} {place} {detail}",
    "does the {place} {thing} {detail}",
    "{detail} {thing} in {place}",
    "{thing} {detail} facts",
    "why is the {thing} {detail}",
]
SYSTEMS = ["bm25", "msmarco-distilbert-base-tas-b", "msmarco-MiniLM-L-6-v3", "co-condenser-margin_mse-cls-v1"]
NEGS_PER_SYSTEM = 12


def passage_text(rng, topic, subject, place):
    """Two sentences about the subject in the place and one filler; also the detail words the text uses."""
    _, verbs, adjs, nouns = TOPICS[topic]
    a, a2 = rng.sample(adjs, 2)
    n, n2 = rng.sample(nouns, 2)
    words = {
        "subject": subject,
        "place": place,
        "adj": a,
        "adj2": a2,
        "noun": n,
        "noun2": n2,
        "verb": rng.choice(verbs),
        "topic": topic,
    }
    sentences = rng.sample(SENTENCES, 2) + rng.sample(FILLER, 1)
    text = " ".join(s.format(**words) for s in sentences)
    used = set(re.findall(r"[a-z]+", text.lower()))
    details = sorted(w for w in (a, a2, n, n2, words["verb"]) if w in used)
    return text, details


def query_text(rng, topic, subject, place, details):
    """A short query about (subject, place) that is not always a lexical give-away.

    Three in ten name only the kind of thing (several passages of the topic and place fit; the detail word
    tells them apart or not), three in ten paraphrase the subject, and one in five leaves the place out.
    """
    _, verbs, adjs, nouns = TOPICS[topic]
    draw = rng.random()
    thing = GENERIC[topic] if draw < 0.3 else SYNONYMS.get(subject, subject) if draw < 0.6 else subject
    if not details or rng.random() < 0.3:  # a detail the passage does not state: no help, some noise
        details = verbs + adjs + nouns
    detail = rng.choice(details)
    if rng.random() < 0.3:
        detail = SYNONYMS.get(detail, detail)
    with_place = rng.random() < 0.8
    templates = [t for t in QUERY_TEMPLATES if ("{place}" in t) == with_place]
    text = rng.choice(templates).format(thing=thing, place=place, detail=detail)
    return " ".join(text.split())


def ce_like_score(rng, key, other_key, duplicate=False):
    """Cross-encoder-like logit: high for the same (subject, place), lower the less they share, with noise.

    One score in twenty is off by +4, as a real cross-encoder is sometimes confidently wrong: label noise.
    """
    shared = (key[1] == other_key[1]) + (key[2] == other_key[2]) + 0.5 * (key[0] == other_key[0])
    base = 6.0 if duplicate else -7.0 + 3.0 * shared
    if rng.random() < 0.05:
        base += 4.0
    return round(base + rng.gauss(0.0, 1.5), 3)


def system_ranking(rng, candidates, keys, key, noise):
    """One retrieval system's hard negatives: lexical overlap with the query's key, plus the system's noise."""

    def overlap(c):
        k = keys[c]
        return (k[1] == key[1]) * 2 + (k[2] == key[2]) * 2 + (k[0] == key[0]) + rng.gauss(0, noise)

    return sorted(candidates, key=overlap, reverse=True)[:NEGS_PER_SYSTEM]


def sibling_keys(rng, subject_keys, taken):
    """For each queried key, an unused key of the same topic and place but another subject: a confusable passage."""
    siblings = []
    for topic, _, place in subject_keys:
        others = [(topic, s, place) for s in TOPICS[topic][0] if (topic, s, place) not in taken]
        if others:
            sibling = rng.choice(others)
            taken.add(sibling)
            siblings.append(sibling)
    return siblings


def make_passages(rng, keys, train_queries, n_subjects, n_background):
    """(key, text, details) for the queried keys, their confusable siblings, background keys and near-duplicates."""
    subject_keys = keys[:n_subjects]
    taken = set(subject_keys)
    siblings = sibling_keys(rng, subject_keys, taken)
    background = [k for k in keys[n_subjects:] if k not in taken][:n_background]  # passages no query is about
    passages = [(key, *passage_text(rng, *key)) for key in subject_keys + siblings + background]
    # Near-duplicates: a second passage on the same subject and place, for ~8% of training queries.
    duplicates = {}
    for i in rng.sample(range(train_queries), train_queries * 8 // 100):
        duplicates[i] = len(passages)
        passages.append((subject_keys[i], *passage_text(rng, *subject_keys[i])))
    return passages, duplicates


def mine_query(rng, i, passages, duplicates, by_key_parts, pid_of):
    """The hard-negatives line and CE-like scores of training query i (its passage is passages[i])."""
    key = passages[i][0]
    positives = [i] + ([duplicates[i]] if i in duplicates and rng.random() < 0.3 else [])
    # Candidates share the subject, the place or the topic; each "system" ranks them with its own noise.
    candidates = sorted({c for part in enumerate(key) for c in by_key_parts[part]} - set(positives))
    keys = [p[0] for p in passages]
    q_scores = {pid_of[p]: ce_like_score(rng, key, keys[p], duplicate=True) for p in positives}
    neg = {}
    for system_no, system in enumerate(SYSTEMS):
        ranked = system_ranking(rng, candidates, keys, key, noise=1.0 + system_no * 0.5)
        neg[system] = [pid_of[c] for c in ranked]
        for c in ranked:
            if pid_of[c] not in q_scores:
                q_scores[pid_of[c]] = ce_like_score(rng, key, keys[c], duplicate=c == duplicates.get(i))
    return {"pos": [pid_of[p] for p in positives], "neg": neg}, q_scores


def build(seed=13, train_queries=1200, dev_queries=150, extra_queries=60, n_background=600):
    rng = random.Random(seed)
    keys = [(t, s, p) for t, (subjects, *_) in TOPICS.items() for s in subjects for p in PLACES]
    rng.shuffle(keys)
    n_subjects = train_queries + dev_queries  # keys[:n_subjects] each have a passage and a query
    passages, duplicates = make_passages(rng, keys, train_queries, n_subjects, n_background)
    # Shuffle the pids so that neither position nor id gives the answer away.
    order = list(range(len(passages)))
    rng.shuffle(order)
    pid_of = {old: 1000 + 7 * new for new, old in enumerate(order)}
    by_key_parts = {}
    for old, (key, _, _) in enumerate(passages):
        for part in enumerate(key):
            by_key_parts.setdefault(part, []).append(old)

    qids = rng.sample(range(1, 1_200_000), n_subjects + extra_queries)
    hard_negatives, scores, train, dev, qrels = [], {}, [], [], []
    for i, (key, _, details) in enumerate(passages[:n_subjects]):
        qid = qids[i]
        text = query_text(rng, *key, details)
        if i >= train_queries:  # dev: the passage about this key is the relevant one
            dev.append((qid, text))
            qrels.append((qid, pid_of[i]))
            continue
        train.append((qid, text))
        line, scores[qid] = mine_query(rng, i, passages, duplicates, by_key_parts, pid_of)
        hard_negatives.append({"qid": qid, **line})
    # Training queries without a hard-negatives line, as in the real queries.train.tsv (808k vs ~500k lines).
    for qid in qids[n_subjects:]:
        train.append((qid, query_text(rng, *rng.choice(keys), [])))

    collection = sorted((pid_of[old], text) for old, (_, text, _) in enumerate(passages))
    return collection, train, hard_negatives, scores, dev, qrels


def write_sample(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    collection, train, hard_negatives, scores, dev, qrels = build()

    def tsv(name, rows):
        (out / name).write_text("".join("\t".join(map(str, row)) + "\n" for row in rows), encoding="utf-8")

    tsv("collection.tsv", collection)
    tsv("queries.train.tsv", train)
    tsv("queries.dev.small.tsv", dev)
    tsv("qrels.dev.small.tsv", [(qid, 0, pid, 1) for qid, pid in qrels])
    # mtime=0: the same bytes on every run, so the committed files only change when the content does.
    lines = "".join(json.dumps(h) + "\n" for h in hard_negatives).encode()
    (out / "msmarco-hard-negatives.jsonl.gz").write_bytes(gzip.compress(lines, 9, mtime=0))
    (out / "cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz").write_bytes(
        gzip.compress(pickle.dumps(scores, protocol=4), 9, mtime=0)
    )
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(
        f"wrote {out}: {len(collection):,} passages, {len(hard_negatives):,} training queries with hard negatives, "
        f"{len(dev)} dev queries; {total / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "sample"))
    write_sample(parser.parse_args().out)
