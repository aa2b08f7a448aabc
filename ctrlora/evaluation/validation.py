"""The validation score of a run (docs/EVALUATION.md §4.1): what a sweeper optimises, never the test split.

``val`` in results.json holds the mean training loss on the validation examples (per sequence for a
classifier, per supervised token for a causal LM) and, for a classifier, accuracy, macro-F1 and MCC
(`classification_metrics`). `objective_value` picks the number ``train.py`` returns to a Hydra
sweeper: ``eval.val_metric`` (``auto``: accuracy for a classifier, loss for a causal LM).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from ctrlora.curvature.objectives import summed_loss
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.evaluation.batching import with_batch_size
from ctrlora.evaluation.classification import classification_metrics
from ctrlora.evaluation.config import EvalConfig, objective_metric
from ctrlora.task_types import SEQUENCE_CLASSIFICATION


def validation_section(model: nn.Module, datamodule: FinetuneDataModule, suite: EvalConfig) -> dict[str, Any] | None:
    """``{"examples", "loss", [accuracy, macro_f1, mcc, predicted_classes]}`` on the validation split in
    batches of ``eval.batch_size``; None without one."""

    def scored(batch_size: int) -> dict[str, Any] | None:
        loader = datamodule.validation_loader(batch_size)
        if loader is None:
            return None
        section: dict[str, Any] = {"examples": len(loader.dataset), "loss": summed_loss(model, loader).per_term}
        if datamodule.task == SEQUENCE_CLASSIFICATION:
            metrics = classification_metrics(model, loader, num_classes=len(datamodule.label_names or []))
            section.update({name: value["value"] for name, value in metrics.items()})
        return section

    return with_batch_size(suite.batch_size, scored, suite.max_batch_size)


def objective_value(results: dict[str, Any], val_metric: str, task: str) -> float | None:
    """The validation number a sweeper optimises (None when the run has no validation split)."""
    section = results.get("val")
    return None if not section else float(section[objective_metric(val_metric, task)])


class PeriodicValidation(L.Callback):
    """Scores the validation split every ``eval.val_every_n_steps`` optimizer steps during training and
    logs ``val/<metric>`` (metrics.csv, W&B). Every rank computes it (a sharded model needs them all)."""

    def __init__(self, datamodule: FinetuneDataModule, suite: EvalConfig) -> None:
        if not suite.val_every_n_steps:
            raise ValueError("PeriodicValidation needs eval.val_every_n_steps")
        self.datamodule, self.suite, self.every = datamodule, suite, suite.val_every_n_steps
        self.scored_step = 0  # micro-batches of one optimizer step share its global_step: score once

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if step % self.every or step == self.scored_step:
            return
        self.scored_step = step
        section = validation_section(pl_module.model, self.datamodule, self.suite) or {}
        metrics = {f"val/{metric}": value for metric, value in section.items() if metric != "examples"}
        for logger in trainer.loggers:  # straight to the loggers: one row, at the step just taken
            logger.log_metrics(metrics, step=step - 1)
