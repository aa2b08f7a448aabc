"""Packing: several tokenized causal-LM examples per sequence, so short examples waste no padding."""

from __future__ import annotations

from collections.abc import Sequence

from ctrlora.data.tokenization import TokenizedExample


def pack_examples(examples: Sequence[TokenizedExample], max_length: int) -> list[TokenizedExample]:
    """Concatenate whole examples, in order, into blocks of at most ``max_length`` tokens.

    An example that would overflow the current block starts the next one, so no example is split:
    every supervised token keeps its label and all of its example's context before it. Each
    example already ends with EOS, which separates it from the next one in the block (attention
    still spans the block, as in standard packing). Examples longer than ``max_length`` (there are
    none after `tokenize_causal`) become blocks of their own.
    """
    blocks: list[TokenizedExample] = []
    current: TokenizedExample = {"input_ids": [], "labels": []}
    for example in examples:
        if current["input_ids"] and len(current["input_ids"]) + len(example["input_ids"]) > max_length:
            blocks.append(current)
            current = {"input_ids": [], "labels": []}
        current["input_ids"] += example["input_ids"]
        current["labels"] += example["labels"]
    if current["input_ids"]:
        blocks.append(current)
    return blocks
