"""CTR-LoRA's trust region (docs/METHODS.md §6.2): the metric, the anchors and the λ schedule.

    L_task + λ(t) · ½ Σ_l ‖s_l (B_l A_l − B⁰_l A⁰_l)‖²_{M_l}

with the damped raw Kronecker metric ``M_l = (T/N) S_g ⊗ S_a`` (``ctr.metric: fisher``: the K-FAC
model of the training loss, so λ is dimensionless) or its unit-mean form (``normalized``), computed
from r×r Gram matrices (`ctrlora.trust_region`), λ annealed from ``ctr.lambda0``. The anchor
``B⁰A⁰`` is 0 except for inits that move the base weights (``ctr.compose: pissa``), where the
displacement from the pretrained weight is ``s(BA − B⁰A⁰)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ctrlora.curvature.factor_base import Factor
from ctrlora.curvature.factors import LowRankFactor
from ctrlora.curvature.lowrank import DampedPairs
from ctrlora.curvature.result import CurvatureResult
from ctrlora.methods.settings import CtrSettings
from ctrlora.peft_layout import ADAPTER, adapter_parameters
from ctrlora.trust_region import LambdaSchedule, ModuleMetric, TrustRegionPenalty


def metric_dtype(layer: nn.Module) -> torch.dtype | None:
    """bf16 when the layer's base computes in bf16 (its weight, or a 4-bit layer's compute dtype), else
    None: the factors keep their estimation dtype. bf16 halves the metric's memory and is safe for a
    soft penalty: its factors are damped (positive definite), the product ``S_g B`` is rounded to
    bf16 (relative error ≈ 2⁻⁸ on a term annealed to 0), and bf16 has fp32's range, unlike fp16."""
    base = layer.get_base_layer()
    compute = getattr(base, "compute_dtype", None) or base.weight.dtype
    return torch.bfloat16 if compute == torch.bfloat16 else None


def held_at_rank(factor: Factor, rank: int | None) -> Factor:
    """`factor` as the metric holds it: with ``ctr.metric_rank`` = k, a dense or low-rank factor wider than k
    becomes its top-k eigenpairs plus the mean of the other eigenvalues (trace kept: d·k numbers
    instead of d²); a diagonal one, a narrower one or any factor at k = None stays as it is."""
    if rank is None or factor.storage == "diagonal":
        return factor
    width = factor.rank if isinstance(factor, LowRankFactor) else factor.dim
    return factor.truncated(rank) if rank < width else factor


class TrustRegion:
    """The penalty of the adapted modules; `loss` is the term added to the training loss."""

    def __init__(self, settings: CtrSettings, total_steps: int, *, damping: float, pi_split: bool) -> None:
        self.enabled, self.fisher = settings.trust_region, settings.metric == "fisher"
        self.schedule = LambdaSchedule(settings.lambda_schedule, settings.lambda0 if self.enabled else 0.0, total_steps)
        self.damping, self.pi_split, self.metric_rank = damping, pi_split, settings.metric_rank
        self.penalty: TrustRegionPenalty | None = None
        self.anchors: dict[str, tuple[Tensor, Tensor]] = {}
        self.loss_scale = 1.0  # T/N of the calibration set: the fisher metric in training-loss units
        self.last_lambda, self.last_penalty = 0.0, None

    def build(self, curvature: CurvatureResult | None, layers: dict[str, nn.Module]) -> None:
        """The metric of `layers` from `curvature` (each shared ``a`` once) on the adapters' devices, in
        bf16 where the backbone computes in bf16 (`metric_dtype`), else as estimated. Only the metric
        is kept in training, not the raw factors (a refresh's raw factors are in its file, for
        resuming): it is the one copy.

        ``fisher``: the damped raw factors with S_g times ``T/N`` (`loss_scale`), so ``½‖ΔW‖²_M`` is
        the K-FAC model of the training loss itself; ``normalized``: each factor at unit mean
        eigenvalue (the ablation whose scale depends on nothing but the shapes). ``ctr.metric_rank``
        truncates them after damping (`held_at_rank`).
        """
        if not self.enabled or curvature is None:
            self.penalty = None
            return
        pairs = DampedPairs(self.damping, self.pi_split)  # a shared ``a`` is damped once
        shared: dict[int, Any] = {}
        metrics = {}
        for name, layer in layers.items():
            raw = curvature[name]
            a, g = pairs(raw)
            device, dtype = adapter_parameters(layer)[0].device, metric_dtype(layer)
            if id(raw.a) not in shared:
                s_a = a if self.fisher else a.normalized()
                shared[id(raw.a)] = held_at_rank(s_a, self.metric_rank).to(device, dtype)
            s_g = held_at_rank(g.scaled(self.loss_scale) if self.fisher else g.normalized(), self.metric_rank)
            metrics[name] = ModuleMetric(s_g=s_g.to(device, dtype), s_a=shared[id(raw.a)], scaling=layer.scaling[ADAPTER])
        self.penalty = TrustRegionPenalty(metrics)

    def release(self) -> None:
        """Drop the metric until the next `build` (a refresh re-estimates it: the old and the new metric are
        then never held at once)."""
        self.penalty = None

    def anchor(self, name: str, layer: nn.Module) -> None:
        """Record the layer's initial adapter ``s·B⁰, A⁰`` as the origin of its displacement."""
        B, A = adapter_parameters(layer)
        self.anchors[name] = (layer.scaling[ADAPTER] * B.detach().clone(), A.detach().clone())

    def displacement(self, name: str, layer: nn.Module) -> tuple[Tensor, Tensor]:
        """``(B, A)`` whose ``s·BA`` is the update from the pretrained weight (concatenated with the anchor)."""
        B, A = adapter_parameters(layer)
        if name not in self.anchors:
            return B, A
        anchor_b, anchor_a = self.anchors[name]
        return torch.cat([B, -anchor_b / layer.scaling[ADAPTER]], dim=1), torch.cat([A, anchor_a], dim=0)

    def loss(self, layers: dict[str, nn.Module], step: int) -> Tensor | None:
        """``λ(step) · ½ Σ_l ‖s_l ΔW_l‖²_{M_l}`` (None without a trust region)."""
        self.last_lambda = self.schedule(step)
        if self.penalty is None:
            return None
        penalty = self.penalty({name: self.displacement(name, layer) for name, layer in layers.items()})
        self.last_penalty = penalty.detach()  # a tensor: logging it needs no host sync each step
        return self.last_lambda * penalty

    def step_metrics(self) -> dict[str, float | Tensor]:
        metrics: dict[str, float | Tensor] = {"lambda": self.last_lambda}
        if self.last_penalty is not None:
            metrics["penalty"] = self.last_penalty
        return metrics
