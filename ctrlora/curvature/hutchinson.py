"""`hutchinson` estimator (docs/METHODS.md §3): diagonal of the Hessian (or Gauss–Newton matrix) of the targets.

For the mean token loss ``L̄ = L / T`` (L the summed token loss, T the counted tokens), K probes per batch:

- ``matrix: hessian``: Rademacher probes v over the target weights jointly,
  ``diag(H) ≈ (1/K) Σ_k v_k ⊙ (H v_k)`` (unbiased), ``H v`` by double backward.
- ``matrix: ggn``: Rademacher probes z in the output space, ``u = Jᵀ S z`` with ``S Sᵀ = H_ℓ`` the
  loss Hessian in the outputs (`Objective.loss_hessian_root`); since ``E[z zᵀ] = I``,
  ``E[u ⊙ u] = diag(Jᵀ H_ℓ J)``: ``diag(GGN) ≈ (1/K) Σ_k u_k ⊙ u_k`` (unbiased and never negative).
  Each probe is one backward from the outputs through the forward graph, a third of the matrix
  products of a Hessian-vector product (which takes ~6 per linear layer against the backward's 2).

The passes use math attention (fused kernels have no double backward) and no activation
checkpointing. Per-target traces are ``Σ diag`` (`ModuleCurvature.hessian_trace`). The raw,
unclamped diagonal is kept; `kronecker_fit` turns it into diagonal ``a``/``g`` factors so
consumers treat it like K-FAC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.factors import DiagonalFactor
from ctrlora.curvature.hooks import base_linear
from ctrlora.curvature.memory import StoragePlan
from ctrlora.curvature.objectives import Objective
from ctrlora.curvature.result import ModuleCurvature
from ctrlora.curvature.runtime import (
    accumulation_dtype,
    all_reduce_count,
    all_reduce_sum_,
    batch_to_device,
    input_device,
    seeded_generator,
    track,
)

Product = Callable[[Sequence[Tensor]], Sequence[Tensor]]
Generators = dict[torch.device, torch.Generator]
GGN_PROBES = "output_space"  # part of the cache key: diag(GGN) from u = Jᵀ S z (before: v ⊙ Gv, v over the weights)


def kronecker_fit(curvature: ModuleCurvature) -> ModuleCurvature:
    """Rank-1 fit ``h_ij ≈ ρ_i γ_j`` of a diagonal estimate (negatives clamped to 0).

    ρ and γ are the row and column sums of h, rescaled by ``1/√Σh`` each so that
    ``Σ_ij ρ_i γ_j = Σ_ij h_ij``; returns the curvature with ``g = diag(ρ)``, ``a = diag(γ)``.
    """
    if curvature.diag is None:
        raise ValueError("kronecker_fit needs a curvature with a diagonal estimate (kind hutchinson)")
    h = curvature.diag.clamp_min(0)
    scale = h.sum().sqrt().clamp_min(torch.finfo(h.dtype).tiny)
    return replace(curvature, g=DiagonalFactor(h.sum(1) / scale), a=DiagonalFactor(h.sum(0) / scale))


@contextmanager
def math_attention(model: nn.Module) -> Iterator[None]:
    """SDPA's math kernel, switching a fused (e.g. flash) attention implementation to sdpa meanwhile."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    implementation = getattr(getattr(base, "config", None), "_attn_implementation", None)
    switch = implementation not in (None, "eager", "sdpa")
    if switch:
        base.set_attn_implementation("sdpa")
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        if switch:
            base.set_attn_implementation(implementation)


def _hessian_product(loss: Tensor, params: list[Tensor]) -> tuple[Product, tuple[Tensor, ...]]:
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return lambda v: torch.autograd.grad(grads, params, v, retain_graph=True), grads


