"""Low-rank updates in the Kronecker curvature metric (docs/METHODS.md §5, §6.1, §6.3).

For a target ``W ∈ R^{m×n}`` with damped factors ``S_g = R_g R_gᵀ`` (m×m) and ``S_a = R_a R_aᵀ``
(n×n) the local model of the mean loss is ``ΔL ≈ ⟨G, ΔW⟩ + ½ tr(ΔWᵀ S_g ΔW S_a)``. Substituting
``ΔW = R_g⁻ᵀ X R_a⁻¹`` turns it into ``⟨G̃, X⟩ + ½ ‖X‖²_F`` with the whitened gradient
``G̃ = R_g⁻¹ G R_a⁻ᵀ = U Σ Vᵀ``. Over rank-r X the minimiser is ``X = −U_r Σ_r V_rᵀ``
(Eckart–Young), lowering the model by ``½ Σ_{k≤r} σ_k²``: each rank unit k is worth
``u_k = ½ σ_k²`` and successive units add (CTR-LoRA's utilities), and
``ΔW(η) = −η R_g⁻ᵀ U_r Σ_r V_rᵀ R_a⁻¹`` is CG-LoRA's initial update (``T = −G̃`` in the paper's
notation), whose modelled change is ``(−η + η²/2) Σ_{k≤r} σ_k²``. With the symmetric roots
``R = S^{1/2}`` these are METHODS' formulas; any other square root (the Cholesky factor, `factors`)
rotates U and V and changes neither σ nor ΔW.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ctrlora.curvature.factors import Factor, relative_damping
from ctrlora.curvature.result import ModuleCurvature
from ctrlora.curvature.spectra import whitened_gradient_svd

EXACT_SVD_MAX_DIM = 4096  # docs/METHODS.md §5, §6.1: the top-r SVD of a whitened gradient is exact when m, n ≤ 4096


@dataclass(frozen=True)
class WhitenedSpectrum:
    """Top singular triplets of the whitened gradient ``G̃ = R_g⁻¹ G R_a⁻ᵀ`` (damped factors) of one target."""

    left: Tensor  # U, m × k
    values: Tensor  # σ, descending, k
    right: Tensor  # V, n × k

    def utilities(self) -> list[float]:
        """``u_k = ½ σ_k²``: the modelled loss decrease of the k-th rank unit."""
        return [0.5 * float(value) ** 2 for value in self.values]


class DampedPairs:
    """``damped_pair`` of targets' raw factors, each damped (and factorised) once while targets share it.

    q/k/v share their input factor S_a, as do gate/up: targets visited in model order find the damped
    copy (with its Cholesky factor) here. Only the `keep` most recently used raw factors stay, so the
    damped copies of a whole model are never held at once. Two suffice: a shared S_a is used again by
    each target that shares it, so it stays the most recent but one while their S_g come and go.
    """

    def __init__(self, damping: float, pi_split: bool = False, keep: int = 2) -> None:
        self.gamma = relative_damping(damping, pi_split)
        self.keep = keep
        self._recent: OrderedDict[int, tuple[Factor, Factor]] = OrderedDict()  # id(raw) -> (raw, damped)

    def _damped(self, raw: Factor) -> Factor:
        entry = self._recent.get(id(raw))
        if entry is None or entry[0] is not raw:
            entry = (raw, raw.damped(self.gamma))
            self._recent[id(raw)] = entry
        self._recent.move_to_end(id(raw))
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)
        return entry[1]

    def __call__(self, curvature: ModuleCurvature) -> tuple[Factor, Factor]:
        """``(S_a, S_g)`` damped as in docs/METHODS.md §3 (raises if the curvature holds no Kronecker pair)."""
        if curvature.a is None or curvature.g is None:
            raise ValueError("this method needs Kronecker factors a and g: use curvature=kfac or curvature=hutchinson")
        return self._damped(curvature.a), self._damped(curvature.g)


def whitened_spectra(
    curvature: Mapping[str, ModuleCurvature],
    ranks: Mapping[str, int],
    *,
    damping: float,
    pi_split: bool = False,
    oversampling: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    exact_max_dim: int = 0,
) -> dict[str, WhitenedSpectrum]:
    """The top-``ranks[name]`` SVD of each target's whitened gradient: randomized (docs/METHODS.md §6.1), exact
    for targets whose dimensions are both ≤ `exact_max_dim` (`whitened_gradient_svd`)."""
    pairs = DampedPairs(damping, pi_split)
    spectra = {}
    for name, rank in ranks.items():
        left, values, right = whitened_gradient_svd(
            curvature[name], rank, damping, oversampling, power_iters, seed,
            pi_split=pi_split, damped=pairs(curvature[name]), exact_max_dim=exact_max_dim,
        )
        spectra[name] = WhitenedSpectrum(left, values, right)
    return spectra


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
    """Balanced ``(B₀, A₀)`` with ``s B₀A₀ = ΔW(η) = −η R_g⁻ᵀ U_r Σ_r V_rᵀ R_a⁻¹``.

    ``a`` and ``g`` are the damped factors the spectrum was whitened with.
    """
    if rank > spectrum.values.numel():
        raise ValueError(f"rank {rank} exceeds the {spectrum.values.numel()} singular triplets computed")
    left = g.unwhiten(spectrum.left[:, :rank])
    right = a.unwhiten(spectrum.right[:, :rank])
    core = torch.diag(-eta * spectrum.values[:rank]).to(left.dtype)
    return balanced_factors(left, core, right, scaling)


def truncate_in_metric(
    B: Tensor, A: Tensor, scaling: float, new_scaling: float, a: Factor, g: Factor, rank: int
) -> tuple[Tensor, Tensor]:
    """Best rank-`rank` replacement of ``s B A`` in the metric: ``(B', A')`` with ``s' B'A'`` equal to
    ``R_g⁻ᵀ [R_gᵀ (sBA) R_a]_rank R_a⁻¹`` (``[·]_k``: truncated SVD), balanced.

    ``a``/``g`` are damped factors ``S = R Rᵀ``; ``‖X‖_M = ‖R_gᵀ X R_a‖_F``, so this is the
    Eckart–Young optimum in the trust-region metric (METHODS writes it with ``S^{1/2}``).
    """
    if not 1 <= rank <= B.shape[1]:
        raise ValueError(f"can only shrink to a rank in [1, {B.shape[1]}], got {rank}")
    dtype = torch.promote_types(B.dtype, a.dtype)
    whitened_b = g.root_transpose_apply(B.detach().to(dtype))  # R_gᵀ B
    whitened_a_t = a.root_transpose_apply(A.detach().to(dtype).T)  # R_aᵀ Aᵀ
    eye = torch.eye(B.shape[1], dtype=dtype, device=B.device)
    unit_b, unit_a = balanced_factors(whitened_b, scaling * eye, whitened_a_t, 1.0)
    left = g.unwhiten(unit_b[:, :rank])
    right = a.unwhiten(unit_a[:rank].T)
    return balanced_factors(left, torch.eye(rank, dtype=dtype, device=B.device), right, new_scaling)


def damped_factors(curvature: ModuleCurvature, damping: float, pi_split: bool = False) -> tuple[Factor, Factor]:
    """``(S_a, S_g)`` of one target damped as in docs/METHODS.md §3 (see `DampedPairs` for many targets)."""
    return DampedPairs(damping, pi_split)(curvature)
