"""Build the bundled quotation-topic data set ``data/fortune_topics/`` from Debian's fortunes.

Install the source files first (Debian/Ubuntu)::

    sudo apt-get install fortunes
    python scripts/build_fortune_topics.py --src /usr/share/games/fortunes --out data/fortune_topics

Each of the 8 topic files (computers, food, law, medicine, politics, science, sports, startrek)
holds quotations separated by lines that are exactly ``%``. Every quotation is cleaned:

* repairs UTF-8 text that was decoded as Latin-1 (once or several times) and normalises to NFC;
* removes terminal overstriking (``_\\bX``, ``X\\bX`` -> ``X``) and other control characters;
* removes attribution blocks: an indented line starting with ``--`` (``\\t\\t-- Kirk, "Catspaw",
  stardate 3018.2``) plus its continuation lines (non-blank lines indented at least as deep as
  the ``--``), wherever they occur, so no author or episode name can leak the label;
* joins an unindented line that starts with ``--`` (a dash wrapped onto a new line) onto the
  previous line, so no line of the output starts with ``--``;
* strips trailing spaces, removes the common indentation and blank lines at both ends, and
  collapses runs of blank lines into one; line structure and inner paragraph indents are kept.

Items shorter than ``--min-chars`` non-space characters are dropped; exact duplicates within a
topic are kept once; a text that occurs under two topics is dropped from both (its label is
ambiguous). The split is deterministic: a text goes to test when ``int(sha256(text)) % 5 == 0``
(about 20%). Rows ``{"text", "label"}`` are sorted by the sha256 of the text, an order that is
fixed but interleaves the topics. The same inputs always give byte-identical outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import textwrap
import unicodedata
from collections import Counter, defaultdict
from pathlib import Path

TOPICS = ("computers", "food", "law", "medicine", "politics", "science", "sports", "startrek")
DEFAULT_SRC = Path("/usr/share/games/fortunes")
DEFAULT_COPYRIGHT = Path("/usr/share/doc/fortunes/copyright")
DEFAULT_MIN_CHARS = 20
TEST_MODULUS = 5  # one text in 5 (20%) goes to the test split

ATTRIBUTION_LINE = re.compile(r"^([ \t]+)--\s")
WRAPPED_DASH_LINE = re.compile(r"^--\s")
OVERSTRUCK_CHARACTER = re.compile(r"[^\x08]\x08")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
BSD_NOTICE = re.compile(r"^Copyright \(c\) 1991 The Regents.*?SUCH DAMAGE\.$", re.S | re.M)


def split_quotations(raw: str) -> list[str]:
    """Split a fortune file on the lines that are exactly ``%``."""
    items, current = [], []
    for line in raw.split("\n"):
        if line == "%":
            items.append("\n".join(current))
            current = []
        else:
            current.append(line)
    items.append("\n".join(current))
    return items


def repair_mojibake(text: str) -> str:
    """Undo UTF-8 bytes decoded as Latin-1, repeatedly (some entries were double-encoded)."""
    while any("\x80" <= ch <= "\xff" for ch in text):
        try:
            repaired = text.encode("latin-1").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            break
        if repaired == text:
            break
        text = repaired
    return unicodedata.normalize("NFC", text)


def remove_overstriking(text: str) -> str:
    """``c\\bX`` prints X over c: keep only X; then drop every other control character but tab."""
    while "\b" in text:
        stripped = OVERSTRUCK_CHARACTER.sub("", text)
        if stripped == text:
            stripped = text.replace("\b", "")
        text = stripped
    return CONTROL_CHARACTERS.sub("", text)


def indentation_width(line: str) -> int:
    """Column of the first non-blank character, tabs expanded to 8."""
    expanded = line.expandtabs(8)
    return len(expanded) - len(expanded.lstrip())


def remove_attributions(lines: list[str]) -> list[str]:
    """Drop every attribution line (indented ``--``) and its deeper-indented continuation lines."""
    kept: list[str] = []
    dash_column: int | None = None
    for line in lines:
        if ATTRIBUTION_LINE.match(line):
            dash_column = indentation_width(line)
            continue
        if dash_column is not None and line.strip() and indentation_width(line) >= dash_column:
            continue
        dash_column = None
        kept.append(line)
    return kept


def join_wrapped_dashes(lines: list[str]) -> list[str]:
    """Append an unindented ``-- text`` line to the previous non-blank line (blank lines between go)."""
    joined: list[str] = []
    for line in lines:
        if WRAPPED_DASH_LINE.match(line) and any(previous.strip() for previous in joined):
            while not joined[-1].strip():
                joined.pop()
            joined[-1] = f"{joined[-1].rstrip()} {line}"
        else:
            joined.append(line)
    return joined


def clean_quotation(raw: str) -> str:
    """The cleaned text of one quotation (see the module docstring); '' when nothing is left."""
    lines = remove_overstriking(repair_mojibake(raw)).split("\n")
    lines = join_wrapped_dashes(remove_attributions(lines))
    text = textwrap.dedent("\n".join(line.rstrip() for line in lines))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_test(text: str) -> bool:
    """The hash split: test iff the sha256 of the text, as an integer, is divisible by 5."""
    return int(sha256_hex(text), 16) % TEST_MODULUS == 0


def collect_rows(src: Path, min_chars: int) -> list[dict[str, str]]:
    """Cleaned, deduplicated rows of all topics; texts seen under two topics are dropped."""
    topics_of_text: dict[str, set[str]] = defaultdict(set)
    for topic in TOPICS:
        path = src / topic
        if not path.is_file():
            raise SystemExit(
                f"{path} not found: install Debian's fortunes (apt-get install fortunes) or pass --src"
            )
        for raw in split_quotations(path.read_text(encoding="utf-8")):
            text = clean_quotation(raw)
            if len("".join(text.split())) >= min_chars:
                topics_of_text[text].add(topic)
    return [
        {"text": text, "label": next(iter(topics))}
        for text, topics in topics_of_text.items()
        if len(topics) == 1
    ]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    ordered = sorted(rows, key=lambda row: sha256_hex(row["text"]))
    lines = [json.dumps({"text": row["text"], "label": row["label"]}, ensure_ascii=False) for row in ordered]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def package_version() -> str:
    """The installed Debian package version of fortunes, or 'unknown' off Debian."""
    try:
        result = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "fortunes"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return result.stdout.strip() or "unknown"


def readme_text(train: list[dict[str, str]], test: list[dict[str, str]], min_chars: int) -> str:
    train_counts, test_counts = Counter(r["label"] for r in train), Counter(r["label"] for r in test)
    table = ["| topic | train | test |", "|---|---:|---:|"]
    table += [f"| {t} | {train_counts[t]} | {test_counts[t]} |" for t in TOPICS]
    table.append(f"| **total** | {len(train)} | {len(test)} |")
    return f"""# fortune_topics — quotation topic classification (8 classes)

