"""Build the bundled word-pair task ``data/wordnet_hypernyms/`` from Debian's WordNet 3.0.

Install the source files first (Debian/Ubuntu)::

    sudo apt-get install wordnet-base
    python scripts/build_wordnet_hypernyms.py --src /usr/share/wordnet --out data/wordnet_hypernyms

"Is an X a kind of Y?" — rows ``{"word": X, "category": Y, "label": "yes" | "no"}``, two text fields
for a sentence-pair classifier. From the noun hierarchy (``data.noun``, hypernym pointers ``@`` and
instance-hypernym pointers ``@i``):

* the words X are the first lemmas of the noun synsets whose senses were tagged at least
  ``--min-count`` times in the SemCor counts (``cntlist.rev``): words an encoder has seen, one
  synset per lemma (its most frequent sense);
* each X gets one positive: a hypernym 1 to 3 steps up (the step count drawn uniformly), skipping
  the top of the hierarchy (synsets within ``--min-depth`` steps of ``entity``), as Y;
* and one negative: a Y' drawn from the multiset of positive categories that is neither an ancestor
  of X nor X itself (nor a descendant of X). The categories of "yes" and "no" rows are then drawn
  from the same distribution, and every word has one row of each label: neither field alone tells
  the label, only the pair does.

Lemmas are written with spaces for underscores. A word goes to the test split when
``int(sha256(X)) % 5 == 0`` (about 20%), so test words are unseen in training. Rows are sorted by
the sha256 of ``X|Y``; draws use ``random.Random(--seed)`` in a fixed order. The same inputs always
give byte-identical outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SRC = Path("/usr/share/wordnet")
DEFAULT_COPYRIGHT = Path("/usr/share/doc/wordnet-base/copyright")
HYPERNYM_POINTERS = ("@", "@i")
TEST_MODULUS = 5


@dataclass
class Synset:
    offset: str
    lex_filenum: int
    lemmas: list[tuple[str, int]]  # (lemma, lex_id)
    hypernyms: list[str]


def parse_noun_data(text: str) -> dict[str, Synset]:
    """``data.noun`` (wndb(5WN)): offset, lex file, words with lex ids, pointers; license lines skipped."""
    synsets = {}
    for line in text.splitlines():
        if line.startswith("  "):
            continue
        fields = line.split(" | ")[0].split()
        offset, lex_filenum, count = fields[0], int(fields[1]), int(fields[3], 16)
        lemmas = [(fields[4 + 2 * i], int(fields[5 + 2 * i], 16)) for i in range(count)]
        rest = fields[4 + 2 * count :]
        pointers = [rest[1 + 4 * i : 5 + 4 * i] for i in range(int(rest[0]))]
        hypernyms = [target for symbol, target, pos, _ in pointers if symbol in HYPERNYM_POINTERS and pos == "n"]
        synsets[offset] = Synset(offset, lex_filenum, lemmas, hypernyms)
    return synsets


def sense_counts(text: str) -> Counter:
    """``cntlist.rev``: tagged count per noun sense key ``lemma%1:ff:ii::``."""
    counts: Counter = Counter()
    for line in text.splitlines():
        key, _, count = line.split()
        if "%1:" in key:
            counts[key.lower()] += int(count)
    return counts


def synset_count(synset: Synset, counts: Counter) -> int:
    return sum(counts[f"{lemma.lower()}%1:{synset.lex_filenum:02d}:{lex_id:02d}::"] for lemma, lex_id in synset.lemmas)


def depths(synsets: dict[str, Synset]) -> dict[str, int]:
    """Shortest number of hypernym steps from each synset to a root."""
    memo: dict[str, int] = {}

    def depth(offset: str) -> int:
        if offset not in memo:
            parents = synsets[offset].hypernyms
            memo[offset] = 0 if not parents else 1 + min(depth(parent) for parent in parents)
        return memo[offset]

    for offset in synsets:
        depth(offset)
    return memo


def ancestors(synsets: dict[str, Synset], offset: str) -> dict[str, int]:
    """Every hypernym of a synset with its fewest steps up."""
    found, frontier, step = {}, [offset], 0
    while frontier:
        step += 1
        frontier = [parent for node in frontier for parent in synsets[node].hypernyms if parent not in found]
        for parent in frontier:
            found.setdefault(parent, step)
    return found


def lemma_text(synset: Synset) -> str:
    return synset.lemmas[0][0].replace("_", " ")


def is_test(word: str) -> bool:
    return int(hashlib.sha256(word.encode()).hexdigest(), 16) % TEST_MODULUS == 0


def build_rows(synsets: dict[str, Synset], counts: Counter, min_count: int, min_depth: int, seed: int) -> list[dict]:
    """One positive and one negative row per frequent word (module docstring)."""
    depth = depths(synsets)
    by_lemma: dict[str, tuple[int, str]] = {}
    for offset, synset in synsets.items():
        count = synset_count(synset, counts)
        word = lemma_text(synset)
        if count >= min_count and (word not in by_lemma or count > by_lemma[word][0]):
            by_lemma[word] = (count, offset)
    rng = random.Random(seed)
    positives = []
    for word in sorted(by_lemma):
        offset = by_lemma[word][1]
        candidates = {a: s for a, s in ancestors(synsets, offset).items() if s <= 3 and depth[a] >= min_depth}
        if not candidates:
            continue
        steps = rng.choice(sorted(set(candidates.values())))
        category = rng.choice(sorted(a for a, s in candidates.items() if s == steps))
        if lemma_text(synsets[category]) != word:
            positives.append((word, offset, category))
    pool = [category for _, _, category in positives]
    rows = []
    for word, offset, category in positives:
        above = ancestors(synsets, offset)
        while True:
            other = rng.choice(pool)
            if other != offset and other not in above and offset not in ancestors(synsets, other):
                break
        rows.append({"word": word, "category": lemma_text(synsets[category]), "label": "yes"})
        rows.append({"word": word, "category": lemma_text(synsets[other]), "label": "no"})
    return rows


def write_split(rows: list[dict], path: Path) -> None:
    rows = sorted(rows, key=lambda row: hashlib.sha256(f"{row['word']}|{row['category']}".encode()).hexdigest())
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def package_version(package: str) -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return result.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC)
    parser.add_argument("--copyright", type=Path, default=DEFAULT_COPYRIGHT)
    parser.add_argument("--out", type=Path, default=Path("data/wordnet_hypernyms"))
    parser.add_argument("--min-count", type=int, default=10, help="SemCor tag count of a word's synset")
    parser.add_argument("--min-depth", type=int, default=4, help="categories at least this deep below entity")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    synsets = parse_noun_data((args.src / "data.noun").read_text(encoding="latin-1"))
    counts = sense_counts((args.src / "cntlist.rev").read_text(encoding="latin-1"))
    rows = build_rows(synsets, counts, args.min_count, args.min_depth, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    test = [row for row in rows if is_test(row["word"])]
    train = [row for row in rows if not is_test(row["word"])]
    write_split(train, args.out / "train.jsonl")
    write_split(test, args.out / "test.jsonl")
    (args.out / "LICENSE").write_text(args.copyright.read_text(encoding="utf-8"), encoding="utf-8")
    print(f"wordnet-base {package_version('wordnet-base')}: {len(train)} train, {len(test)} test rows"
          f" ({len(rows) // 2} words)")


if __name__ == "__main__":
    main()