def estimate_hutchinson(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    modules: dict[str, nn.Module],
    cfg: CurvatureConfig,
    plan: StoragePlan,
    objective: Objective,
    *,
    want_dense_grad: bool,
    description: str,
    progress: bool,
) -> dict[str, ModuleCurvature]:
    """Diagonal (and dense G) of every target in `modules` from one pass; a/g from `kronecker_fit`."""
    del plan  # diagonal storage needs no plan
    weights = {name: base_linear(module).weight for name, module in modules.items()}
    for name, weight in weights.items():
        if not weight.is_floating_point() or weight.dim() != 2:
            raise TypeError(
                f"hutchinson needs a differentiable 2-D weight; target {name!r} has {weight.dtype} {tuple(weight.shape)}"
            )
    params = list(weights.values())
    dtype = accumulation_dtype(modules.values())
    diag_sums = [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in params]
    grad_sums = (
        [torch.zeros(p.shape, dtype=dtype, device=p.device) for p in params] if want_dense_grad else []
    )
    generators: Generators = {}
    device = input_device(model)
    tokens = 0
    try:
        for param in params:
            param.requires_grad_(True)
        with math_attention(model), torch.enable_grad():
            for batch in track(batches, description, progress):
                batch = batch_to_device(batch, device)
                tokens += int(objective.token_mask(batch).sum())
                outputs = objective.forward(model, batch)
                # also checks the labels, which the GGN itself never reads; its graph only where a gradient is taken
                differentiated = cfg.matrix == "hessian" or want_dense_grad
                loss = objective.loss(outputs if differentiated else outputs.detach(), batch)
                if cfg.matrix == "hessian":
                    grads = _add_hessian_probes(diag_sums, loss, params, cfg, generators)
                else:
                    _add_ggn_probes(diag_sums, outputs, objective, batch, params, cfg, generators)
                    grads = torch.autograd.grad(loss, params) if want_dense_grad else ()
                for total, grad in zip(grad_sums, grads, strict=False):
                    total.add_(grad.detach().to(dtype))
    finally:
        for param in params:
            param.requires_grad_(False)
    tokens = all_reduce_count(tokens, device)
    if tokens == 0:
        raise ValueError("the calibration batches hold no counted tokens (every label is -100 or padding)")
    all_reduce_sum_(diag_sums + grad_sums)
    result = {}
    for index, name in enumerate(weights):
        curvature = ModuleCurvature(
            diag=diag_sums[index].div_(cfg.probes * tokens),  # in place: the sums are the stored estimate
            grad=grad_sums[index].div_(tokens) if want_dense_grad else None,
            tokens=tokens,
        )
        result[name] = kronecker_fit(curvature)
    return result


def _add_hessian_probes(
    diag_sums: list[Tensor], loss: Tensor, params: list[Tensor], cfg: CurvatureConfig, generators: Generators
) -> tuple[Tensor, ...]:
    """Add ``Σ_k v_k ⊙ (H v_k)`` over `cfg.probes` Rademacher v to `diag_sums`; return the gradient."""
    product, grads = _hessian_product(loss, params)
    for _ in range(cfg.probes):
        probes = [_rademacher(p.shape, p.dtype, p.device, generators, cfg.seed) for p in params]
        for total, probe, image in zip(diag_sums, probes, product(probes), strict=True):
            total.addcmul_(probe.to(total.dtype), image.to(total.dtype))
    return grads


def _add_ggn_probes(
    diag_sums: list[Tensor],
    outputs: Tensor,
    objective: Objective,
    batch: dict[str, Any],
    params: list[Tensor],
    cfg: CurvatureConfig,
    generators: Generators,
) -> None:
    """Add ``Σ_k u_k ⊙ u_k``, ``u_k = Jᵀ S z_k`` over `cfg.probes` Rademacher z on the rows the loss depends
    on (S and its softmax once per batch; one buffer for the backward's output gradient)."""
    root = objective.loss_hessian_root(outputs.detach(), batch)
    buffer = torch.zeros_like(outputs) if root.rows is not None else None
    for _ in range(cfg.probes):
        images = root.apply(_rademacher(root.shape, torch.float32, outputs.device, generators, cfg.seed))
        if buffer is None:
            output_grad = images.to(outputs.dtype)
        else:
            buffer[root.rows] = images.to(outputs.dtype)
            output_grad = buffer
        for total, image in zip(diag_sums, torch.autograd.grad(outputs, params, output_grad, retain_graph=True), strict=True):
            image = image.to(total.dtype)
            total.addcmul_(image, image)


def _rademacher(
    shape: torch.Size, dtype: torch.dtype, device: torch.device, generators: Generators, seed: int
) -> Tensor:
    if device not in generators:
        generators[device] = seeded_generator(seed, device)
    # drawn in the target dtype (the same draws as int64, without an 8-byte-per-element detour)
    signs = torch.randint(0, 2, shape, generator=generators[device], device=device, dtype=dtype)
    return signs.mul_(2).sub_(1)
