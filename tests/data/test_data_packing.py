"""Packing keeps every example whole (so every supervised token), and collation pads on the right."""

from __future__ import annotations

import random

import torch

from ctrlora.data.collate import PadCollator
from ctrlora.data.packing import pack_examples
from ctrlora.data.tokenization import IGNORE_INDEX


def random_examples(count: int, max_length: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    examples = []
    for index in range(count):
        length, prompt = rng.randint(2, max_length), rng.randint(0, 5)
        input_ids = [1000 * index + position for position in range(length)]
        labels = [IGNORE_INDEX if position < prompt else token for position, token in enumerate(input_ids)]
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def test_packing_preserves_every_example_and_supervised_token():
    max_length = 32
    examples = random_examples(200, max_length)
    blocks = pack_examples(examples, max_length)
    assert len(blocks) < len(examples)
    assert all(len(block["input_ids"]) == len(block["labels"]) <= max_length for block in blocks)
    # Concatenated, the blocks are exactly the concatenated examples, in order.
    assert sum((block["input_ids"] for block in blocks), []) == sum((e["input_ids"] for e in examples), [])
    assert sum((block["labels"] for block in blocks), []) == sum((e["labels"] for e in examples), [])
    # No example is split across blocks: each example's first and last token share a block.
    block_of = {token: b for b, block in enumerate(blocks) for token in block["input_ids"]}
    assert all(block_of[e["input_ids"][0]] == block_of[e["input_ids"][-1]] for e in examples)
    # Greedy: a block is closed only when the next example would not fit.
    starts = {e["input_ids"][0]: len(e["input_ids"]) for e in examples}
    for block, following in zip(blocks, blocks[1:], strict=False):
        assert len(block["input_ids"]) + starts[following["input_ids"][0]] > max_length


def test_collator_pads_right_with_mask_and_ignored_labels():
    examples = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = PadCollator(pad_token_id=3)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["input_ids"].dtype == torch.long


def test_collator_stacks_class_ids_and_pads_token_types():
    examples = [
        {"input_ids": [5, 6], "token_type_ids": [0, 1], "labels": 2},
        {"input_ids": [7], "token_type_ids": [0], "labels": 0},
    ]
    batch = PadCollator(pad_token_id=0)(examples)
    assert batch["labels"].tolist() == [2, 0]
    assert batch["token_type_ids"].tolist() == [[0, 1], [0, 0]]
