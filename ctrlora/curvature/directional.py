"""The exact quadratic model of the mean token loss along one direction in parameter space.

For parameters θ and a direction V (a tangent per parameter), the loss along the line is modelled as

    L̄(θ + ηV) ≈ L̄(θ) + η·d + ½ η²·c,   d = ∇L̄ᵀV,   c = Vᵀ C V,   C = Jᵀ H_ℓ J  (Gauss–Newton)

with J the Jacobian of the model outputs (logits) in θ and H_ℓ the Hessian of the summed loss in
the outputs (for softmax cross-entropy ``diag(p) − ppᵀ`` per counted token, so C is also the
Fisher). Per calibration batch, one forward-mode JVP gives ``u = J V`` (the outputs' tangent);
then ``d = ⟨∇_z ℓ, u⟩`` and ``c = uᵀ H_ℓ u`` come from the loss in the outputs alone (a backward
and a double backward through the loss head, never through the model). Sums are divided by the
counted tokens T (all ranks), as every estimator's are (docs/METHODS.md §3). The minimiser of the model
is ``η* = −d / c``, K-FAC's own step rescaling (Martens & Grosse 2015 §6.4), exact where the
Kronecker factors underestimate the curvature along V.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor, nn
from torch.func import functional_call

from ctrlora.curvature.hooks import calibration_mode
from ctrlora.curvature.hutchinson import math_attention
from ctrlora.curvature.objectives import objective_for
from ctrlora.curvature.runtime import all_reduce_count, all_reduce_sum_, batch_to_device, input_device


@dataclass(frozen=True)
class DirectionalModel:
    """``L̄(θ + ηV) ≈ L̄(θ) + η·slope + ½ η²·curvature`` over `tokens` counted tokens."""

    slope: float  # d = ∇L̄ᵀV
    curvature: float  # c = Vᵀ C V (Gauss–Newton), ≥ 0
    tokens: int

    @property
    def minimiser(self) -> float:
        """``η* = −d / c``; NaN when the model has no minimum along +V (d ≥ 0 or c ≤ 0)."""
        if not (self.slope < 0 and self.curvature > 0):
            return math.nan
        return -self.slope / self.curvature

    def change(self, eta: float) -> float:
        """The modelled ``L̄(θ + ηV) − L̄(θ)``."""
        return eta * self.slope + 0.5 * eta**2 * self.curvature


def directional_model(
    model: nn.Module, batches: Iterable[dict[str, Any]], tangents: Mapping[str, Tensor]
) -> DirectionalModel:
    """The exact slope and Gauss–Newton curvature of the mean token loss along `tangents` (module docstring).

    `tangents` maps parameter names of `model` (``model.named_parameters()``) to directions of the
    same shapes; other parameters stay fixed. Eval mode (dropout off), math attention (fused
    kernels have no forward-mode derivative); the model's modes and flags are restored.
    """
    params = dict(model.named_parameters())
    unknown = sorted(set(tangents) - set(params))
    if unknown:
        raise KeyError(f"no parameters named {unknown[:3]} in the model")
    device = input_device(model)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    tokens, objective = 0, None
    with calibration_mode(model, keep_checkpointing=False, input_grads=False), math_attention(model):
        for batch in batches:
            batch = batch_to_device(batch, device)
            objective = objective or objective_for(batch)
            with forward_ad.dual_level():
                duals = {name: forward_ad.make_dual(params[name].detach(), tangent) for name, tangent in tangents.items()}
                outputs = objective.forward(_Reparametrized(model, duals), batch)
                primal, tangent = forward_ad.unpack_dual(outputs)
            sums += _loss_derivatives(objective, primal.detach(), tangent.detach(), batch)
            tokens += int(objective.token_mask(batch).sum())
    tokens = all_reduce_count(tokens, device)
    if tokens == 0:
        raise ValueError("the calibration batches hold no counted tokens (every label is -100 or padding)")
    all_reduce_sum_([sums])
    slope, curvature = (float(value) / tokens for value in sums)
    return DirectionalModel(slope=slope, curvature=curvature, tokens=tokens)


def _loss_derivatives(objective: Any, outputs: Tensor, direction: Tensor, batch: dict[str, Any]) -> Tensor:
    """``(⟨∇_z ℓ, u⟩, uᵀ H_ℓ u)`` of the summed loss ℓ at outputs z along output direction u."""
    dtype = torch.promote_types(outputs.dtype, torch.float32)
    outputs = outputs.to(dtype).requires_grad_(True)
    direction = direction.to(dtype)
    with torch.enable_grad():
        (gradient,) = torch.autograd.grad(objective.loss(outputs, batch), outputs, create_graph=True)
        slope = (gradient * direction).sum()
        (hessian_direction,) = torch.autograd.grad(slope, outputs)
    return torch.stack([slope.detach(), (hessian_direction * direction).sum()]).double()


class _Reparametrized:
    """Calls `model` with some parameters replaced (``torch.func.functional_call``), as a callable."""

    def __init__(self, model: nn.Module, parameters: Mapping[str, Tensor]) -> None:
        self.model, self.parameters = model, dict(parameters)

    def __call__(self, **inputs: Any) -> Any:
        return functional_call(self.model, self.parameters, args=(), kwargs=inputs, strict=False)
