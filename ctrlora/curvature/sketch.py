"""Randomized sketch of a whitened gradient, streamed over calibration tokens (``grad_mode: sketch``).

For a layer too large to hold its gradient ``G = (1/T) Σ_t g_t x_tᵀ`` (d_out x d_in), passes after
the factors find a rank-k approximation of the whitened gradient ``G̃ = R_g⁻¹ G R_a⁻ᵀ``
(square roots ``R Rᵀ = S`` of the damped factors, `ctrlora.curvature.spectra`) by randomized range finding (Halko, Martinsson & Tropp 2011, Alg. 4.3/4.4):

    range pass       Y = G̃ Ω,  Ω ~ N(0, 1)^{d_in x k},  k = rank + oversampling;  Q = orth(Y)
    (power_iters ×)  Q ← orth(G̃ orth(G̃ᵀ Q))           (two passes each)
    projection pass  B = Qᵀ G̃                           (k x d_in)

so ``G̃ ≈ Q B`` and the SVD of the small B gives the top singular triplets. Every product streams
token by token from precomputed whitened test matrices: ``G̃ M = R_g⁻¹ (1/T) Σ_t g_t (x_tᵀ M̂)``
with ``M̂ = R_a⁻ᵀ M``, and ``G̃ᵀ M = R_a⁻¹ (1/T) Σ_t x_t (g_tᵀ M̂)`` with ``M̂ = R_g⁻ᵀ M``;
the sums add across data-parallel ranks. Being an orthogonal projection, ``Q B`` never overstates
a singular value; it is exact when rank(G̃) ≤ k. (A single-pass two-sided sketch would save the
projection pass, but when the whitened spectrum is flat its oblique reconstruction overstates the
top singular values by tens of percent, which would skew rank allocation.)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from ctrlora.curvature.factor_base import Whitening

SKETCH_WHITENING = "cholesky"  # dense factors' square roots R (`Factor.whiten`); part of the cache key


@dataclass
class WhitenedGradientSketch:
    """``G̃ ≈ Q B`` for ``G̃ = R_g⁻¹ G R_a⁻ᵀ`` under the recorded damping."""

    basis: Tensor  # Q, d_out x k, orthonormal columns
    projection: Tensor  # B = Qᵀ G̃, k x d_in
    damping: float
    pi_split: bool

    @property
    def max_rank(self) -> int:
        return self.basis.shape[1]

    def svd(self, rank: int) -> tuple[Tensor, Tensor, Tensor]:
        """Top-`rank` singular triplets ``(U, S, V)`` with ``G̃ ≈ U diag(S) Vᵀ``."""
        if rank > self.max_rank:
            raise ValueError(f"the sketch holds rank ≤ {self.max_rank}; asked for {rank}")
        left, values, right_t = torch.linalg.svd(self.projection, full_matrices=False)
        return (self.basis @ left)[:, :rank], values[:rank], right_t[:rank].T

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> WhitenedGradientSketch:
        return replace(
            self,
            basis=self.basis.to(device=device, dtype=dtype),
            projection=self.projection.to(device=device, dtype=dtype),
        )

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> WhitenedGradientSketch:
        return cls(**state)


class WhitenedProduct:
    """Streams ``G̃ M`` (side 'right', M: d_in x k) or ``G̃ᵀ M`` (side 'left', M: d_out x k) over tokens."""

    def __init__(self, a: Whitening, g: Whitening, test: Tensor, side: str) -> None:
        if side not in ("right", "left"):
            raise ValueError(f"side must be 'right' or 'left', got {side!r}")
        self.side = side
        self.a, self.g = a, g  # damped
        near, far = (a, g) if side == "right" else (g, a)
        self.whitened_test = near.unwhiten(test)  # M̂
        self.total = torch.zeros(far.dim, test.shape[1], dtype=test.dtype, device=test.device)

    def update(self, grad_rows: Tensor, input_rows: Tensor) -> None:
        """Add ``Σ_t g_t (x_tᵀ M̂)`` (right) or ``Σ_t x_t (g_tᵀ M̂)`` (left) for rows g_t, x_t."""
        g = grad_rows.to(self.total.dtype)
        x = input_rows.to(self.total.dtype)
        if self.side == "right":
            self.total.addmm_(g.T, x @ self.whitened_test)
        else:
            self.total.addmm_(x.T, g @ self.whitened_test)

    def finish(self, tokens: int) -> Tensor:
        """The product once `total` holds all T tokens (summed across ranks)."""
        far = self.g if self.side == "right" else self.a
        return far.whiten(self.total) / tokens


def orthonormal_basis(matrix: Tensor) -> Tensor:
    """Orthonormal columns spanning the columns of `matrix` (reduced QR)."""
    return torch.linalg.qr(matrix).Q
