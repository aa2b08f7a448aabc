"""CTR-LoRA's trust region: a curvature-metric penalty on the adapter update (docs/METHODS.md §6.2).

The training loss is ``L_task + λ(t) · ½ Σ_l ‖s_l B_l A_l‖²_{M_l}`` with the Kronecker metric
``M_l = S_g ⊗ S_a`` of module l, ``‖X‖²_M = tr(Xᵀ S_g X S_a)``. With the damped raw K-FAC factors
(scaled to the training loss's units, `ctr_lora`) ``½‖ΔW‖²_M`` is the K-FAC quadratic model of the
training loss — for the Fisher, the second-order KL from the base model — so λ is dimensionless.
It is a soft penalty on the whole adapter update (the displacement from the pretrained weight),
annealed to 0 over training.

PEFT layout: a LoRA-wrapped ``nn.Linear`` (``W ∈ R^{m×n}``, m = out_features, n = in_features)
holds ``lora_A[adapter].weight`` of shape ``(r, n)`` = A and ``lora_B[adapter].weight`` of shape
``(m, r)`` = B, and adds ``scaling[adapter] · B A x``; so the tensors go in as they are stored,
no transposes. ``ctrlora.peft_layout.lora_weights`` collects them from a ``PeftModel``.

Under FSDP2 (`trainer=fsdp`) the adapter weights are ``DTensor`` shards; the penalty all-gathers
them (``full_tensor``, differentiable) and computes the same value on every rank. Its gradient,
identical on every rank, flows back to each rank's shard, so it adds to FSDP's rank-averaged
task gradient exactly as in one process (as under DDP, where the averaging leaves it unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

SCHEDULES = ("cosine", "linear", "constant")


class SymmetricFactor(Protocol):
    """A symmetric PSD Kronecker factor S (d×d) that can multiply a block of columns."""

    def apply(self, X: Tensor) -> Tensor:
        """``S @ X`` for ``X`` of shape ``(d, k)``."""
        ...


def kronecker_penalty(
    B: Tensor, A: Tensor, scaling: float, s_g: SymmetricFactor, s_a: SymmetricFactor
) -> Tensor:
    """``‖s B A‖²_M = s² tr((BA)ᵀ S_g (BA) S_a) = s² tr((Bᵀ S_g B)(A S_a Aᵀ))``.

    By cyclicity of the trace, ``tr(Aᵀ Bᵀ S_g B A S_a) = tr((Bᵀ S_g B)(A S_a Aᵀ))``, a product of two
    r×r Gram matrices: ``S_g`` multiplies the r columns of B (m×r) and ``S_a`` the r columns of Aᵀ
    (n×r), costing two factor-times-block products plus O((m+n) r²) — never an m×n matrix. The
    trace of a product of two matrices is the sum of the elementwise product of one with the
    other's transpose. Differentiable in A and B. Computed in at least fp32 (bf16/fp16 adapters
    are upcast); the factors must accept that dtype and live on the adapters' device. Sharded
    (FSDP2) weights are gathered first (`full_weight`), a collective every rank must enter.
    """
    B, A = full_weight(B), full_weight(A)
    dtype = torch.promote_types(B.dtype, torch.float32)
    return _GramPenalty.apply(B.to(dtype), A.to(dtype), scaling, s_g, s_a)


class _GramPenalty(torch.autograd.Function):
    """``s² tr(G_g G_a)`` with ``G_g = Bᵀ P``, ``P = S_g B`` and ``G_a = A Q``, ``Q = S_a Aᵀ``.

    With S_g, S_a symmetric (so G_g, G_a are too), the gradients reuse the forward's products:
    ``∂/∂B = 2 s² P G_a`` and ``∂/∂A = 2 s² G_g Qᵀ`` — O((m+n) r²) on top of the forward, where
    autograd through the factor products would multiply by S_g and S_a a second time.
    """

    @staticmethod
    def forward(ctx, B: Tensor, A: Tensor, scaling: float, s_g: SymmetricFactor, s_a: SymmetricFactor) -> Tensor:
        P = s_g.apply(B).to(B.dtype)
        Q = s_a.apply(A.T).to(A.dtype)
        gram_g, gram_a = B.T @ P, A @ Q  # r×r
        ctx.save_for_backward(P, Q, gram_g, gram_a)
        ctx.scaling = scaling
        return scaling**2 * (gram_g * gram_a.T).sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        P, Q, gram_g, gram_a = ctx.saved_tensors
        coefficient = 2 * ctx.scaling**2 * grad
        return coefficient * (P @ gram_a), coefficient * (gram_g @ Q.T), None, None, None


def full_weight(weight: Tensor) -> Tensor:
    """The whole matrix of a weight: an FSDP2 ``DTensor`` shard all-gathered (differentiably: the
    gradient of the gathered matrix goes back to this rank's shard), any other tensor as it is."""
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


@dataclass(frozen=True)
class LambdaSchedule:
    """Penalty weight ``λ(t)`` annealed from ``λ₀`` at step 0 to 0 at ``total_steps`` = T.

    cosine: ``λ₀ · ½ (1 + cos(π t / T))``; linear: ``λ₀ (1 − t / T)``; constant: ``λ₀``.
    The step is clamped to ``[0, T]``.
    """

    kind: str
    lambda0: float
    total_steps: int

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown lambda schedule {self.kind!r}; choose one of {list(SCHEDULES)}")
        if not self.lambda0 >= 0:
            raise ValueError(f"lambda0 must be >= 0, got {self.lambda0}")
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {self.total_steps}")

    def __call__(self, step: int) -> float:
        progress = min(max(step, 0), self.total_steps) / self.total_steps
        if self.kind == "cosine":
            return self.lambda0 * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "linear":
            return self.lambda0 * (1.0 - progress)
        return self.lambda0


@dataclass
class ModuleMetric:
    """The trust-region metric of one adapted module: its Kronecker factors and LoRA scaling."""

    s_g: SymmetricFactor  # output-gradient factor, m×m
    s_a: SymmetricFactor  # input-activation factor, n×n
    scaling: float  # s = PEFT's scaling[adapter] of this module


class TrustRegionPenalty:
    """``½ Σ_l ‖s_l B_l A_l‖²_{M_l}`` over the adapted modules (without λ: multiply by λ(t)).

    ``metrics`` maps module names to their ``ModuleMetric``; ``update`` swaps in refreshed factors
    (docs/METHODS.md §6.3). Calling it with ``{name: (B, A)}`` sums ``kronecker_penalty`` over exactly the
    modules of ``metrics``; a module missing from the adapters is an error, so a renamed or
    dropped module can never silently leave the penalty.
    """

    def __init__(self, metrics: Mapping[str, ModuleMetric]) -> None:
        if not metrics:
            raise ValueError("TrustRegionPenalty needs at least one module metric")
        self.metrics = dict(metrics)

    def update(self, name: str, metric: ModuleMetric) -> None:
        """Replace the metric of a module (after a curvature refresh)."""
        if name not in self.metrics:
            raise KeyError(f"module {name!r} has no trust-region metric; known: {sorted(self.metrics)}")
        self.metrics[name] = metric

    def __call__(self, adapters: Mapping[str, tuple[Tensor, Tensor]]) -> Tensor:
        missing = sorted(set(self.metrics) - set(adapters))
        if missing:
            raise KeyError(f"no LoRA weights given for modules {missing}")
        terms = [
            kronecker_penalty(*adapters[name], metric.scaling, metric.s_g, metric.s_a)
            for name, metric in self.metrics.items()
        ]
        return 0.5 * torch.stack(terms).sum()
