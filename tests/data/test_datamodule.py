"""FinetuneDataModule end to end: bundled fortune_topics with the tiny tokenizer, and a Lightning resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from ctrlora.config import DataConfig
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.data.sampler import StepSampler
from ctrlora.data.tokenization import IGNORE_INDEX
from ctrlora.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
TOPICS = ["computers", "food", "law", "medicine", "politics", "science", "sports", "startrek"]


def fortune_config() -> DataConfig:
    """conf/data/fortune_topics.yaml merged into the DataConfig schema, as Hydra composes it."""
    merged = OmegaConf.merge(
        OmegaConf.structured(DataConfig), OmegaConf.load(ROOT / "conf/data/fortune_topics.yaml")
    )
    return OmegaConf.to_object(merged)


def whole_train_set() -> DataConfig:
    """fortune_topics with every training row trained on (no validation split held out)."""
    cfg = fortune_config()
    cfg.val_fraction = 0.0
    return cfg


def jsonl_rows(path: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def fortunes(tokenizer) -> FinetuneDataModule:
    module = FinetuneDataModule(whole_train_set(), tokenizer, seed=3, base_dir=ROOT)
    module.setup()
    return module


def test_fortune_topics_causal_lm_batches_supervise_the_topic(fortunes, tokenizer):
    cfg = fortunes.cfg
    train_rows = jsonl_rows(cfg.train)
    assert fortunes.label_names == TOPICS
    assert fortunes.test_rows() == jsonl_rows(cfg.test)
    assert fortunes.stats.num_examples == fortunes.stats.num_sequences == len(train_rows)

    loader = fortunes.train_dataloader()
    batch = next(iter(loader))
    assert batch["input_ids"].shape[0] == cfg.batch_size and batch["input_ids"].shape[1] <= cfg.max_length
    for row_index, ids, labels in zip(
        StepSampler(len(train_rows), cfg.batch_size, seed=3).batch(0),
        batch["input_ids"],
        batch["labels"],
        strict=True,
    ):
        row = train_rows[row_index]
        assert tokenizer.decode(labels[labels != IGNORE_INDEX]) == f" {row['label']}</s>"
        prompt = tokenizer.decode(ids[(labels == IGNORE_INDEX) & (ids != tokenizer.pad_token_id)])
        assert prompt.endswith(f"{row['text'][-20:]}\nWhat is the topic of this quotation?\nTopic:")


def test_fortune_topics_for_sequence_classification(tokenizer):
    module = FinetuneDataModule(
        whole_train_set(), tokenizer, task="sequence_classification", seed=0, base_dir=ROOT
    )
    module.setup()
    train_rows = jsonl_rows(module.cfg.train)
    batch = next(iter(module.train_dataloader()))
    indices = StepSampler(len(train_rows), module.cfg.batch_size, seed=0).batch(0)
    assert batch["labels"].tolist() == [TOPICS.index(train_rows[i]["label"]) for i in indices]
    first_text = tokenizer.decode(
        batch["input_ids"][0][batch["attention_mask"][0].bool()], skip_special_tokens=True
    )
    assert first_text == train_rows[indices[0]]["text"][: len(first_text)]
    assert module.stats.num_supervised_tokens is None


def test_trainer_sets_rank_world_size_and_resume_point(fortunes):
    fortunes.trainer = SimpleNamespace(world_size=2, global_rank=1, global_step=3, accumulate_grad_batches=2)
    try:
        sampler = fortunes.train_dataloader().batch_sampler
    finally:
        fortunes.trainer = None
    assert (sampler.world_size, sampler.rank, sampler.start_batch, sampler.seed) == (2, 1, 6, 3)


def test_packing_keeps_supervised_tokens(tokenizer):
    cfg = whole_train_set()
    cfg.packing = True
    packed = FinetuneDataModule(cfg, tokenizer, base_dir=ROOT)
    packed.setup()
    plain = FinetuneDataModule(whole_train_set(), tokenizer, base_dir=ROOT)
    plain.setup()
    assert packed.stats.num_sequences < plain.stats.num_sequences
    assert (
        packed.stats.num_supervised_tokens
        == plain.stats.num_supervised_tokens
        == sum(
            len(tokenizer(f" {row['label']}", add_special_tokens=False)["input_ids"]) + 1
            for row in jsonl_rows(cfg.train)
        )
    )


class BatchRecorder(L.LightningModule):
    """Records the examples of every training batch; one scalar parameter so the optimizer has work."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[list[int]]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append(batch["input_ids"].tolist())
        return self.weight * batch["attention_mask"].float().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(
    data_path: Path, tokenizer, max_steps: int, ckpt_path: Path | None = None
) -> tuple[L.Trainer, BatchRecorder]:
    """A fresh data module and Trainer (as in a new process); 2 batches are accumulated per step."""
    cfg = DataConfig(train=str(data_path), test=None, format="prompt_completion", batch_size=3)
    data = FinetuneDataModule(cfg, tokenizer, seed=1)
    trainer = L.Trainer(
        max_steps=max_steps,
        accumulate_grad_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    model = BatchRecorder()
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model


@pytest.mark.filterwarnings("ignore")
def test_lightning_resume_continues_the_batch_stream(tmp_path: Path, write_jsonl, tokenizer):
    rows = [{"prompt": f"q{i}:", "completion": f" a{i}"} for i in range(10)]
    data_path = write_jsonl("train.jsonl", rows)
    _, uninterrupted = fit(data_path, tokenizer, max_steps=4)
    assert len(uninterrupted.seen) == 8  # 4 optimizer steps x 2 accumulated batches

    first_trainer, first_half = fit(data_path, tokenizer, max_steps=2)
    checkpoint = tmp_path / "half.ckpt"
    first_trainer.save_checkpoint(checkpoint)
    _, second_half = fit(data_path, tokenizer, max_steps=4, ckpt_path=checkpoint)
    assert first_half.seen + second_half.seen == uninterrupted.seen


def held_out_lines(module: FinetuneDataModule) -> list[int]:
    return list(module._val.line_numbers)


def test_validation_split_is_deterministic_disjoint_and_never_trained_on(tokenizer):
    cfg = fortune_config()
    train_rows = jsonl_rows(cfg.train)
    modules = [FinetuneDataModule(cfg, tokenizer, seed=seed, base_dir=ROOT) for seed in (0, 1)]
    for module in modules:
        module.setup()
    held = held_out_lines(modules[0])
    assert held == held_out_lines(modules[1])  # the training seed does not move it: data.split_seed does
    assert len(held) == round(0.1 * len(train_rows)) == len(set(held))
    reseeded = FinetuneDataModule(replace(cfg, split_seed=1), tokenizer, base_dir=ROOT)
    reseeded.setup()
    assert held_out_lines(reseeded) != held

    module = modules[0]
    val_texts = {train_rows[line - 1]["text"] for line in held}
    test_texts = {row["text"] for row in jsonl_rows(cfg.test)}
    assert not val_texts & test_texts
    val_sequences = {tuple(ids[m.bool()].tolist()) for b in module.validation_loader(16)
                     for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True)}
    assert len(val_sequences) == len(held)
    trained = {tuple(example["input_ids"]) for example in module._sequences}
    calibrated = {tuple(ids[m.bool()].tolist()) for b in module.calibration_dataloader()
                  for ids, m in zip(b["input_ids"], b["attention_mask"], strict=True)}
    assert not val_sequences & trained and not val_sequences & calibrated
    assert module.stats.num_examples == len(train_rows) - len(held)


def test_a_validation_file_replaces_the_held_out_fraction(tokenizer, tmp_path):
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"text": "Beam me up.", "label": "startrek"}) + "\n")
    module = FinetuneDataModule(replace(fortune_config(), val=str(val)), tokenizer, base_dir=ROOT)
    module.setup()
    assert module.stats.num_examples == len(jsonl_rows(fortune_config().train))
    assert len(module.validation_loader(4).dataset) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": "cooking"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 1: label 'cooking' does not occur in data.train"):
        FinetuneDataModule(replace(fortune_config(), val=str(bad)), tokenizer, base_dir=ROOT).setup()
