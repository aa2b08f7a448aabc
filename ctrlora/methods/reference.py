"""Reference rows for encoder studies (docs/EVALUATION.md §4): the frozen encoder with a trained head, and
full fine-tuning. They bracket the adapter methods: no adaptation of the encoder at all, and every
weight trained. Neither has a parameter budget or an adapter: the run's ``adapter/`` holds the whole
fine-tuned model in Transformers' format (``AutoModelForSequenceClassification.from_pretrained``).

Only for sequence classifiers (``model.task=sequence_classification``): a causal LM has no separate
head to train, and full fine-tuning of a 7B backbone is outside what this framework is for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from ctrlora.errors import ConfigError
from ctrlora.methods.base import MethodBase, parameter_count, register_method, trainable_parameter_count
from ctrlora.task_types import SEQUENCE_CLASSIFICATION


@register_method("head_only", "full_ft")
class ReferenceMethod(MethodBase):
    """``head_only``: only ``model.modules_to_save`` (the classifier) trains; ``full_ft``: everything."""

    def prepare(self, model: PreTrainedModel, calibration: DataLoader | None) -> nn.Module:
        if self.ctx.model.task != SEQUENCE_CLASSIFICATION:
            raise ConfigError(
                f"method={self.name} is a reference row for sequence classifiers; model={self.ctx.model.name} "
                f"has task {self.ctx.model.task!r} (use an encoder such as model=minilm-l6)"
            )
        heads = list(self.ctx.model.modules_to_save)
        if self.name == "head_only" and not heads:
            raise ConfigError(f"method=head_only needs model.modules_to_save (the head); model={self.ctx.model.name} has none")
        for name, param in model.named_parameters():
            param.requires_grad_(self.name == "full_ft" or any(name.startswith(f"{head}.") for head in heads))
        self.backbone_params = parameter_count(model)
        self.trainable = trainable_parameter_count(model)
        return model

    def save_adapter(self, model: PreTrainedModel, out_dir: Path) -> None:
        model.save_pretrained(out_dir)

    def describe(self) -> dict[str, Any]:
        return {
            "rank": None, "ratio": None, "backbone_params": self.backbone_params,
            "target_params": self.trainable, "allowed_params": None,
        }
