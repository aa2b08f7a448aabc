"""Whitened-gradient spectra: dense definition, randomized SVD, the streaming sketch against dense G, and their bound."""

from __future__ import annotations

import pytest
import torch

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.curvature.factors import DenseFactor
from ctrlora.curvature.lowrank import DampedPairs
from ctrlora.curvature.result import ModuleCurvature
from ctrlora.curvature.spectra import whitened_gradient_svd

from .helpers import (
    assert_close,
    collate,
    lm_batches,
    sequences,
    targets_of,
    tiny_llama,
    tiny_llama_classifier,
)


def inverse_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    eigvals, eigvecs = torch.linalg.eigh(matrix)
    return eigvecs @ torch.diag(eigvals**-0.5) @ eigvecs.T


def synthetic_curvature(d_out: int = 24, d_in: int = 40) -> ModuleCurvature:
    """PSD factors and a gradient whose whitened spectrum decays geometrically."""
    generator = torch.Generator().manual_seed(0)

    def psd(dim):
        root = torch.randn(dim, 2 * dim, generator=generator, dtype=torch.float64)
        return root @ root.T / (2 * dim)

    left = torch.linalg.qr(torch.randn(d_out, d_out, generator=generator, dtype=torch.float64)).Q
    right = torch.linalg.qr(torch.randn(d_in, d_out, generator=generator, dtype=torch.float64)).Q
    grad = left @ torch.diag(0.7 ** torch.arange(d_out, dtype=torch.float64)) @ right.T
    return ModuleCurvature(a=DenseFactor(psd(d_in)), g=DenseFactor(psd(d_out)), grad=grad, tokens=1)


def test_svd_of_the_whitened_gradient_matches_its_definition():
    curvature = synthetic_curvature()
    damping = 0.1
    a, g = curvature.a.dense(), curvature.g.dense()
    damped_a = a + damping * a.trace() / a.shape[0] * torch.eye(a.shape[0], dtype=torch.float64)
    damped_g = g + damping * g.trace() / g.shape[0] * torch.eye(g.shape[0], dtype=torch.float64)
    whitened = inverse_sqrt(damped_g) @ curvature.grad @ inverse_sqrt(damped_a)
    exact = torch.linalg.svd(whitened)
    a, g = curvature.a.damped(damping), curvature.g.damped(damping)
    # 5 + 19 columns reach d_out = 24: the exact SVD of R_g⁻¹ G R_a⁻ᵀ (Cholesky roots), which has the
    # singular values of the symmetric whitening and maps back (R_g⁻ᵀ U, R_a⁻ᵀ V) to the same update
    left, values, right = whitened_gradient_svd(curvature, 5, damping, oversampling=19)
    assert_close(values, exact.S[:5], 1e-10)
    inverse_root_g, inverse_root_a = inverse_sqrt(damped_g), inverse_sqrt(damped_a)
    assert_close(
        g.unwhiten(left) @ torch.diag(values) @ a.unwhiten(right).T,
        inverse_root_g @ exact.U[:, :5] @ torch.diag(exact.S[:5]) @ exact.Vh[:5] @ inverse_root_a,
        1e-9,
    )
    assert left.shape == (24, 5) and right.shape == (40, 5)

    randomized = whitened_gradient_svd(curvature, 5, damping, oversampling=5, power_iters=2)
    assert_close(randomized[1], exact.S[:5], 1e-4)
    rough = whitened_gradient_svd(curvature, 5, damping, oversampling=1, power_iters=0)
    assert (rough[1] - exact.S[:5]).abs().max() > 1e-3  # one pass, one extra column: visibly off
    asked_exact = whitened_gradient_svd(curvature, 5, damping, oversampling=1, power_iters=0, exact_max_dim=40)
    assert_close(asked_exact[1], exact.S[:5], 1e-10)  # both dims ≤ exact_max_dim (CG-LoRA, docs/METHODS.md §5)


def test_sketch_recovers_the_dense_spectrum_exactly_when_the_gradient_has_low_rank():
    """One 5-token sequence: rank(G) ≤ 5 < the sketch width, so the sketch is exact."""
    model = tiny_llama()
    batches = [collate(sequences(7, [5]))]
    targets = targets_of(model, ["q_proj", "down_proj"])
    dense = estimate_curvature(model, batches, targets, CurvatureConfig(), want_grad=True, progress=False)
    cfg = CurvatureConfig(grad_mode="sketch")
    sketched = estimate_curvature(model, batches, targets, cfg, want_grad=True, sketch_rank=4, progress=False)
    assert sketched.report.passes == 3 and all(sketched[name].grad is None for name in targets)
    for name in targets:
        left, values, right = whitened_gradient_svd(dense[name], 4, cfg.damping)
        sketch_left, sketch_values, sketch_right = whitened_gradient_svd(sketched[name], 4, cfg.damping)
        assert_close(sketch_values, values, 1e-8)
        top = left[:, :3] @ torch.diag(values[:3]) @ right[:, :3].T  # the 4th value is 0 for q_proj
        assert_close(sketch_left[:, :3] @ torch.diag(sketch_values[:3]) @ sketch_right[:, :3].T, top, 1e-8)


