"""Symmetric positive semi-definite curvature factors and their storage (docs/METHODS.md §3).

A `Factor` is one side of a Kronecker pair, `S_a` (d_in x d_in) or `S_g` (d_out x d_out), or the
diagonal of a Hutchinson fit. Three storages share one interface:

- `DenseFactor`: the matrix itself; whitening uses its (cached) Cholesky factor, symmetric powers
  its (cached) eigendecomposition.
- `LowRankFactor`: the top-k eigenpairs plus the mean of the remaining eigenvalues as an isotropic
  term, ``S = U diag(λ) Uᵀ + σ (I − U Uᵀ)``. Every operation costs O(dim·k) per column, and
  ``S^p = U diag(λ^p) Uᵀ + σ^p (I − U Uᵀ)``, so inverse roots need no dim x dim matrix.
- `DiagonalFactor`: ``S = diag(d)``.

Estimators store raw statistics; consumers call ``damped(gamma)`` (and ``normalized()`` for the
trust region's unit-mean ablation, ``ctr.metric: normalized``) on the stored factor. Factors are immutable: those two return new factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ctrlora.curvature.factor_base import (
    Factor,
    check_operand,
    checked_power,
    scale_rows,
    triangular_solve,
)


class CholeskyWhitening:
    """`whiten` and `unwhiten` of a dense factor from its Cholesky factor ``L`` (``S = L Lᵀ``) alone."""

    def __init__(self, lower: Tensor) -> None:
        self.lower, self.dim = lower, lower.shape[0]

    def whiten(self, x: Tensor) -> Tensor:
        return triangular_solve(self.lower, x.to(self.lower.dtype), transpose=False)

    def unwhiten(self, x: Tensor) -> Tensor:
        return triangular_solve(self.lower, x.to(self.lower.dtype), transpose=True)


class DenseFactor(Factor):
    """S stored as a dense matrix. Its square root for whitening is the Cholesky factor ``S = L Lᵀ``
    (``R = L``); symmetric powers and eigenvalues come from its eigendecomposition. Both are
    computed once, on first use."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"a dense factor needs a square matrix, got shape {tuple(matrix.shape)}")
        self.matrix = matrix
        self.dim = matrix.shape[0]
        self._eigh: tuple[Tensor, Tensor] | None = None
        self._cholesky: Tensor | None = None

    @property
    def storage(self) -> str:
        return "dense"

    def eigh(self) -> tuple[Tensor, Tensor]:
        """Ascending eigenvalues and eigenvectors of the symmetrised matrix (cached)."""
        if self._eigh is None:
            self._eigh = torch.linalg.eigh((self.matrix + self.matrix.T) / 2)
        return self._eigh

    def cholesky(self) -> Tensor:
        """The lower-triangular ``L`` with ``S = L Lᵀ`` (cached); raises unless S is positive definite."""
        if self._cholesky is None:
            lower, info = torch.linalg.cholesky_ex(self.matrix)
            if int(info) != 0:
                raise ValueError(
                    "the factor is not positive definite, so it has no inverse square root: damp it first"
                    " (factor.damped(gamma), or a larger curvature.damping)"
                )
            self._cholesky = lower
        return self._cholesky

    def whiten(self, x: Tensor) -> Tensor:
        check_operand(self, x)
        return triangular_solve(self.cholesky(), x.to(self.matrix.dtype), transpose=False)

    def unwhiten(self, x: Tensor) -> Tensor:
        check_operand(self, x)
        return triangular_solve(self.cholesky(), x.to(self.matrix.dtype), transpose=True)

    def root_transpose_apply(self, x: Tensor) -> Tensor:
        check_operand(self, x)
        return self.cholesky().T @ x.to(self.matrix.dtype)

    def whitening(self) -> CholeskyWhitening:
        return CholeskyWhitening(self.cholesky())

    def apply(self, x: Tensor) -> Tensor:
        check_operand(self, x)
        return self.matrix @ x.to(self.matrix.dtype)

    def power_apply(self, x: Tensor, power: float) -> Tensor:
        check_operand(self, x)
        eigvals, eigvecs = self.eigh()
        return eigvecs @ scale_rows(checked_power(eigvals, power), eigvecs.T @ x.to(eigvecs.dtype))

    def dense(self) -> Tensor:
        return self.matrix

    def trace(self) -> float:
        return float(self.matrix.diagonal().sum())

    def eigenvalues(self) -> Tensor:
        return self.eigh()[0].flip(0)

    def shifted(self, shift: float) -> DenseFactor:
        eye = torch.eye(self.dim, dtype=self.matrix.dtype, device=self.matrix.device)
        return self._with_eigh(DenseFactor(self.matrix + shift * eye), lambda values: values + shift)

    def scaled(self, scale: float) -> DenseFactor:
        return self._with_eigh(DenseFactor(self.matrix * scale), lambda values: values * scale)

    def _with_eigh(self, factor: DenseFactor, map_eigvals: Callable[[Tensor], Tensor]) -> DenseFactor:
        """Hand a computed eigendecomposition on to a shifted/scaled copy (same eigenvectors)."""
        if self._eigh is not None:
            factor._eigh = (map_eigvals(self._eigh[0]), self._eigh[1])
        return factor

    def tensors(self) -> dict[str, Tensor]:
        return {"matrix": self.matrix}

    def truncated(self, rank: int) -> LowRankFactor:
        """Top-`rank` eigenpairs plus the mean of the other eigenvalues (trace preserved)."""
        if not 0 < rank < self.dim:
            raise ValueError(
                f"rank must lie in [1, {self.dim - 1}] for a factor of dim {self.dim}, got {rank}"
            )
        eigvals, eigvecs = self.eigh()
        top = eigvals[-rank:].flip(0).clamp_min(0)
        rest = eigvals[:-rank].clamp_min(0).mean()
        return LowRankFactor(eigvecs[:, -rank:].flip(1).contiguous(), top, rest)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DenseFactor:
        return cls(state["matrix"])