Quotations from the topic files of Debian's `fortunes` package (BSD fortune(6) data, package
version {package_version()}), each labelled with the topic file it comes from:
{", ".join(TOPICS)}.
Licence: BSD, see `LICENSE`.

Rows are JSON lines `{{"text": "...", "label": "<topic>"}}`. Used as a classification set by encoder
backbones and, through `conf/data/fortune_topics.yaml`'s prompt/completion templates, as
instruction data for causal LMs.

## How it was built

    apt-get install fortunes
    python scripts/build_fortune_topics.py --src /usr/share/games/fortunes --out data/fortune_topics

Each quotation (split on lines that are exactly `%`) has its attribution lines (`-- Author,
"Work"` and their continuation lines) removed so that no author or episode name reveals the
topic (a dash wrapped onto the start of a line of the quotation itself is joined to the line
before); mis-encoded UTF-8 repaired; terminal overstriking and control characters removed;
trailing spaces, common indentation and repeated blank lines stripped. Quotations with fewer than
{min_chars} non-space characters are dropped, duplicates are kept once, and a text found under two
topics is dropped. A text is in the test split iff the sha256 of its UTF-8 bytes, read as an
integer, is divisible by {TEST_MODULUS}. Rows are sorted by that hash. The script is deterministic:
rerunning it gives byte-identical files.

## Counts

{chr(10).join(table)}
"""


def license_text(copyright_path: Path) -> str:
    """The BSD notice of the Debian copyright file, with a header naming the source."""
    match = BSD_NOTICE.search(copyright_path.read_text(encoding="utf-8"))
    if match is None:
        raise SystemExit(
            f"{copyright_path}: BSD notice (Copyright (c) 1991 The Regents ... SUCH DAMAGE.) not found"
        )
    return (
        "The quotations in this directory come from the topic files of the BSD fortune(6) data as\n"
        "packaged by Debian (package `fortunes`, source `fortune-mod`). The following notice is\n"
        f"copied verbatim from {copyright_path}:\n\n{match.group(0)}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="folder holding the fortune files")
    parser.add_argument("--out", type=Path, default=Path("data/fortune_topics"), help="output folder")
    parser.add_argument("--copyright", type=Path, default=DEFAULT_COPYRIGHT, help="Debian copyright file")
    parser.add_argument("--min-chars", type=int, default=DEFAULT_MIN_CHARS, help="minimum non-space chars")
    args = parser.parse_args()

    rows = collect_rows(args.src, args.min_chars)
    train = [row for row in rows if not is_test(row["text"])]
    test = [row for row in rows if is_test(row["text"])]
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    (args.out / "README.md").write_text(readme_text(train, test, args.min_chars), encoding="utf-8")
    (args.out / "LICENSE").write_text(license_text(args.copyright), encoding="utf-8")
    print(f"wrote {len(train)} train and {len(test)} test rows to {args.out}")


if __name__ == "__main__":
    main()
