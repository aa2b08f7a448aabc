"""The LoRA-family baselines through PEFT (docs/METHODS.md §2): lora, qlora, dora, pissa, loraplus.

They differ only in PEFT options set by their config files — `use_dora`, `init`
(`pissa_niter_4`), `quantize_4bit`, `loraplus_ratio`, `rslora` — so one class serves all, and the
same switches compose (e.g. ``method=dora method.rslora=true``). Every target gets the
uniform-equivalent rank r̄ of the budget.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, prepare_model_for_kbit_training
from peft.optimizers import create_loraplus_optimizer
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from ctrlora.methods.base import MethodBase, register_method, resolve_budget, to_float32_trainables
from ctrlora.peft_layout import ADAPTER
from ctrlora.task_types import SEQUENCE_CLASSIFICATION

CONVERTIBLE_INITS = ("pissa", "olora")  # inits that move the base weights; export converts back


def peft_task_type(task: str) -> TaskType:
    return TaskType.SEQ_CLS if task == SEQUENCE_CLASSIFICATION else TaskType.CAUSAL_LM


@register_method("lora", "qlora", "dora", "pissa", "loraplus")
class LoraMethod(MethodBase):
    """Uniform-rank LoRA and its PEFT variants."""

    def lora_config(self, rank: int, **overrides) -> LoraConfig:
        """The stock `LoraConfig` for rank r̄ on the model's target modules."""
        method, model = self.ctx.method, self.ctx.model
        options = dict(
            r=rank,
            lora_alpha=method.alpha,
            lora_dropout=method.dropout,
            target_modules=list(model.target_modules),
            use_rslora=method.rslora,
            use_dora=method.use_dora,
            init_lora_weights=True if method.init == "default" else method.init,
            task_type=peft_task_type(model.task),
            modules_to_save=list(model.modules_to_save) or None,
        )
        options.update(overrides)
        return LoraConfig(**options)

    def prepare(self, model: PreTrainedModel, calibration: DataLoader | None) -> PeftModel:
        self.budget = resolve_budget(self.ctx.budget, model, list(self.ctx.model.target_modules))
        if self.ctx.method.quantize_4bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.ctx.model.gradient_checkpointing
            )
        peft_model = get_peft_model(model, self.lora_config(self.budget.rank))
        to_float32_trainables(peft_model)
        if self.converts_on_export:
            self._save_initial_adapter(peft_model)
        return peft_model

    @property
    def converts_on_export(self) -> bool:
        return str(self.ctx.method.init).startswith(CONVERTIBLE_INITS)

    @property
    def initial_adapter_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "initial_adapter"

    def _save_initial_adapter(self, peft_model: PeftModel) -> None:
        """PEFT's conversion recipe: save the initial adapter with `init_lora_weights=True`."""
        config = peft_model.peft_config[ADAPTER]
        init = config.init_lora_weights
        config.init_lora_weights = True
        peft_model.save_pretrained(self.initial_adapter_dir)
        config.init_lora_weights = init

    def save_adapter(self, model: PeftModel, out_dir: Path) -> None:
        """PiSSA/OLoRA: convert to a delta on the original base, so stock PEFT applies it there."""
        if self.converts_on_export:
            model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=str(self.initial_adapter_dir))
        else:
            model.save_pretrained(out_dir)

    def param_groups(self, model: PeftModel, lr: float) -> list[dict]:
        """LoRA+: PEFT's groups, B (and embedding B) at `loraplus_ratio` × the lr of A."""
        ratio = self.ctx.method.loraplus_ratio
        if ratio is None:
            return super().param_groups(model, lr)
        optimizer = create_loraplus_optimizer(
            model, optimizer_cls=torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
            weight_decay=self.ctx.weight_decay,
        )
        return [group for group in optimizer.param_groups if group["params"]]
