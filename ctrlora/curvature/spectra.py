"""Spectra of whitened gradients (METHODS §5, §6.1).

The whitened gradient of a target is ``G̃ = S_g^{-1/2} G S_a^{-1/2}`` with damped factors. Its
singular values σ_k give CTR-LoRA's rank utilities ``½ σ_k²`` and its singular vectors CG-LoRA's
initial update; `whitened_gradient_svd` returns the top ones from a dense G (exact SVD, or a
randomized one with power iterations for wide layers) or from a `WhitenedGradientSketch`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ctrlora.curvature.factors import damped_pair
from ctrlora.curvature.result import ModuleCurvature

EXACT_SVD_MAX_DIM = 4096


def randomized_svd(
    matrix: Tensor, rank: int, oversampling: int = 10, power_iters: int = 2, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` ``(U, S, V)`` of `matrix` (Halko, Martinsson & Tropp 2011, Alg. 4.4), seeded."""
    rows, cols = matrix.shape
    width = min(rank + oversampling, rows, cols)
    generator = torch.Generator().manual_seed(seed)
    test = torch.randn(cols, width, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis = torch.linalg.qr(matrix @ test).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    left, values, right_t = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ left)[:, :rank], values[:rank], right_t[:rank].T


def whitened_gradient(curvature: ModuleCurvature, damping: float, pi_split: bool = False) -> Tensor:
    """``S_g^{-1/2} G S_a^{-1/2}`` from a dense G and the damped factors (d_out x d_in)."""
    if curvature.grad is None or curvature.a is None or curvature.g is None:
        raise ValueError("the whitened gradient needs a, g and a dense grad (estimate with want_grad=True)")
    a, g = damped_pair(curvature.a, curvature.g, damping, pi_split)
    return a.inverse_root_apply(g.inverse_root_apply(curvature.grad).T).T


def whitened_gradient_svd(
    curvature: ModuleCurvature,
    rank: int,
    damping: float,
    oversampling: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    *,
    pi_split: bool = False,
    exact_max_dim: int = EXACT_SVD_MAX_DIM,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` singular triplets of ``G̃ = S_g^{-1/2} G S_a^{-1/2}``: ``G̃ ≈ U diag(S) Vᵀ``.

    U is d_out x rank, S descending, V is d_in x rank. With a dense G the SVD is exact when both
    dims are ≤ `exact_max_dim`, else randomized (`oversampling`, `power_iters`, `seed`). With
    only a sketch, the sketch's damping must equal `damping` (it was whitened at estimation).
    """
    if curvature.grad is not None:
        whitened = whitened_gradient(curvature, damping, pi_split)
        if rank > min(whitened.shape):
            raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = {min(whitened.shape)}")
        if max(whitened.shape) <= exact_max_dim:
            left, values, right_t = torch.linalg.svd(whitened, full_matrices=False)
            return left[:, :rank], values[:rank], right_t[:rank].T
        return randomized_svd(whitened, rank, oversampling, power_iters, seed)
    sketch = curvature.grad_sketch
    if sketch is None:
        raise ValueError("the curvature holds no gradient: estimate with want_grad=True")
    if not math.isclose(sketch.damping, damping, rel_tol=1e-9, abs_tol=0.0) or sketch.pi_split != pi_split:
        raise ValueError(
            f"the gradient sketch was whitened with damping={sketch.damping}, pi_split={sketch.pi_split}; "
            f"asked for damping={damping}, pi_split={pi_split} (re-estimate with matching curvature.damping)"
        )
    return sketch.svd(rank)