class LowRankFactor(Factor):
    """``S = U diag(λ) Uᵀ + σ (I − U Uᵀ)`` with orthonormal U (dim x k), λ (k,) and scalar σ."""

    def __init__(self, eigvecs: Tensor, eigvals: Tensor, isotropic: Tensor) -> None:
        if eigvecs.dim() != 2 or eigvals.shape != (eigvecs.shape[1],) or isotropic.dim() != 0:
            raise ValueError(
                "a low-rank factor needs eigvecs (dim, k), eigvals (k,) and a scalar isotropic term, got "
                f"{tuple(eigvecs.shape)}, {tuple(eigvals.shape)}, {tuple(isotropic.shape)}"
            )
        self.eigvecs, self.eigvals, self.isotropic = eigvecs, eigvals, isotropic
        self.dim = eigvecs.shape[0]

    @property
    def storage(self) -> str:
        return "low_rank"

    @property
    def rank(self) -> int:
        return self.eigvecs.shape[1]

    def power_apply(self, x: Tensor, power: float) -> Tensor:
        check_operand(self, x)
        x = x.to(self.eigvecs.dtype)
        top = checked_power(self.eigvals, power)
        rest = checked_power(self.isotropic.reshape(1), power)[0]
        return rest * x + self.eigvecs @ scale_rows(top - rest, self.eigvecs.T @ x)

    def apply(self, x: Tensor) -> Tensor:
        check_operand(self, x)
        x = x.to(self.eigvecs.dtype)
        return self.isotropic * x + self.eigvecs @ scale_rows(
            self.eigvals - self.isotropic, self.eigvecs.T @ x
        )

    def quadratic_form(self, x: Tensor) -> Tensor:
        check_operand(self, x)
        x = x.to(self.eigvecs.dtype)
        projected = self.eigvecs.T @ x
        return self.isotropic * (x.transpose(0, -1) @ x) + projected.transpose(0, -1) @ scale_rows(
            self.eigvals - self.isotropic, projected
        )

    def dense(self) -> Tensor:
        eye = torch.eye(self.dim, dtype=self.eigvecs.dtype, device=self.eigvecs.device)
        return self.isotropic * eye + self.eigvecs @ scale_rows(
            self.eigvals - self.isotropic, self.eigvecs.T
        )

    def trace(self) -> float:
        return float(self.eigvals.sum() + self.isotropic * (self.dim - self.rank))

    def eigenvalues(self) -> Tensor:
        rest = self.isotropic.expand(self.dim - self.rank)
        return torch.cat([self.eigvals, rest]).sort(descending=True).values

    def shifted(self, shift: float) -> LowRankFactor:
        return LowRankFactor(self.eigvecs, self.eigvals + shift, self.isotropic + shift)

    def scaled(self, scale: float) -> LowRankFactor:
        return LowRankFactor(self.eigvecs, self.eigvals * scale, self.isotropic * scale)

    def truncated(self, rank: int) -> LowRankFactor:
        """The top-`rank` eigenpairs plus the mean of all the others (trace preserved), as `DenseFactor.truncated`."""
        if not 0 < rank < self.rank:
            raise ValueError(f"rank must lie in [1, {self.rank - 1}] for a factor of rank {self.rank}, got {rank}")
        order = self.eigvals.argsort(descending=True)
        kept, dropped = order[:rank], order[rank:]
        rest = (self.eigvals[dropped].sum() + self.isotropic * (self.dim - self.rank)) / (self.dim - rank)
        return LowRankFactor(self.eigvecs[:, kept].contiguous(), self.eigvals[kept], rest)

    def tensors(self) -> dict[str, Tensor]:
        return {"eigvecs": self.eigvecs, "eigvals": self.eigvals, "isotropic": self.isotropic}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LowRankFactor:
        return cls(state["eigvecs"], state["eigvals"], state["isotropic"])


