"""Load raw rows from a local json / jsonl / parquet file, a `save_to_disk` folder or a HF dataset id.

A source string counts as local when it names an existing file or folder, ends in
``.json``/``.jsonl``/``.parquet``, or starts with ``/``, ``./``, ``../`` or ``~``; anything else is
a Hugging Face dataset id. Relative local paths are resolved against ``base_dir`` (the original
working directory: Hydra may have changed the cwd) and then against the repository root, so the
bundled ``data/...`` files are found from anywhere in a source checkout.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ctrlora.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
LOCAL_PREFIXES = ("/", "./", "../", "~")
REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class RowTable:
    """Rows of one split plus where each came from, for error messages.

    ``line_numbers[i]`` is the 1-based line of row i in a JSON-lines file; ``None`` for sources
    without lines (a JSON array, parquet, a HF dataset), whose rows are named by 1-based index
    (``row_numbers``, once a split has selected some of them).
    """

    rows: list[dict[str, Any]]
    origin: str
    line_numbers: Sequence[int] | None = None
    row_numbers: Sequence[int] | None = None  # 1-based rows of the source when a selection reordered them

    def location(self, index: int) -> str:
        """``'data/x.jsonl line 17'`` or ``'data/x.parquet row 17'``."""
        if self.line_numbers is not None:
            return f"{self.origin} line {self.line_numbers[index]}"
        return f"{self.origin} row {self.row_numbers[index] if self.row_numbers is not None else index + 1}"

    def head(self, count: int | None) -> RowTable:
        """The first ``count`` rows (all when ``count`` is None)."""
        if count is None:
            return self
        return self.select(range(min(count, len(self.rows))))

    def select(self, indices: Sequence[int]) -> RowTable:
        """The rows at `indices`, in that order, each keeping its location (line or original row number)."""
        lines = None if self.line_numbers is None else [self.line_numbers[i] for i in indices]
        rows = [self.row_numbers[i] if self.row_numbers is not None else i + 1 for i in indices]
        return RowTable([self.rows[i] for i in indices], self.origin, lines, rows if lines is None else None)

    def split(self, fraction: float, seed: int) -> tuple[RowTable, RowTable]:
        """``(rest, held_out)``: ``round(fraction · n)`` rows drawn by a permutation seeded with `seed`,
        disjoint from the rest; both keep the file order and every row its location (held_out is
        empty when the fraction rounds to no row)."""
        count = len(self.rows)
        held = round(fraction * count)
        if held >= count:
            raise DataError(
                f"{self.origin}: holding out {held} of its {count} rows for validation leaves none to train on;"
                " lower data.val_fraction or give data.val"
            )
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
        held_out = sorted(order[:held])
        taken = set(held_out)
        return self.select([i for i in range(count) if i not in taken]), self.select(held_out)


def is_local_source(source: str, base_dir: Path | None = None) -> bool:
    """Whether ``source`` names a local file/folder rather than a Hugging Face dataset id."""
    if source.lower().endswith(LOCAL_SUFFIXES) or source.startswith(LOCAL_PREFIXES):
        return True
    return any(path.exists() for path in candidate_paths(source, base_dir))


def candidate_paths(source: str, base_dir: Path | None) -> list[Path]:
    """Where a local source may live: as given if absolute, else under base_dir (cwd) and the repo root."""
    path = Path(source).expanduser()
    if path.is_absolute():
        return [path]
    return [Path(base_dir or Path.cwd()) / path, REPOSITORY_ROOT / path]


def load_rows(
    source: str,
    *,
    key: str,
    base_dir: str | Path | None = None,
    hf_config: str | None = None,
    hf_split: str = "train",
) -> RowTable:
    """Rows of ``source``; ``key`` (e.g. ``'data.train'``) is the config key named in errors."""
    base = Path(base_dir) if base_dir is not None else None
    if not is_local_source(source, base):
        return load_hub_rows(source, key=key, hf_config=hf_config, hf_split=hf_split)
    candidates = candidate_paths(source, base)
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        tried = ", ".join(str(p) for p in dict.fromkeys(candidates))
        raise DataError(
            f"{key}: file '{source}' not found (looked at {tried}); set {key} to an existing file"
        )
    if path.is_dir():
        return load_saved_dataset_rows(path, source, key=key, hf_split=hf_split)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return load_parquet_rows(path, source)
    if suffix == ".jsonl":
        return load_jsonl_rows(path, source)
    if suffix == ".json":
        return load_json_rows(path, source)
    raise DataError(f"{key}: '{source}' has an unknown file type; use one of {', '.join(LOCAL_SUFFIXES)}")


def load_jsonl_rows(path: Path, origin: str) -> RowTable:
    """One JSON object per non-blank line; a malformed line fails naming the file and line."""
    rows, line_numbers = [], []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"{origin} line {line_number}: malformed JSON ({error.msg}, column {error.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(
                    f"{origin} line {line_number}: expected a JSON object, got {type(row).__name__}"
                )
            rows.append(row)
            line_numbers.append(line_number)
    return RowTable(rows, origin, line_numbers)


def load_json_rows(path: Path, origin: str) -> RowTable:
    """A ``.json`` file holding a list of objects, or JSON-lines content under a .json name."""
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        return load_jsonl_rows(path, origin)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{origin} line {error.lineno}: malformed JSON ({error.msg}, column {error.colno})"
        ) from None
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{origin} row {index + 1}: expected a JSON object, got {type(row).__name__}")
    return RowTable(rows, origin)


def load_parquet_rows(path: Path, origin: str) -> RowTable:
    import pyarrow.parquet as pq

    return RowTable(pq.read_table(path).to_pylist(), origin)


def load_saved_dataset_rows(path: Path, origin: str, *, key: str, hf_split: str) -> RowTable:
    """A folder written by ``Dataset.save_to_disk`` (or a ``DatasetDict``'s, taking ``hf_split``)."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as error:
        raise DataError(f"{key}: '{origin}' is a folder but not a saved dataset ({error})") from None
    if not isinstance(dataset, datasets.DatasetDict):
        return RowTable(dataset.to_list(), origin)
    if hf_split not in dataset:
        raise DataError(f"{key}: '{origin}' has no split '{hf_split}'; splits: {', '.join(dataset)}")
    return RowTable(dataset[hf_split].to_list(), f"{origin}[{hf_split}]")


def load_hub_rows(dataset_id: str, *, key: str, hf_config: str | None, hf_split: str) -> RowTable:
    """``datasets.load_dataset(dataset_id, hf_config, split=hf_split)``, with an actionable error offline."""
    import datasets

    try:
        dataset = datasets.load_dataset(dataset_id, hf_config, split=hf_split)
    except Exception as error:  # the hub, the cache and the builder all raise their own types
        raise DataError(
            f"{key}: '{dataset_id}' is not a local file, so it was read as a Hugging Face dataset id, and "
            f"loading it failed ({type(error).__name__}: {error}). Offline, this means no local copy exists "
            f"in the datasets cache: point {key} at a local .json/.jsonl/.parquet file (or download the "
            f"data set once with hub access)."
        ) from error
    return RowTable(dataset.to_list(), f"{dataset_id}[{hf_split}]")
