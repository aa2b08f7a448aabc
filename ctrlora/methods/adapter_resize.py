"""Change the rank of a live PEFT LoRA layer (CTR-LoRA re-allocation, docs/METHODS.md §6.3).

The LoRA parameters keep their identity: their ``.data`` is replaced by a tensor of the new shape,
so the optimizer, LoRA+ parameter groups and the trust-region penalty keep pointing at them; only
the optimizer moments of a resized module are dropped (AdamW starts them afresh, step 0). PEFT's
bookkeeping (``r``, ``lora_alpha``, ``scaling``, the config's ``rank_pattern``/``alpha_pattern``)
is updated so the saved adapter loads in plain PEFT with the new shapes.

- grow ``r → r'``: B gains zero columns and A rows drawn like PEFT's LoRA init (Kaiming uniform,
  a = √5), so ``s' B'A' = s BA`` (B is rescaled by ``s/s'`` when the scale depends on the rank):
  the function is unchanged.
- shrink ``r → r'``: the best rank-r' approximation of ``s BA`` in the trust-region metric
  (`lowrank.truncate_in_metric`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from peft import LoraConfig
from torch import Tensor, nn

from ctrlora.curvature.factors import Factor
from ctrlora.curvature.lowrank import truncate_in_metric
from ctrlora.peft_layout import ADAPTER, adapter_parameters


@torch.no_grad()
def replace_adapter(
    layer: nn.Module, name: str, config: LoraConfig, B: Tensor, A: Tensor, alpha: float
) -> None:
    """Give a LoRA layer new factors ``B`` (m×r'), ``A`` (r'×n) and ``α'`` (scale ``α'/r'``) in place."""
    rank = A.shape[0]
    if B.shape[1] != rank:
        raise ValueError(f"B has {B.shape[1]} columns but A has {rank} rows")
    weight_b, weight_a = adapter_parameters(layer)
    weight_b.data = B.to(dtype=weight_b.dtype, device=weight_b.device).contiguous()
    weight_a.data = A.to(dtype=weight_a.dtype, device=weight_a.device).contiguous()
    weight_b.grad = weight_a.grad = None
    layer.lora_B[ADAPTER].in_features = rank
    layer.lora_A[ADAPTER].out_features = rank
    layer.r[ADAPTER] = rank
    layer.lora_alpha[ADAPTER] = alpha
    layer.scaling[ADAPTER] = alpha / rank
    config.rank_pattern[name] = rank
    config.alpha_pattern[name] = alpha


def grown_factors(layer: nn.Module, rank: int, alpha: float) -> tuple[Tensor, Tensor]:
    """``(B', A')`` of rank `rank` ≥ r with ``(α'/r') B'A' = s B A``: new A rows random, new B columns 0."""
    weight_b, weight_a = adapter_parameters(layer)
    extra = rank - weight_a.shape[0]
    if extra < 0:
        raise ValueError(f"cannot grow from rank {weight_a.shape[0]} to {rank}")
    new_rows = torch.empty(extra, weight_a.shape[1], dtype=weight_a.dtype, device=weight_a.device)
    nn.init.kaiming_uniform_(new_rows, a=math.sqrt(5))
    ratio = layer.scaling[ADAPTER] / (alpha / rank)
    B = torch.cat([weight_b.detach() * ratio, weight_b.new_zeros(weight_b.shape[0], extra)], dim=1)
    return B, torch.cat([weight_a.detach(), new_rows], dim=0)


def shrunk_factors(layer: nn.Module, rank: int, alpha: float, a: Factor, g: Factor) -> tuple[Tensor, Tensor]:
    """``(B', A')`` of rank `rank` < r: the truncation of ``s BA`` in the metric ``S_g ⊗ S_a`` (damped)."""
    weight_b, weight_a = adapter_parameters(layer)
    return truncate_in_metric(weight_b, weight_a, layer.scaling[ADAPTER], alpha / rank, a, g, rank)


def reset_moments(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Forget the optimizer state of `params` (AdamW re-initialises it lazily at the next step)."""
    for param in params:
        optimizer.state.pop(param, None)


def resize_adapters(
    layers: Mapping[str, nn.Module],
    changes: Mapping[str, Sequence[int]],
    config: LoraConfig,
    alpha_for: Callable[[int], float],
    metric_of: Callable[[str], tuple[Factor, Factor]],
    optimizer: torch.optim.Optimizer | None,
) -> None:
    """Apply ``{name: [old rank, new rank]}``: grow, or shrink in the metric ``metric_of(name)`` = (S_a,
    S_g) damped; the moments of a resized module are dropped."""
    for name, (old, rank) in changes.items():
        layer, alpha = layers[name], alpha_for(rank)
        B, A = grown_factors(layer, rank, alpha) if rank > old else shrunk_factors(layer, rank, alpha, *metric_of(name))
        replace_adapter(layer, name, config, B, A, alpha)
        if optimizer is not None:
            reset_moments(optimizer, list(adapter_parameters(layer)))
