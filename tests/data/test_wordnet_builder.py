"""scripts/build_wordnet_hypernyms.py: the pair rules on a small hierarchy, the committed data set, and
(where Debian's wordnet-base is installed) byte-identical rebuilds."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_wordnet_hypernyms.py"
DATA = ROOT / "data" / "wordnet_hypernyms"
WORDNET = Path("/usr/share/wordnet")

_spec = importlib.util.spec_from_file_location("build_wordnet_hypernyms", SCRIPT)
builder = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = builder  # its dataclasses look their module up
_spec.loader.exec_module(builder)

# offset lex_filenum n w_cnt(hex) word lex_id p_cnt [symbol offset pos source/target] | gloss
HIERARCHY = {  # name: parent
    "entity": None, "object": "entity", "whole": "object", "living_thing": "whole", "organism": "living_thing",
    "animal": "organism", "plant": "organism", "dog": "animal", "cat": "animal", "tree": "plant", "oak": "tree",
    "artifact": "whole", "tool": "artifact", "hammer": "tool", "saw": "tool",
}


def small_wordnet() -> tuple[dict, Counter]:
    offsets = {name: f"{index:08d}" for index, name in enumerate(HIERARCHY)}
    lines = []
    for name, parent in HIERARCHY.items():
        pointers = f"001 @ {offsets[parent]} n 0000" if parent else "000"
        lines.append(f"{offsets[name]} 05 n 01 {name} 0 {pointers} | a {name}")
    counts = "\n".join(f"{name}%1:05:00:: 1 {50 if name in ('dog', 'cat', 'oak', 'hammer', 'saw') else 1}"
                       for name in HIERARCHY)
    return builder.parse_noun_data("  license line\n" + "\n".join(lines)), builder.sense_counts(counts)


def test_each_word_gets_a_true_category_and_a_false_one_drawn_from_the_same_pool() -> None:
    synsets, counts = small_wordnet()
    rows = builder.build_rows(synsets, counts, min_count=10, min_depth=3, seed=0)
    names = {builder.lemma_text(s): offset for offset, s in synsets.items()}
    assert sorted({row["word"] for row in rows}) == ["cat", "dog", "hammer", "oak", "saw"]
    depth = builder.depths(synsets)
    for row in rows:
        above = builder.ancestors(synsets, names[row["word"]])
        category = names[row["category"]]
        if row["label"] == "yes":
            assert category in above and above[category] <= 3 and depth[category] >= 3
        else:
            assert category not in above and names[row["word"]] not in builder.ancestors(synsets, category)
    assert Counter(row["label"] for row in rows) == {"yes": 5, "no": 5}
    positives = {row["category"] for row in rows if row["label"] == "yes"}
    assert {row["category"] for row in rows if row["label"] == "no"} <= positives


def read_split(name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_committed_data_is_balanced_per_word_and_splits_by_word() -> None:
    splits = {name: read_split(name) for name in ("train", "test")}
    for name, rows in splits.items():
        per_word = Counter((row["word"], row["label"]) for row in rows)
        assert set(per_word.values()) == {1} and len(per_word) == len(rows)  # one yes and one no per word
        assert Counter(row["label"] for row in rows)["yes"] == len(rows) // 2
        assert all(builder.is_test(row["word"]) == (name == "test") for row in rows)
        digests = [hashlib.sha256(f"{row['word']}|{row['category']}".encode()).hexdigest() for row in rows]
        assert digests == sorted(digests)
    assert len(splits["train"]) == 2368 and len(splits["test"]) == 574  # the README's counts


@pytest.mark.skipif(not (WORDNET / "data.noun").is_file(), reason="Debian's wordnet-base is not installed")
def test_builder_reproduces_the_committed_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    for name in ("train.jsonl", "test.jsonl", "LICENSE"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
