"""The calibration subset is fixed by calibration.seed alone, unshuffled, and sharded exactly across ranks."""

from __future__ import annotations

import torch

from ctrlora.config import CalibrationConfig, DataConfig
from ctrlora.data.calibration import calibration_indices
from ctrlora.data.datamodule import FinetuneDataModule

NUM_ROWS = 40


def sequences(loader) -> list[list[int]]:
    """The unpadded input ids of every example, in loader order."""
    return [
        ids[mask.bool()].tolist()
        for batch in loader
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    ]


def expected_sequence(tokenizer, index: int) -> list[int]:
    text = f"question {index}? answer {index}"
    return (
        [tokenizer.bos_token_id]
        + tokenizer(text, add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
    )


def prompt_completion_module(
    tokenizer, write_jsonl, seed: int, calibration: CalibrationConfig
) -> FinetuneDataModule:
    rows = [{"prompt": f"question {i}?", "completion": f" answer {i}"} for i in range(NUM_ROWS)]
    cfg = DataConfig(
        train=str(write_jsonl("train.jsonl", rows)), test=None, format="prompt_completion", batch_size=4,
        val_fraction=0.0,
    )
    module = FinetuneDataModule(cfg, tokenizer, seed=seed, calibration=calibration)
    module.setup()
    return module


def test_indices_are_a_seeded_permutation_prefix():
    expected = torch.randperm(100, generator=torch.Generator().manual_seed(3)).tolist()
    assert calibration_indices(100, 10, seed=3) == expected[:10]
    assert (
        calibration_indices(100, 30, seed=3)[:10] == expected[:10]
    )  # a larger sample contains a smaller one
    assert sorted(calibration_indices(7, 2048, seed=0)) == list(range(7))  # all when fewer
    assert calibration_indices(100, 10, seed=4) != expected[:10]


def test_subset_depends_on_calibration_seed_not_training_seed(tokenizer, write_jsonl):
    calibration = CalibrationConfig(num_samples=10, batch_size=4, seed=0)
    first = prompt_completion_module(tokenizer, write_jsonl, seed=0, calibration=calibration)
    other_run = prompt_completion_module(tokenizer, write_jsonl, seed=1, calibration=calibration)
    loader = first.calibration_dataloader()
    expected = [expected_sequence(tokenizer, i) for i in calibration_indices(NUM_ROWS, 10, seed=0)]
    assert sequences(loader) == sequences(loader) == sequences(other_run.calibration_dataloader()) == expected
    assert [len(batch["input_ids"]) for batch in loader] == [4, 4, 2]
    # the training stream, in contrast, follows the training seed
    first_batch = next(iter(first.train_dataloader()))["input_ids"].tolist()
    assert first_batch != next(iter(other_run.train_dataloader()))["input_ids"].tolist()
    reseeded = prompt_completion_module(
        tokenizer, write_jsonl, seed=0, calibration=CalibrationConfig(10, 4, seed=1)
    )
    assert sequences(reseeded.calibration_dataloader()) != expected


def test_rank_shards_are_disjoint_and_cover_the_subset(tokenizer, write_jsonl):
    module = prompt_completion_module(
        tokenizer, write_jsonl, seed=0, calibration=CalibrationConfig(11, 2, seed=0)
    )
    single = sequences(module.calibration_dataloader())
    shards = [sequences(module.calibration_dataloader(world_size=3, rank=rank)) for rank in range(3)]
    assert [len(shard) for shard in shards] == [4, 4, 3]
    assert sorted(sum(shards, [])) == sorted(single) and len(set(map(tuple, single))) == 11
