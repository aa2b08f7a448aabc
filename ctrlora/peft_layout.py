"""Where PEFT keeps a LoRA adapter, in one place: the adapter's name, the wrapper's module-name
prefix, the LoRA layers by base-model module name, and their factor parameters.

A LoRA layer holds ``lora_A[ADAPTER]`` (r×n), ``lora_B[ADAPTER]`` (m×r) and ``r[ADAPTER]``; a
``PeftModel`` names the base model's module ``model.layers.0.self_attn.q_proj`` as
``base_model.model.model.layers.0.self_attn.q_proj``. The curvature estimators hook base-model
names, so everything here is keyed by those.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

ADAPTER = "default"  # the name PEFT gives the first adapter (ctrlora's only one)
PEFT_PREFIX = "base_model.model."


def is_target(name: str, target_modules: Sequence[str]) -> bool:
    """PEFT's matching of a module name against a `target_modules` list: the name equals a target or ends
    with ``"." + target``, so a dotted target (``attention.output.dense``) picks one of several
    same-named layers."""
    return any(name == target or name.endswith("." + target) for target in target_modules)


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{base-model module name: PEFT LoRA layer}`` (names as the curvature estimators hook them)."""
    layers = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and ADAPTER in lora_a:
            layers[name.removeprefix(PEFT_PREFIX)] = module
    return layers


def adapter_parameters(layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """``(B, A)`` parameters of a LoRA layer: ``lora_B`` (m×r) and ``lora_A`` (r×n)."""
    return layer.lora_B[ADAPTER].weight, layer.lora_A[ADAPTER].weight


def lora_weights(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{base-model module name: (B, A)}`` of every LoRA layer, the live parameters (gradients flow)."""
    return {name: adapter_parameters(layer) for name, layer in lora_layers(model).items()}


@torch.no_grad()
def set_adapter(layer: nn.Module, B: Tensor, A: Tensor) -> None:
    """Overwrite a LoRA layer's ``B`` (m×r) and ``A`` (r×n) in place, in the parameters' dtype."""
    weight_b, weight_a = adapter_parameters(layer)
    weight_b.copy_(B)
    weight_a.copy_(A)
