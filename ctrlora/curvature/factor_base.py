"""The interface of a curvature factor (`Factor`) and the numerics its storages share.

A `Factor` is one side of a Kronecker pair, ``S_a`` (d_in × d_in) or ``S_g`` (d_out × d_out), or the
diagonal of a Hutchinson fit; `ctrlora.curvature.factors` holds the three storages and the
functions that build and damp them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

import torch
from torch import Tensor


def scale_rows(scale: Tensor, x: Tensor) -> Tensor:
    """``diag(scale) @ x`` for x of shape (dim,) or (dim, k)."""
    return scale * x if x.dim() == 1 else scale.unsqueeze(-1) * x


def check_operand(factor: Factor, x: Tensor) -> None:
    if x.dim() not in (1, 2) or x.shape[0] != factor.dim:
        raise ValueError(
            f"expected an operand of shape ({factor.dim},) or ({factor.dim}, k), got {tuple(x.shape)}"
        )


def triangular_solve(lower: Tensor, x: Tensor, *, transpose: bool) -> Tensor:
    """``L⁻¹ x`` or (`transpose`) ``L⁻ᵀ x`` for lower-triangular L and x of shape (dim,) or (dim, k)."""
    columns = x.unsqueeze(-1) if x.dim() == 1 else x
    matrix = lower.T if transpose else lower
    solved = torch.linalg.solve_triangular(matrix, columns, upper=transpose)
    return solved.squeeze(-1) if x.dim() == 1 else solved


def checked_power(eigvals: Tensor, power: float) -> Tensor:
    """``eigvals ** power`` with negative round-off clamped to 0; a singular factor has no negative power."""
    eigvals = eigvals.clamp_min(0)
    if power < 0 and bool((eigvals == 0).any()):
        raise ValueError(
            "the factor is singular, so it has no negative power: damp it first (factor.damped(gamma))"
        )
    return eigvals.pow(power)


class Whitening(Protocol):
    """What whitening by a damped factor needs: ``R⁻¹ x`` and ``R⁻ᵀ x`` for a square root ``R Rᵀ = S``."""

    dim: int

    def whiten(self, x: Tensor) -> Tensor: ...

    def unwhiten(self, x: Tensor) -> Tensor: ...


class Factor(ABC):
    """A symmetric PSD matrix S of size dim x dim in some storage (see the module docstring)."""

    dim: int

    @abstractmethod
    def apply(self, x: Tensor) -> Tensor:
        """``S @ x`` for x of shape (dim,) or (dim, k), in the factor's dtype."""

    @abstractmethod
    def power_apply(self, x: Tensor, power: float) -> Tensor:
        """``S^power @ x`` from the eigendecomposition (raises for negative powers of a singular S)."""

    @abstractmethod
    def dense(self) -> Tensor:
        """The dim x dim matrix (for tests and small factors)."""

    @abstractmethod
    def trace(self) -> float:
        """``tr S``."""

    @abstractmethod
    def eigenvalues(self) -> Tensor:
        """All dim eigenvalues, descending (the isotropic level repeated for a low-rank factor)."""

    @abstractmethod
    def shifted(self, shift: float) -> Factor:
        """``S + shift·I`` as a new factor of the same storage."""

    @abstractmethod
    def scaled(self, scale: float) -> Factor:
        """``scale·S`` as a new factor of the same storage."""

    @abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors, by name (the state dict without the storage tag)."""

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors().values())).device

    def whiten(self, x: Tensor) -> Tensor:
        """``R⁻¹ x`` for the factor's square root R (``R Rᵀ = S``; see `root_transpose_apply`), so that
        ``R⁻¹ S R⁻ᵀ = I`` (damp a singular factor first)."""
        return self.power_apply(x, -0.5)

    def unwhiten(self, x: Tensor) -> Tensor:
        """``R⁻ᵀ x``: maps whitened coordinates back, ``‖R⁻ᵀ x‖²_S = ‖x‖²``."""
        return self.power_apply(x, -0.5)

    def whitening(self) -> Whitening:
        """The factor's `whiten` and `unwhiten` alone, for holding many of them: the factor itself
        here; a dense factor gives its Cholesky factor without the matrix (half the memory)."""
        return self

    def root_transpose_apply(self, x: Tensor) -> Tensor:
        """``Rᵀ x`` for a square root ``R Rᵀ = S``: the symmetric ``S^{1/2}`` here; a dense factor takes
        its Cholesky factor instead, which is ~20× cheaper to compute than an eigendecomposition.
        Whitening with any such R changes singular vectors by an orthogonal map and leaves singular
        values, truncations and everything mapped back with `unwhiten` unchanged."""
        return self.power_apply(x, 0.5)

    def quadratic_form(self, x: Tensor) -> Tensor:
        """``xᵀ S x`` (k x k for x of shape (dim, k)); differentiable in x."""
        return x.to(self.dtype).transpose(0, -1) @ self.apply(x)

    def mean_eigenvalue(self) -> float:
        """``tr S / dim``."""
        return self.trace() / self.dim

    def damped(self, gamma: float) -> Factor:
        """``S + γ·(tr S / dim)·I``: damping relative to the mean eigenvalue."""
        return self.shifted(gamma * self.mean_eigenvalue())

    def normalized(self) -> Factor:
        """``S / (tr S / dim)``: unit mean eigenvalue (the trust region's ``normalized`` ablation)."""
        mean = self.mean_eigenvalue()
        if mean <= 0:
            raise ValueError("cannot normalise a factor whose trace is zero")
        return self.scaled(1.0 / mean)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Factor:
        """The same factor with its tensors moved/cast."""
        return type(self).from_state_dict(
            {
                "storage": self.storage,
                **{k: v.to(device=device, dtype=dtype) for k, v in self.tensors().items()},
            }
        )

    @property
    @abstractmethod
    def storage(self) -> str:
        """'dense', 'low_rank' or 'diagonal'."""

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors plus the storage tag; `factor_from_state_dict` inverts it (loads with weights_only)."""
        return {"storage": self.storage, **self.tensors()}

    @classmethod
    @abstractmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Factor:
        """Inverse of `state_dict`."""
