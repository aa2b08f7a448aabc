"""Fixtures of the data tests: the tiny byte-level tokenizer and writers of small data files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from ctrlora.backbones import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level, no merges: each ASCII character is one token; BOS prepended; has a chat template."""
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    """The same tokenizer without a chat template."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[[str, list[Any]], Path]:
    """Write rows (dicts, or raw strings written verbatim as lines) to tmp_path/name."""

    def write(name: str, rows: list[Any]) -> Path:
        path = tmp_path / name
        lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        return path

    return write
