"""Factor storages: dense, low-rank + isotropic and diagonal against explicit matrices."""

from __future__ import annotations

import io
import math

import pytest
import torch

from ctrlora.curvature.factors import (
    DenseFactor,
    DiagonalFactor,
    LowRankFactor,
    damped_pair,
    factor_from_state_dict,
    stored_factor,
)

from .helpers import assert_close

DIM, RANK = 12, 4


def decaying_spectrum_matrix() -> tuple[torch.Tensor, torch.Tensor]:
    """S = Q diag(λ) Qᵀ with four spikes over a flat tail (like activation covariances), and λ descending."""
    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(DIM, DIM, generator=generator, dtype=torch.float64)).Q
    spikes = torch.tensor([10.0, 8.0, 6.0, 4.0], dtype=torch.float64)
    eigvals = torch.cat([spikes, torch.linspace(0.3, 0.1, DIM - len(spikes), dtype=torch.float64)])
    return basis @ torch.diag(eigvals) @ basis.T, eigvals


def operand(columns: int = 3) -> torch.Tensor:
    return torch.randn(DIM, columns, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def check_consistent(factor, matrix: torch.Tensor) -> None:
    """Every operation of `factor` agrees with the explicit symmetric matrix it stands for."""
    x, eye = operand(), torch.eye(DIM, dtype=torch.float64)
    assert_close(factor.dense(), matrix, 1e-12)
    assert_close(factor.apply(x), matrix @ x, 1e-12)
    assert_close(factor.apply(x[:, 0]), matrix @ x[:, 0], 1e-12)  # vectors too
    assert_close(factor.quadratic_form(x), x.T @ matrix @ x, 1e-12)
    root = factor.power_apply(eye, 0.5)
    inverse_root = factor.power_apply(eye, -0.5)
    assert_close(root @ root, matrix, 1e-10)
    assert_close(inverse_root @ matrix @ inverse_root, eye, 1e-10)
    # whitening with the factor's square root R (R Rᵀ = S): R⁻¹ S R⁻ᵀ = I, R⁻ᵀ = (R⁻¹)ᵀ, R⁻¹ R = I
    whiten, unwhiten, root_t = factor.whiten(eye), factor.unwhiten(eye), factor.root_transpose_apply(eye)
    assert_close(root_t.T @ root_t, matrix, 1e-10)
    assert_close(whiten @ matrix @ whiten.T, eye, 1e-10)
    assert_close(unwhiten, whiten.T, 1e-10)
    assert_close(whiten @ root_t.T, eye, 1e-10)
    assert_close(factor.whiten(x[:, 0]), whiten @ x[:, 0], 1e-10)
    assert factor.trace() == pytest.approx(float(matrix.trace()), rel=1e-12)
    assert_close(factor.eigenvalues(), torch.linalg.eigvalsh(matrix).flip(0), 1e-10)


def test_dense_factor_matches_its_matrix():
    matrix, _ = decaying_spectrum_matrix()
    check_consistent(DenseFactor(matrix), matrix)
    assert DenseFactor(matrix).nbytes == DIM * DIM * 8


def test_low_rank_factor_is_exact_for_its_matrix_and_within_truncation_error_of_the_original():
    matrix, eigvals = decaying_spectrum_matrix()
    factor = DenseFactor(matrix).truncated(RANK)
    assert isinstance(factor, LowRankFactor) and factor.rank == RANK
    isotropic = float(eigvals[RANK:].mean())
    expected_eigvals = torch.cat([eigvals[:RANK], torch.full((DIM - RANK,), isotropic, dtype=torch.float64)])
    assert_close(factor.eigenvalues(), expected_eigvals, 1e-10)
    check_consistent(factor, factor.dense())
    assert factor.nbytes == (DIM * RANK + RANK + 1) * 8

    # against the original: each operation is off by at most the spectral norm of its tail error
    x = operand()
    tail = eigvals[RANK:]
    for power in (1.0, 0.5, -0.5):
        exact = torch.linalg.eigh(matrix)
        exact_power = exact.eigenvectors @ torch.diag(exact.eigenvalues**power) @ exact.eigenvectors.T
        bound = float((tail**power - isotropic**power).abs().max())
        assert float((factor.power_apply(x, power) - exact_power @ x).norm()) <= bound * float(x.norm()) * (1 + 1e-9)
    bound = float((tail - isotropic).abs().max())
    assert float((factor.quadratic_form(x) - x.T @ matrix @ x).norm()) <= bound * float(x.norm()) ** 2
    assert bound < 0.1 * float(eigvals[0])  # the truncation error is small for this spectrum


def test_a_low_rank_factor_truncates_as_the_dense_one_would():
    matrix, eigvals = decaying_spectrum_matrix()
    dense = DenseFactor(matrix)
    smaller = dense.truncated(RANK).truncated(RANK // 2)  # the kept eigenpairs and the mean of all the others
    assert smaller.rank == RANK // 2 and smaller.trace() == pytest.approx(float(eigvals.sum()), rel=1e-12)
    assert_close(smaller.dense(), dense.truncated(RANK // 2).dense(), 1e-10)
    with pytest.raises(ValueError, match="rank must lie in"):
        smaller.truncated(RANK // 2)


def test_diagonal_factor_matches_its_matrix():
    diagonal = torch.linspace(0.5, 3.0, DIM, dtype=torch.float64)
    check_consistent(DiagonalFactor(diagonal), torch.diag(diagonal))
    assert DiagonalFactor(diagonal).nbytes == DIM * 8


@pytest.mark.parametrize("storage", ["dense", "low_rank", "diagonal"])
def test_damping_and_normalisation_return_new_factors(storage):
    matrix, _ = decaying_spectrum_matrix()
    factor = {
        "dense": DenseFactor(matrix),
        "low_rank": DenseFactor(matrix).truncated(RANK),
        "diagonal": DiagonalFactor(matrix.diagonal().clone()),
    }[storage]
    original = factor.dense().clone()
    mean = float(original.trace()) / DIM
    eye = torch.eye(DIM, dtype=torch.float64)
    assert_close(factor.damped(0.1).dense(), original + 0.1 * mean * eye, 1e-12)
    assert factor.normalized().trace() == pytest.approx(DIM, rel=1e-12)
    assert_close(factor.normalized().dense(), original / mean, 1e-12)
    assert_close(factor.dense(), original, 0.0)  # unchanged
    a, g = damped_pair(factor, factor.scaled(3.0), 0.04, pi_split=True)
    assert_close(a.dense(), original + 0.2 * mean * eye, 1e-12)  # √γ relative damping on each side
    assert_close(g.dense(), 3.0 * (original + 0.2 * mean * eye), 1e-12)


def test_pi_split_damps_the_kronecker_product_by_gamma_times_its_mean_eigenvalue():
    """(A + π√λ I) ⊗ (G + √λ/π I) with λ = γ·ā·ḡ, π = √(ā/ḡ) (Martens & Grosse 2015)."""
    a_matrix, _ = decaying_spectrum_matrix()
    g_matrix = torch.diag(torch.linspace(1.0, 5.0, 3, dtype=torch.float64))
    a, g, gamma = DenseFactor(a_matrix), DenseFactor(g_matrix), 0.01
    damping = gamma * a.mean_eigenvalue() * g.mean_eigenvalue()
    pi = math.sqrt(a.mean_eigenvalue() / g.mean_eigenvalue())
    expected_a = a_matrix + pi * math.sqrt(damping) * torch.eye(DIM, dtype=torch.float64)
    expected_g = g_matrix + math.sqrt(damping) / pi * torch.eye(3, dtype=torch.float64)
    damped_a, damped_g = damped_pair(a, g, gamma, pi_split=True)
    assert_close(damped_a.dense(), expected_a, 1e-12)
    assert_close(damped_g.dense(), expected_g, 1e-12)


def test_a_computed_eigendecomposition_carries_over_to_damped_and_normalised_copies():
    matrix, _ = decaying_spectrum_matrix()
    factor = DenseFactor(matrix)
    factor.power_apply(operand(), -0.5)  # computes the eigendecomposition
    derived = factor.damped(0.1).normalized()
    x = operand()
    fresh = DenseFactor(derived.dense())
    assert_close(derived.power_apply(x, -0.5), fresh.power_apply(x, -0.5), 1e-12)
    assert_close(derived.power_apply(x, 0.5), fresh.power_apply(x, 0.5), 1e-12)


def test_a_singular_factor_has_no_inverse_root_until_damped():
    ones = torch.ones(3, dtype=torch.float64)
    diagonal = DiagonalFactor(torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64))
    dense = DenseFactor(torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64))
    for singular in (diagonal, dense):
        with pytest.raises(ValueError, match="damp it first"):
            singular.whiten(ones)
        assert torch.isfinite(singular.damped(1e-3).whiten(ones)).all()
    with pytest.raises(ValueError, match="damp it first"):
        diagonal.power_apply(ones, -0.5)


def test_quadratic_form_is_differentiable():
    matrix, _ = decaying_spectrum_matrix()
    for factor in (DenseFactor(matrix), DenseFactor(matrix).truncated(RANK)):
        x = operand().requires_grad_(True)
        factor.quadratic_form(x).trace().backward()
        assert_close(x.grad, 2 * factor.dense() @ x.detach(), 1e-12)


@pytest.mark.parametrize("rank", [None, RANK])
def test_state_dicts_round_trip_through_torch_save(rank):
    matrix, _ = decaying_spectrum_matrix()
    for factor in (stored_factor(matrix, rank), DiagonalFactor(matrix.diagonal().clone())):
        buffer = io.BytesIO()
        torch.save(factor.state_dict(), buffer)
        buffer.seek(0)
        loaded = factor_from_state_dict(torch.load(buffer, weights_only=True))
        assert type(loaded) is type(factor)
        assert_close(loaded.dense(), factor.dense(), 0.0)


def test_stored_factor_truncates_only_below_the_dimension():
    matrix, _ = decaying_spectrum_matrix()
    assert isinstance(stored_factor(matrix, None), DenseFactor)
    assert isinstance(stored_factor(matrix, DIM), DenseFactor)
    assert isinstance(stored_factor(matrix, RANK), LowRankFactor)
    with pytest.raises(ValueError, match="rank must lie in"):
        DenseFactor(matrix).truncated(DIM)
