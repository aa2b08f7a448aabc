"""Encoder backbones: accuracy, macro-F1 and MCC against the textbook formulas on the same predictions."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import BertConfig, BertForSequenceClassification

from ctrlora.backbones import build_tiny_tokenizer
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.errors import ConfigError
from ctrlora.evaluation.classification import (
    classification_metrics,
    classification_test_loader,
    classifier_eval_section,
)
from evaluation.helpers import train_config


def reference_metrics(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    confusion = np.zeros((num_classes, num_classes))
    np.add.at(confusion, (labels, predictions), 1)
    true_positive = np.diag(confusion)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    f1 = [
        2 * tp / (p + a) if p + a else 0.0 for tp, p, a in zip(true_positive, predicted, actual, strict=True)
    ]
    n, correct = confusion.sum(), true_positive.sum()
    mcc = (correct * n - predicted @ actual) / math.sqrt(
        (n**2 - predicted @ predicted) * (n**2 - actual @ actual)
    )
    return {"accuracy": correct / n, "macro_f1": float(np.mean(f1)), "mcc": float(mcc)}


def test_classification_metrics_match_the_formulas() -> None:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).train()
    examples = [
        {
            "input_ids": torch.randint(5, 50, (7,)),
            "attention_mask": torch.ones(7, dtype=torch.long),
            "labels": label,
        }
        for label in torch.randint(0, 3, (40,)).tolist()
    ]
    loader = DataLoader(
        examples,
        batch_size=16,
        collate_fn=lambda rows: {
            key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in rows[0]
        },
    )
    metrics = classification_metrics(model, loader, num_classes=3)

    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        inputs = torch.stack([row["input_ids"] for row in examples])
        predictions = (
            model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits.argmax(-1).numpy()
        )
    labels = np.array([row["labels"] for row in examples])
    expected = reference_metrics(predictions, labels, 3)
    assert len(set(predictions.tolist())) > 1  # a non-degenerate case for F1 and MCC
    for name, value in expected.items():
        assert metrics[name]["value"] == pytest.approx(value, abs=1e-6), name
    accuracy = expected["accuracy"]
    assert metrics["accuracy"]["stderr"] == pytest.approx(math.sqrt(accuracy * (1 - accuracy) / 39))
    assert metrics["macro_f1"]["stderr"] is None and metrics["mcc"]["stderr"] is None
    assert metrics["predicted_classes"]["value"] == len(set(predictions.tolist()))


def test_test_loader_uses_the_training_label_ids(tmp_path) -> None:
    cfg = train_config(["data.max_length=32"], tmp_path)
    datamodule = FinetuneDataModule(cfg.data, build_tiny_tokenizer(), task="sequence_classification")
    datamodule.setup("fit")
    batches = list(classification_test_loader(datamodule, batch_size=64))
    rows = datamodule.test_rows()
    labels = torch.cat([batch["labels"] for batch in batches]).tolist()
    assert labels == [datamodule.label_names.index(row["label"]) for row in rows]
    assert batches[0]["input_ids"].shape == (64, 32) and "attention_mask" in batches[0]


class OutOfMemoryAbove(torch.nn.Module):
    """`model`, raising the CPU allocator's out-of-memory error for a batch of more than `rows` rows."""

    def __init__(self, model: torch.nn.Module, rows: int) -> None:
        super().__init__()
        self.model, self.rows, self.sizes = model, rows, []

    def forward(self, **inputs: torch.Tensor) -> object:
        self.sizes.append(len(inputs["input_ids"]))
        if self.sizes[-1] > self.rows:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes.")
        return self.model(**inputs)


def test_an_auto_batch_size_shrinks_until_the_model_fits_and_scores_the_same(tmp_path) -> None:
    cfg = train_config(["data.max_length=32", "eval.limit=40"], tmp_path)
    datamodule = FinetuneDataModule(cfg.data, build_tiny_tokenizer(), task="sequence_classification")
    datamodule.setup("fit")
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=260, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        num_labels=len(datamodule.label_names),
    ))
    fixed = classifier_eval_section(model, datamodule, replace(cfg.eval, batch_size=8))
    squeezed = OutOfMemoryAbove(model, rows=16)
    auto = classifier_eval_section(squeezed, datamodule, replace(cfg.eval, batch_size="auto", max_batch_size=32))
    assert auto == fixed
    shrinking = [32, 28, 25, 22, 19, 17, 15]  # each 10% smaller (accelerate's rule) until a batch fits
    assert squeezed.sizes[:7] == shrinking and max(squeezed.sizes[7:]) <= 15
    with pytest.raises(ConfigError, match=r"eval.batch_size='big' is not a batch size"):
        replace(cfg.eval, batch_size="big")
