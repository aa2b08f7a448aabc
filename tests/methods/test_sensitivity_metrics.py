"""Sensitivity-LoRA metrics against a naive computation over all m·n sensitivities."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ctrlora.methods.sensitivity_metrics import module_metrics, sensitivity_ranks, sensitivity_scores


def naive_metrics(diag: torch.Tensor, m: int, topk_frac: float = 0.5, alpha: float = 0.85):
    """Materialise the Hessian-proxy diagonal 2·S_a repeated over the m rows, then sort."""
    values = sorted((2.0 * float(d) for _ in range(m) for d in diag), reverse=True)
    total = sum(values)
    k = math.ceil(topk_frac * len(values))
    cumulative, eff = 0.0, None
    for index, value in enumerate(values, start=1):
        cumulative += value
        if cumulative / total >= alpha:
            eff = index
            break
    return total, sum(values[:k]) / k, eff


def naive_coefficient(values) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.std(values, ddof=0) / np.mean(values) ** 2)  # population σ


HAND = {  # diag(S_a), out_features
    "a": (torch.tensor([1.0, 3.0, 2.0]), 2),  # λ = 6 6 4 4 2 2
    "b": (torch.tensor([2.0, 2.0]), 3),  # λ = 4 4 4 4 4 4
    "c": (torch.tensor([8.0, 0.0, 0.0, 0.0]), 1),  # λ = 16 0 0 0
}


def test_hand_computed_module_metrics():
    assert module_metrics(*HAND["a"]) == (24.0, pytest.approx(16 / 3), 5)  # 20/24 < .85 <= 22/24
    assert module_metrics(*HAND["b"]) == (24.0, 4.0, 6)  # 5·4/24 < .85
    assert module_metrics(*HAND["c"]) == (16.0, 8.0, 1)


def test_hand_computed_scores_and_ranks():
    report = sensitivity_scores(HAND)
    coefficients = report.coefficients
    assert coefficients.gamma1 == pytest.approx(24 * math.sqrt(2) / 4096)  # σ(24,24,16)/μ² by hand
    topk, eff, glob = [16 / 3, 4.0, 8.0], [5.0, 6.0, 1.0], [24.0, 24.0, 16.0]
    assert coefficients.beta1 == pytest.approx(naive_coefficient(topk))
    assert coefficients.beta2 == pytest.approx(naive_coefficient(eff))
    local = [coefficients.beta1 * t + coefficients.beta2 * e for t, e in zip(topk, eff, strict=True)]
    assert coefficients.gamma2 == pytest.approx(naive_coefficient(local))
    for name, s_local, s_global in zip(HAND, local, glob, strict=True):
        module = report.modules[name]
        assert module.s_local == pytest.approx(s_local)
        assert module.theta == pytest.approx(coefficients.gamma1 * s_global + coefficients.gamma2 * s_local)
    # θ ≈ (0.4871, 0.5081, 0.2961): quotas 12θ/Σθ ≈ (4.53, 4.72, 2.75); largest remainders c then b
    assert sensitivity_ranks(report, rank_per_module=4, r_max=8) == {"a": 4, "b": 5, "c": 3}
    assert sensitivity_ranks(report, rank_per_module=4, r_max=4) == {"a": 4, "b": 4, "c": 4}


def test_metrics_match_naive_on_synthetic_covariances():
    rng = random.Random(0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        n, m = rng.randint(1, 9), rng.randint(1, 7)
        inputs = torch.randn(32, n, generator=generator, dtype=torch.float64) * torch.rand(
            n, generator=generator
        )
        covariance = inputs.T @ inputs / inputs.shape[0]
        topk_frac, alpha = rng.choice([0.5, 0.3, 1.0, 0.01]), rng.choice([0.85, 0.5, 0.99, 1.0])
        total, topk, eff = module_metrics(covariance.diagonal(), m, topk_frac, alpha)
        naive_total, naive_topk, naive_eff = naive_metrics(covariance.diagonal(), m, topk_frac, alpha)
        assert total == pytest.approx(naive_total, rel=1e-12)
        assert topk == pytest.approx(naive_topk, rel=1e-12)
        if alpha < 1.0:  # at alpha = 1 the naive running sum may never reach the trace in floats
            assert eff == naive_eff


def test_effective_rank_on_exact_boundary():
    # λ = 2 2 2 2 (m = 4, n = 1): 2/8 reaches alpha = 0.25 exactly at k = 1
    assert module_metrics(torch.tensor([1.0]), 4, eff_alpha=0.25)[2] == 1
    assert module_metrics(torch.tensor([1.0]), 4, eff_alpha=0.5)[2] == 2
    assert module_metrics(torch.tensor([1.0]), 4, eff_alpha=0.51)[2] == 3


def test_theta_and_ranks_do_not_depend_on_covariance_scale():
    """σ/μ² · X is scale-free, so the factor 2 (or the token normalisation of S_a) drops out of θ."""
    base = sensitivity_scores(HAND)
    scaled = sensitivity_scores({name: (diag * 7.5, m) for name, (diag, m) in HAND.items()})
    for name in HAND:
        assert scaled.modules[name].theta == pytest.approx(base.modules[name].theta, rel=1e-12)
        assert scaled.modules[name].s_global == pytest.approx(7.5 * base.modules[name].s_global)
    assert scaled.coefficients.gamma1 == pytest.approx(base.coefficients.gamma1 / 7.5)
    assert sensitivity_ranks(scaled, 4, 8) == sensitivity_ranks(base, 4, 8)


def test_identical_targets_share_the_budget_equally():
    same = {f"m{i}": (torch.tensor([1.0, 2.0]), 3) for i in range(4)}
    report = sensitivity_scores(same)
    assert all(module.theta == 0.0 for module in report.modules.values())  # σ = 0 everywhere
    assert sensitivity_ranks(report, 5, r_max=16) == {f"m{i}": 5 for i in range(4)}


@pytest.mark.parametrize(
    ("diag", "m", "kwargs", "message"),
    [
        (torch.tensor([1.0, -1.0]), 2, {}, ">= 0"),
        (torch.zeros(3), 2, {}, "all zero"),
        (torch.ones(2, 2), 2, {}, "1-D"),
        (torch.ones(3), 0, {}, "out_features"),
        (torch.ones(3), 2, {"topk_frac": 0.0}, "topk_frac"),
        (torch.ones(3), 2, {"eff_alpha": 1.5}, "eff_alpha"),
    ],
)
def test_bad_input_is_rejected(diag, m, kwargs, message):
    with pytest.raises(ValueError, match=message):
        module_metrics(diag, m, **kwargs)