@pytest.mark.parametrize(("power_iters", "tolerance"), [(0, 0.02), (1, 0.002)])
def test_sketch_top_singular_values_agree_with_the_dense_svd(power_iters, tolerance):
    model = tiny_llama()
    batches = lm_batches()  # 34 positions: rank(G) exceeds the sketch width of 14
    targets = targets_of(model)
    dense = estimate_curvature(model, batches, targets, CurvatureConfig(), want_grad=True, progress=False)
    cfg = CurvatureConfig(grad_mode="sketch", sketch_power_iters=power_iters)
    sketched = estimate_curvature(model, batches, targets, cfg, want_grad=True, sketch_rank=4, progress=False)
    assert sketched.report.passes == 1 + 2 + 2 * power_iters
    for name in targets:
        values = whitened_gradient_svd(dense[name], 4, cfg.damping)[1]
        assert_close(whitened_gradient_svd(sketched[name], 4, cfg.damping)[1], values, tolerance)


def test_sketch_refuses_a_different_damping():
    model = tiny_llama()
    target = targets_of(model, ["o_proj"])
    cfg = CurvatureConfig(grad_mode="sketch", damping=1e-2)
    sketched = estimate_curvature(
        model, lm_batches(), target, cfg, want_grad=True, sketch_rank=2, progress=False
    )
    with pytest.raises(ValueError, match="damping=0.01"):
        whitened_gradient_svd(sketched[target[0]], 2, 1e-3)
    with pytest.raises(ValueError, match="sketch holds rank"):
        whitened_gradient_svd(sketched[target[0]], 99, 1e-2)


def test_targets_sharing_a_factor_have_it_damped_and_factorised_once():
    """q/k/v share S_a: `DampedPairs` hands the same damped copy (and its Cholesky factor) to each,
    and forgets raw factors beyond its `keep` most recent."""
    first, second = synthetic_curvature(), synthetic_curvature()
    second.a = first.a  # shared input factor, separate output factors
    pairs = DampedPairs(0.1, keep=2)
    (a1, g1), (a2, g2) = pairs(first), pairs(second)
    assert a1 is a2 and g1 is not g2
    assert_close(a1.dense(), first.a.damped(0.1).dense(), 0.0)
    a1.whiten(torch.ones(40, dtype=torch.float64))
    assert a2.cholesky() is a1.cholesky()  # computed once
    pairs(synthetic_curvature())  # two more raw factors push the shared one out
    assert pairs(first)[0] is not a1


def test_a_dense_factors_whitening_keeps_only_its_cholesky_factor_and_whitens_the_same():
    factor = synthetic_curvature().a.damped(1e-3)
    whitening = factor.whitening()
    assert vars(whitening).keys() == {"lower", "dim"} and whitening.dim == factor.dim  # no dim×dim matrix besides L
    x = torch.randn(factor.dim, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_close(whitening.whiten(x), factor.whiten(x), 1e-12)
    assert_close(whitening.unwhiten(x), factor.unwhiten(x), 1e-12)
    assert_close(whitening.whiten(factor.apply(whitening.unwhiten(x))), x, 1e-10)  # R⁻¹ S R⁻ᵀ = I


@pytest.mark.parametrize("classifier", [False, True])
def test_with_the_empirical_fisher_the_whitened_singular_values_are_canonical_correlations(classifier):
    """S_a = (1/P) Σ_p x xᵀ, S_g = (1/T) Σ_p g gᵀ and G = (1/T) Σ_p g xᵀ are moments over the same
    positions, so by Cauchy–Schwarz σ(S_g^{-1/2} G S_a^{-1/2}) ≤ √(P/T): 1 for a classifier (T = P),
    √(30/20) for these LM batches (2 prompt positions in each of 5 sequences). With fewer positions
    than dimensions the top values reach the bound, and CTR-LoRA's utilities ½σ² all sit near ½
    (experiments/nlu_minilm/README.md)."""
    model = tiny_llama_classifier(num_labels=3) if classifier else tiny_llama()
    batches = lm_batches()
    if classifier:
        for index, batch in enumerate(batches):
            rows = batch["input_ids"].shape[0]
            batch["labels"] = torch.randint(0, 3, (rows,), generator=torch.Generator().manual_seed(index))
    targets = targets_of(model)
    cfg = CurvatureConfig(fisher="empirical", damping=1e-10)
    estimate = estimate_curvature(model, batches, targets, cfg, want_grad=True, progress=False)
    bound = 1.0 if classifier else (30 / 20) ** 0.5
    tops = torch.stack([whitened_gradient_svd(estimate[name], 1, cfg.damping)[1][0] for name in targets])
    assert tops.max() <= bound * (1 + 1e-6) and tops.min() > 0.9 * bound
