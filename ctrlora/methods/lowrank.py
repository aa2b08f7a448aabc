"""Low-rank updates in the Kronecker curvature metric (METHODS §5, §6.1, §6.3).

For a target ``W ∈ R^{m×n}`` with damped factors ``S_g`` (m×m) and ``S_a`` (n×n) the local
model of the mean loss is ``ΔL ≈ ⟨G, ΔW⟩ + ½ tr(ΔWᵀ S_g ΔW S_a)``. Substituting
``ΔW = S_g^{-1/2} X S_a^{-1/2}`` turns it into ``⟨G̃, X⟩ + ½ ‖X‖²_F`` with the whitened gradient
``G̃ = S_g^{-1/2} G S_a^{-1/2} = U Σ Vᵀ``. Over rank-r X the minimiser is ``X = −U_r Σ_r V_rᵀ``
(Eckart–Young), lowering the model by ``½ Σ_{k≤r} σ_k²``: each rank unit k is worth
``u_k = ½ σ_k²`` and successive units add (CTR-LoRA's utilities), and
``ΔW(η) = −η S_g^{-1/2} U_r Σ_r V_rᵀ S_a^{-1/2}`` is CG-LoRA's initial update
(``T = −G̃`` in the paper's notation), whose modelled change is ``(−η + η²/2) Σ_{k≤r} σ_k²``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ctrlora.curvature.factors import Factor, damped_pair
from ctrlora.curvature.result import ModuleCurvature
from ctrlora.curvature.spectra import whitened_gradient_svd


@dataclass(frozen=True)
class WhitenedSpectrum:
    """Top singular triplets of ``G̃ = S_g^{-1/2} G S_a^{-1/2}`` (damped factors) of one target."""

    left: Tensor  # U, m × k
    values: Tensor  # σ, descending, k
    right: Tensor  # V, n × k

    def utilities(self) -> list[float]:
        """``u_k = ½ σ_k²``: the modelled loss decrease of the k-th rank unit."""
        return [0.5 * float(value) ** 2 for value in self.values]


def whitened_spectrum(
    curvature: ModuleCurvature,
    rank: int,
    *,
    damping: float,
    pi_split: bool = False,
    oversampling: int = 10,
    power_iters: int = 2,
    seed: int = 0,
) -> WhitenedSpectrum:
    """The top-`rank` SVD of the whitened gradient (exact for dims ≤ 4096, randomized above)."""
    left, values, right = whitened_gradient_svd(
        curvature, rank, damping, oversampling, power_iters, seed, pi_split=pi_split
    )
    return WhitenedSpectrum(left, values, right)


def balanced_factors(left: Tensor, core: Tensor, right: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``s·B A = left · core · rightᵀ`` and ``Bᵀ B = A Aᵀ`` (both diagonal).

    With ``left = Q_l R_l`` and ``right = Q_r R_r`` (thin QR) the product is
    ``Q_l (R_l core R_rᵀ) Q_rᵀ``; the SVD ``R_l core R_rᵀ = P D Qᵀ`` of the small core gives
    ``B = Q_l P (D/s)^{1/2}`` and ``A = (D/s)^{1/2} Qᵀ Q_rᵀ``, so ``BᵀB = AAᵀ = D/s``. The rank
    units come out in decreasing order of D (truncating B's columns and A's rows keeps the best).
    """
    if scaling <= 0:
        raise ValueError(f"LoRA scaling must be > 0, got {scaling}")
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right)
    p, d, q_t = torch.linalg.svd(r_left @ core @ r_right.T)
    root = (d / scaling).sqrt()
    return q_left @ (p * root), (root.unsqueeze(1) * q_t) @ q_right.T


def curvature_step_factors(
    spectrum: WhitenedSpectrum, a: Factor, g: Factor, rank: int, eta: float, scaling: float
) -> tuple[Tensor, Tensor]:
    """Balanced ``(B₀, A₀)`` with ``s B₀A₀ = ΔW(η) = −η S_g^{-1/2} U_r Σ_r V_rᵀ S_a^{-1/2}``.

    ``a`` and ``g`` are the damped factors the spectrum was whitened with.
    """
    if rank > spectrum.values.numel():
        raise ValueError(f"rank {rank} exceeds the {spectrum.values.numel()} singular triplets computed")
    left = g.inverse_root_apply(spectrum.left[:, :rank])
    right = a.inverse_root_apply(spectrum.right[:, :rank])
    core = torch.diag(-eta * spectrum.values[:rank]).to(left.dtype)
    return balanced_factors(left, core, right, scaling)


def truncate_in_metric(
    B: Tensor, A: Tensor, scaling: float, new_scaling: float, a: Factor, g: Factor, rank: int
) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` replacement of ``s B A`` in the metric: ``(B', A')`` with ``s' B'A'`` equal to
    ``S_g^{-1/2} [S_g^{1/2} (sBA) S_a^{1/2}]_rank S_a^{-1/2}`` (``[·]_k``: truncated SVD), balanced.

    ``a``/``g`` are damped factors; ``‖X‖_M = ‖S_g^{1/2} X S_a^{1/2}‖_F``, so this is the
    Eckart–Young optimum in the trust-region metric.
    """
    if not 1 <= rank <= B.shape[1]:
        raise ValueError(f"can only shrink to a rank in [1, {B.shape[1]}], got {rank}")
    dtype = torch.promote_types(B.dtype, a.dtype)
    whitened_b = g.root_apply(B.detach().to(dtype))  # S_g^{1/2} B
    whitened_a_t = a.root_apply(A.detach().to(dtype).T)  # S_a^{1/2} Aᵀ
    eye = torch.eye(B.shape[1], dtype=dtype, device=B.device)
    unit_b, unit_a = balanced_factors(whitened_b, scaling * eye, whitened_a_t, 1.0)
    left = g.inverse_root_apply(unit_b[:, :rank])
    right = a.inverse_root_apply(unit_a[:rank].T)
    return balanced_factors(left, torch.eye(rank, dtype=dtype, device=B.device), right, new_scaling)


def damped_factors(curvature: ModuleCurvature, damping: float, pi_split: bool = False) -> tuple[Factor, Factor]:
    """``(S_a, S_g)`` damped as in METHODS §3 (raises if the curvature holds no Kronecker pair)."""
    if curvature.a is None or curvature.g is None:
        raise ValueError("this method needs Kronecker factors a and g: use curvature=kfac or curvature=hutchinson")
    return damped_pair(curvature.a, curvature.g, damping, pi_split)
