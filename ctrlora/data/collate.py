"""Collation: right-pad a list of tokenized examples into tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ctrlora.data.tokenization import IGNORE_INDEX, TokenizedExample


class PadCollator:
    """Right padding: ``input_ids`` with ``pad_token_id``, ``token_type_ids`` with 0, ``labels`` with -100.

    ``attention_mask`` is 1 on the tokens and 0 on the padding. Integer labels (classification)
    are stacked into a ``[batch]`` tensor instead.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[TokenizedExample]) -> dict[str, torch.Tensor]:
        lengths = [len(example["input_ids"]) for example in examples]
        width = max(lengths)

        def padded(key: str, value: int) -> torch.Tensor:
            rows = [list(example[key]) + [value] * (width - len(example[key])) for example in examples]
            return torch.tensor(rows, dtype=torch.long)

        batch = {
            "input_ids": padded("input_ids", self.pad_token_id),
            "attention_mask": torch.tensor([[1] * n + [0] * (width - n) for n in lengths], dtype=torch.long),
        }
        if "token_type_ids" in examples[0]:
            batch["token_type_ids"] = padded("token_type_ids", 0)
        if isinstance(examples[0]["labels"], int):
            batch["labels"] = torch.tensor([example["labels"] for example in examples], dtype=torch.long)
        else:
            batch["labels"] = padded("labels", IGNORE_INDEX)
        return batch
