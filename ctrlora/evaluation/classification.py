"""Classification metrics for encoder backbones (docs/EVALUATION.md §1): accuracy, macro-F1 and MCC.

With predictions ŷ and labels y over n examples and K classes (torchmetrics' definitions):

    accuracy  = (1/n) Σᵢ [ŷᵢ = yᵢ],  stderr = sqrt(acc (1 - acc) / (n - 1))  (as lm-eval's mean stderr)
    macro-F1  = (1/K) Σₖ 2 TPₖ / (2 TPₖ + FPₖ + FNₖ)
    MCC       = (c·s - Σₖ pₖ tₖ) / sqrt((s² - Σₖ pₖ²)(s² - Σₖ tₖ²))

where c = Σₖ TPₖ, s = n, pₖ = #{ŷ = k}, tₖ = #{y = k} (Gorodkin's multiclass MCC).
"""

from __future__ import annotations

import math
from importlib.metadata import version
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef

from ctrlora.curvature.hooks import calibration_mode
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.data.formats import classification_row
from ctrlora.data.tokenization import tokenize_classification
from ctrlora.errors import DataError
from ctrlora.evaluation.batching import with_batch_size
from ctrlora.evaluation.config import EvalConfig

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PREDICTED_CLASSES = "predicted_classes"  # how many distinct classes the model predicted: 1 flags a collapse


@torch.no_grad()
def classification_metrics(
    model: nn.Module, loader: DataLoader, num_classes: int
) -> dict[str, dict[str, float | None]]:
    """``{"accuracy" | "macro_f1" | "mcc" | "predicted_classes": {"value", "stderr"}}`` of `model` on `loader`.

    Batches are dicts with ``input_ids``, ``attention_mask`` (and ``token_type_ids``) and
    integer class ids in ``labels``; the prediction is the argmax of ``model(**inputs).logits``.
    Only accuracy has a standard error (None for the others). Train/eval mode is restored.
    """
    device = next(model.parameters()).device
    metrics = MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "mcc": MulticlassMatthewsCorrCoef(num_classes),
        }
    ).to(device)
    count, predicted = 0, set()
    with calibration_mode(model, keep_checkpointing=False, input_grads=False):  # eval mode, safe mid-training
        for batch in loader:
            inputs = {key: batch[key].to(device) for key in MODEL_INPUTS if key in batch}
            labels = batch["labels"].to(device)
            predictions = model(**inputs).logits.argmax(dim=-1)
            metrics.update(predictions, labels)
            predicted.update(predictions.tolist())
            count += labels.numel()
    if count == 0:
        raise DataError("classification_metrics: the loader yielded no examples")
    values = {name: float(value) for name, value in metrics.compute().items()}
    accuracy = values["accuracy"]
    stderr = math.sqrt(accuracy * (1 - accuracy) / (count - 1)) if count > 1 else None
    return {
        "accuracy": {"value": accuracy, "stderr": stderr},
        "macro_f1": {"value": values["macro_f1"], "stderr": None},
        "mcc": {"value": values["mcc"], "stderr": None},
        PREDICTED_CLASSES: {"value": len(predicted), "stderr": None},
    }


def classification_test_loader(
    datamodule: FinetuneDataModule, batch_size: int, limit: float | None = None
) -> DataLoader:
    """The data set's test split, tokenised like training, with class ids in the training label order.

    `limit` (``eval.limit``): the first `limit` examples, or that fraction of them when below 1."""
    cfg = datamodule.cfg
    rows = datamodule.test_rows()
    if not rows:
        raise DataError(
            f"data.test is empty or null for data set {cfg.name!r}; classification needs a test split"
        )
    if limit is not None:
        rows = rows[: int(limit) if limit >= 1 else math.ceil(limit * len(rows))]
    label_to_id = {name: index for index, name in enumerate(datamodule.label_names or [])}
    examples = [classification_row(row, f"{cfg.test} row {index + 1}", cfg) for index, row in enumerate(rows)]
    tokenized = tokenize_classification(
        [example.text for example in examples],
        [example.text_pair for example in examples] if cfg.text_pair_field else None,
        [label_to_id[str(example.label)] for example in examples],
        datamodule.tokenizer,
        cfg.max_length,
    )
    return DataLoader(tokenized, batch_size=batch_size, shuffle=False, collate_fn=datamodule.collator)


def classifier_eval_section(model: nn.Module, datamodule: FinetuneDataModule, suite: EvalConfig) -> dict[str, Any]:
    """results.json's ``eval`` section for an encoder run: ``{<data set>: metrics, "versions": {...}}``,
    on ``eval.limit`` test examples in batches of ``eval.batch_size``."""

    def scored(batch_size: int) -> tuple[dict[str, Any], int]:
        loader = classification_test_loader(datamodule, batch_size, suite.limit)
        return classification_metrics(model, loader, num_classes=len(datamodule.label_names or [])), len(loader.dataset)

    metrics, samples = with_batch_size(suite.batch_size, scored, suite.max_batch_size)
    name = datamodule.cfg.name
    versions = {"torchmetrics": version("torchmetrics"), "samples": {name: samples}, "limit": {name: suite.limit}}
    return {name: metrics, "versions": versions}
