"""scripts/build_fortune_topics.py: cleaning rules, determinism, and the committed data set."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_fortune_topics.py"
DATA = ROOT / "data" / "fortune_topics"
FORTUNES = Path("/usr/share/games/fortunes")
COPYRIGHT = Path("/usr/share/doc/fortunes/copyright")
needs_fortunes = pytest.mark.skipif(
    not (FORTUNES / "startrek").is_file() or not COPYRIGHT.is_file(),
    reason="Debian's fortunes is not installed",
)

_spec = importlib.util.spec_from_file_location("build_fortune_topics", SCRIPT)
builder = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(builder)


def read_split(name: str) -> list[dict[str, str]]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_attribution_and_its_continuation_are_removed():
    raw = 'Each kiss is as the first.\n\t\t-- Miramanee, Kirk\'s wife, "The Paradise Syndrome",\n\t\t   stardate 4842.6\n'
    assert builder.clean_quotation(raw) == "Each kiss is as the first."


def test_attribution_in_the_middle_goes_and_the_text_after_it_stays():
    raw = (
        "Q: first quote.\n\t\t-- Author One\n\n\t[An editor's note, indented less than the dash.]\n"
        "Second quote.\n    -- Dennis Ritchie (1941-2011), creator of\n    UNIX\n"
    )
    expected = "Q: first quote.\n\n\t[An editor's note, indented less than the dash.]\nSecond quote."
    assert builder.clean_quotation(raw) == expected


def test_wrapped_dash_line_joins_the_previous_line():
    raw = "We both get the same two kinds of customers\n-- the living and the dying.\n\t\t-- Dr. Boyce"
    assert (
        builder.clean_quotation(raw)
        == "We both get the same two kinds of customers -- the living and the dying."
    )


def test_overstriking_mojibake_and_whitespace_are_normalised():
    assert (
        builder.clean_quotation("Calm down, it's *____\b\b\b\bonly* ones.  \n")
        == "Calm down, it's *only* ones."
    )
    assert builder.clean_quotation("If _\bN persons\x07 do it") == "If N persons do it"
    assert builder.clean_quotation("You don\u00e2\u0080\u0099t") == "You don\u2019t"  # UTF-8 read as Latin-1
    assert builder.clean_quotation("\n\n\tA\n\tB\n\n\n\n\tC  \n\n") == "A\nB\n\nC"


def test_split_rule_is_the_sha256_of_the_text():
    text = "Some quotation."
    expected = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5 == 0
    assert builder.is_test(text) is expected


def test_committed_data_has_no_label_leak_and_disjoint_splits():
    train, test = read_split("train"), read_split("test")
    assert {row["label"] for row in train} == {row["label"] for row in test} == set(builder.TOPICS)
    assert not {row["text"] for row in train} & {row["text"] for row in test}
    all_rows, test_texts = train + test, {row["text"] for row in test}
    assert len({row["text"] for row in all_rows}) == len(all_rows)  # no duplicates, across topics too
    for row in all_rows:
        assert not any(line.lstrip().startswith("--") for line in row["text"].split("\n")), row
        assert "\b" not in row["text"] and row["text"] == row["text"].strip()
        assert builder.is_test(row["text"]) == (row["text"] in test_texts)
    # Star Trek attributions end in "stardate NNNN.N"; none may survive to reveal the label.
    assert not [row for row in all_rows if re.search(r"stardate \d", row["text"])]
    for rows in (train, test):
        hashes = [hashlib.sha256(row["text"].encode()).hexdigest() for row in rows]
        assert hashes == sorted(hashes)


def test_readme_counts_match_the_files():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    train, test = (
        Counter(r["label"] for r in read_split("train")),
        Counter(r["label"] for r in read_split("test")),
    )
    for topic in builder.TOPICS:
        assert f"| {topic} | {train[topic]} | {test[topic]} |" in readme
    assert "Regents of the University of California" in (DATA / "LICENSE").read_text(encoding="utf-8")


@needs_fortunes
def test_builder_is_deterministic_and_reproduces_the_committed_files(tmp_path: Path):
    outputs = [tmp_path / "first", tmp_path / "second"]
    for out in outputs:
        subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--src",
                str(FORTUNES),
                "--out",
                str(out),
                "--copyright",
                str(COPYRIGHT),
            ],
            check=True,
            capture_output=True,
        )
    for name in ("train.jsonl", "test.jsonl", "README.md", "LICENSE"):
        first = (outputs[0] / name).read_bytes()
        assert first == (outputs[1] / name).read_bytes(), name
        assert first == (DATA / name).read_bytes(), (
            f"{name} differs from the committed file: rerun the builder"
        )