class DiagonalFactor(Factor):
    """``S = diag(d)``."""

    def __init__(self, diagonal: Tensor) -> None:
        if diagonal.dim() != 1:
            raise ValueError(f"a diagonal factor needs a vector, got shape {tuple(diagonal.shape)}")
        self.diagonal = diagonal
        self.dim = diagonal.shape[0]

    @property
    def storage(self) -> str:
        return "diagonal"

    def apply(self, x: Tensor) -> Tensor:
        check_operand(self, x)
        return scale_rows(self.diagonal, x.to(self.diagonal.dtype))

    def power_apply(self, x: Tensor, power: float) -> Tensor:
        check_operand(self, x)
        return scale_rows(checked_power(self.diagonal, power), x.to(self.diagonal.dtype))

    def dense(self) -> Tensor:
        return torch.diag(self.diagonal)

    def trace(self) -> float:
        return float(self.diagonal.sum())

    def eigenvalues(self) -> Tensor:
        return self.diagonal.sort(descending=True).values

    def shifted(self, shift: float) -> DiagonalFactor:
        return DiagonalFactor(self.diagonal + shift)

    def scaled(self, scale: float) -> DiagonalFactor:
        return DiagonalFactor(self.diagonal * scale)

    def tensors(self) -> dict[str, Tensor]:
        return {"diagonal": self.diagonal}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> DiagonalFactor:
        return cls(state["diagonal"])


FACTOR_STORAGES: dict[str, type[Factor]] = {
    "dense": DenseFactor,
    "low_rank": LowRankFactor,
    "diagonal": DiagonalFactor,
}


def factor_from_state_dict(state: dict[str, Any]) -> Factor:
    """Rebuild a factor saved with `Factor.state_dict`."""
    storage = state["storage"]
    if storage not in FACTOR_STORAGES:
        raise ValueError(f"unknown factor storage {storage!r}; valid: {sorted(FACTOR_STORAGES)}")
    return FACTOR_STORAGES[storage].from_state_dict(state)


def stored_factor(matrix: Tensor, rank: int | None) -> Factor:
    """Store a symmetric matrix densely (`rank` None or ≥ dim) or as its top-`rank` eigenpairs + isotropic rest."""
    dense = DenseFactor(matrix)
    if rank is None or rank >= dense.dim:
        return dense
    return dense.truncated(rank)


def relative_damping(gamma: float, pi_split: bool = False) -> float:
    """The per-factor relative damping of a Kronecker pair damped by γ (see `damped_pair`)."""
    if gamma < 0:
        raise ValueError(f"damping must be non-negative, got {gamma}")
    return math.sqrt(gamma) if pi_split else gamma


def damped_pair(a: Factor, g: Factor, gamma: float, pi_split: bool = False) -> tuple[Factor, Factor]:
    """Damp a Kronecker pair ``S_g ⊗ S_a``.

    Default: each factor separately, ``S ← S + γ·(tr S/dim)·I``. With ``pi_split`` (Martens & Grosse
    2015, §6.3) the damping ``λ = γ·ā·ḡ`` of the product (ā, ḡ the mean eigenvalues) is split as
    ``(S_a + π√λ I) ⊗ (S_g + √λ/π I)`` with ``π = √(ā/ḡ)``, which works out to a relative damping
    of ``√γ`` on each factor.
    """
    per_factor = relative_damping(gamma, pi_split)
    return a.damped(per_factor), g.damped(per_factor)
