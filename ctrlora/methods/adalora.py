"""AdaLoRA through PEFT (docs/METHODS.md §1–2): SVD-form adapters pruned from ⌈1.5 r̄⌉ to r̄ on average.

PEFT's `AdaLoraModel.forward` adds the orthogonal regulariser to `outputs.loss` when labels are
passed, so the loss goes through the model. `update_and_allocate` runs after every optimizer step,
before the gradients are zeroed (Lightning zeroes them at the start of the next step's closure).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from peft import AdaLoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from ctrlora.methods.base import MethodBase, register_method, resolve_budget, to_float32_trainables
from ctrlora.methods.lora_family import peft_task_type
from ctrlora.peft_layout import ADAPTER


class AdaLoraRankUpdate(L.Callback):
    """Call PEFT's `update_and_allocate(step)` once per optimizer step (not per micro-batch)."""

    def __init__(self) -> None:
        self.last_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step - 1  # index of the optimizer step just taken
        if step > self.last_step:
            pl_module.model.base_model.update_and_allocate(step)
            self.last_step = step


@register_method("adalora")
class AdaLoraMethod(MethodBase):
    """PEFT's AdaLoRA at the budget's rank (the LoRA switches it cannot apply are refused by its config)."""

    def adalora_config(self, rank: int) -> AdaLoraConfig:
        """`target_r = r̄`, `init_r = ⌈1.5 r̄⌉`, schedule as fractions of the total steps."""
        settings, total = self.ctx.method.adalora, self.total_steps
        return AdaLoraConfig(
            init_r=math.ceil(settings.init_r_factor * rank),
            target_r=rank,
            tinit=int(settings.tinit * total),
            tfinal=int(settings.tfinal * total),
            deltaT=max(1, int(settings.delta_t * total)),
            total_step=total,
            beta1=settings.beta1,
            beta2=settings.beta2,
            orth_reg_weight=settings.orth_reg_weight,
            lora_alpha=self.ctx.method.alpha,
            lora_dropout=self.ctx.method.dropout,
            target_modules=list(self.ctx.model.target_modules),
            task_type=peft_task_type(self.ctx.model.task),
            modules_to_save=list(self.ctx.model.modules_to_save) or None,
        )

    def prepare(self, model: PreTrainedModel, calibration: DataLoader | None) -> PeftModel:
        self.budget = resolve_budget(self.ctx.budget, model, list(self.ctx.model.target_modules))
        self.model = get_peft_model(model, self.adalora_config(self.budget.rank))
        to_float32_trainables(self.model)
        return self.model

    def callbacks(self) -> list[L.Callback]:
        self.rank_update = AdaLoraRankUpdate()
        return [self.rank_update]

    def state_dict(self) -> dict[str, Any]:
        """The rank allocator's sensitivity averages and the current rank pattern."""
        allocator = self.model.base_model.rankallocator
        return {
            "ipt": allocator.ipt, "exp_avg_ipt": allocator.exp_avg_ipt, "exp_avg_unc": allocator.exp_avg_unc,
            "rank_pattern": self.model.peft_config[ADAPTER].rank_pattern,
            "last_step": self.rank_update.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        allocator = self.model.base_model.rankallocator
        allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
            state["ipt"], state["exp_avg_ipt"], state["exp_avg_unc"]
        )
        self.model.peft_config[ADAPTER].rank_pattern = state["rank_pattern"]
        self.rank_update.last_step = state["last_step"]
