"""Spectra of whitened gradients (docs/METHODS.md §5, §6.1).

The whitened gradient of a target is ``G̃ = R_g⁻¹ G R_a⁻ᵀ`` for square roots ``R Rᵀ = S`` of the
damped factors (`Factor.whiten`: the Cholesky factor of a dense S, ``S^{1/2}`` otherwise). It
differs from the symmetric ``S_g^{-1/2} G S_a^{-1/2}`` of METHODS by orthogonal maps on each side,
so its singular values σ_k — CTR-LoRA's rank utilities ``½ σ_k²`` — are the same, and singular
vectors mapped back with `Factor.unwhiten` give the same updates (CG-LoRA's initial step).
`whitened_gradient_svd` returns the top ones from a dense G (randomized SVD with power
iterations, exact when the sketch would cover the smaller side anyway or the caller asks for it
up to a size, as CG-LoRA does) or from a `WhitenedGradientSketch`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ctrlora.curvature.factors import Factor, damped_pair
from ctrlora.curvature.result import ModuleCurvature


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


def whitened_gradient(grad: Tensor, a: Factor, g: Factor) -> Tensor:
    """``R_g⁻¹ G R_a⁻ᵀ`` (d_out x d_in) from a dense G and damped factors."""
    return a.whiten(g.whiten(grad).T).T


def whitened_gradient_svd(
    curvature: ModuleCurvature,
    rank: int,
    damping: float,
    oversampling: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    *,
    pi_split: bool = False,
    damped: tuple[Factor, Factor] | None = None,
    exact_max_dim: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-`rank` singular triplets of the whitened gradient ``G̃ ≈ U diag(S) Vᵀ`` (module docstring).

    U is d_out x rank, S descending, V is d_in x rank. With a dense G: a randomized SVD (`rank` +
    `oversampling` columns, `power_iters`, `seed`; docs/METHODS.md §6.1), or the exact one when that many
    columns reach the smaller dimension or both dimensions are ≤ `exact_max_dim` (docs/METHODS.md §5).
    `damped`: the pair ``damped_pair(a, g, damping, pi_split)`` when the caller already holds it (so a
    factor shared by several targets is factorised once).
    With only a sketch, the sketch's damping must equal `damping` (it was whitened at estimation).
    """
    if curvature.grad is not None:
        if curvature.a is None or curvature.g is None:
            raise ValueError("the whitened gradient needs Kronecker factors a and g")
        a, g = damped or damped_pair(curvature.a, curvature.g, damping, pi_split)
        whitened = whitened_gradient(curvature.grad, a, g)
        if rank > min(whitened.shape):
            raise ValueError(f"rank {rank} exceeds min(d_out, d_in) = {min(whitened.shape)}")
        if rank + oversampling >= min(whitened.shape) or max(whitened.shape) <= exact_max_dim:
            left, values, right_t = torch.linalg.svd(whitened, full_matrices=False)
            # copies, not views: a view would keep the whole U and Vᵀ alive as long as the spectrum
            return left[:, :rank].clone(), values[:rank].clone(), right_t[:rank].T.clone()
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
