"""Sensitivity-LoRA's per-matrix sensitivity metrics and rank allocation (docs/METHODS.md §4).

For a target ``W ∈ R^{m×n}`` the Hessian proxy is ``2 S_a`` shared by the m rows, so its
diagonal sensitivities, sorted, are ``λ = 2·diag(S_a)`` with every value repeated m times
(N = m·n values). With ``d_1 >= ... >= d_n`` the sorted ``2·diag(S_a)``:

- global ``S_g = tr(H) = Σ_i λ_i = m Σ_j d_j``
- Top-k ``S_topk = (1/k) Σ_{i<=k} λ_i``, ``k = ⌈topk_frac · N⌉``
- effective rank ``S_eff = min{k : Σ_{i<=k} λ_i / Σ_i λ_i >= eff_alpha}``
- ``S_local = β1 S_topk + β2 S_eff`` and ``θ = γ1 S_g + γ2 S_local`` where each coefficient is
  ``σ/μ²`` of its metric over all target matrices.

Everything is computed from the n distinct values with multiplicity m, never the m·n list.

On the constant 2: ``S_g`` and ``S_topk`` scale with it (and with any scale of ``S_a``, e.g. its
token normalisation) and their coefficients ``σ/μ²`` scale inversely, while ``S_eff`` is
scale-free. Each product ``(σ/μ²)(X) · X`` is unchanged when X is multiplied by c > 0
(``σ → cσ, μ² → c²μ²``), so θ and the ranks do not depend on the 2; the reported metrics and
coefficients do, and follow the spec's ``2 S_a``. σ is the population standard deviation
(ddof = 0, defined for a single matrix). The sample version would multiply every coefficient by
the same ``sqrt(L/(L-1))``, which scales θ uniformly and leaves the proportional ranks unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ctrlora.allocation import allocate_ranks

HESSIAN_PROXY_FACTOR = 2.0  # H = 2 S_a per row (layer-wise reconstruction Hessian)


@dataclass(frozen=True)
class ModuleSensitivity:
    """The metrics of one target matrix."""

    s_global: float  # S_g = tr(H)
    s_topk: float  # mean of the k largest sensitivities
    s_eff: int  # effective rank (number of sensitivities holding eff_alpha of the trace)
    s_local: float  # β1 S_topk + β2 S_eff
    theta: float  # γ1 S_g + γ2 S_local


@dataclass(frozen=True)
class SensitivityCoefficients:
    """``σ/μ²`` of each metric across the target matrices."""

    beta1: float  # of S_topk
    beta2: float  # of S_eff
    gamma1: float  # of S_g
    gamma2: float  # of S_local


@dataclass(frozen=True)
class SensitivityReport:
    modules: dict[str, ModuleSensitivity]
    coefficients: SensitivityCoefficients

    def thetas(self) -> dict[str, float]:
        return {name: module.theta for name, module in self.modules.items()}


def module_metrics(
    activation_diag: Tensor, out_features: int, topk_frac: float = 0.5, eff_alpha: float = 0.85
) -> tuple[float, float, int]:
    """``(S_g, S_topk, S_eff)`` of one matrix from ``diag(S_a)`` (length n) and m = out_features.

    The sorted sensitivities are blocks of m equal values ``d_1 >= d_2 >= ...``; the top-k sum is
    ``m Σ_{j<q} d_j + (k − q m) d_q`` with ``q = k // m``, and the effective rank is found in the
    first block whose cumulative sum reaches ``eff_alpha`` of the trace, as ``(j-1)·m + t`` with
    the smallest t in ``1..m`` satisfying the inequality. Computed in fp64.
    """
    if not 0 < topk_frac <= 1:
        raise ValueError(f"topk_frac must be in (0, 1], got {topk_frac}")
    if not 0 < eff_alpha <= 1:
        raise ValueError(f"eff_alpha must be in (0, 1], got {eff_alpha}")
    if out_features < 1 or activation_diag.ndim != 1 or activation_diag.numel() == 0:
        raise ValueError(
            f"need a non-empty 1-D activation diagonal and out_features >= 1, got shape "
            f"{tuple(activation_diag.shape)} and out_features={out_features}"
        )
    values = HESSIAN_PROXY_FACTOR * activation_diag.detach().to("cpu", torch.float64)
    if bool((values < 0).any()) or not bool(values.isfinite().all()):
        raise ValueError("activation covariance diagonal must be finite and >= 0")
    m = out_features
    values = values.sort(descending=True).values.tolist()
    total = m * math.fsum(values)
    if total <= 0:
        raise ValueError("activation covariance diagonal is all zero: the sensitivities are undefined")
    count = m * len(values)
    k = math.ceil(topk_frac * count)
    full_blocks, partial = divmod(k, m)
    topk_sum = m * math.fsum(values[:full_blocks]) + (partial * values[full_blocks] if partial else 0.0)
    return total, topk_sum / k, _effective_rank(values, m, total, eff_alpha)


def _effective_rank(values: list[float], m: int, total: float, alpha: float) -> int:
    prefix = 0.0
    for j, value in enumerate(values):
        if (prefix + m * value) / total >= alpha:
            t = max(1, math.ceil((alpha * total - prefix) / value))
            while t > 1 and (prefix + (t - 1) * value) / total >= alpha:
                t -= 1
            while (prefix + t * value) / total < alpha:
                t += 1
            return j * m + t
        prefix += m * value
    return m * len(values)  # rounding left the full sum a hair below alpha * total


def sensitivity_scores(
    activation_diags: Mapping[str, tuple[Tensor, int]], topk_frac: float = 0.5, eff_alpha: float = 0.85
) -> SensitivityReport:
    """Metrics and θ of every target from ``{name: (diag(S_a), out_features)}``."""
    if not activation_diags:
        raise ValueError("sensitivity_scores needs at least one target matrix")
    raw = {
        name: module_metrics(diag, m, topk_frac, eff_alpha) for name, (diag, m) in activation_diags.items()
    }
    s_global = [metrics[0] for metrics in raw.values()]
    s_topk = [metrics[1] for metrics in raw.values()]
    s_eff = [float(metrics[2]) for metrics in raw.values()]
    beta1, beta2 = _dispersion(s_topk), _dispersion(s_eff)
    s_local = [beta1 * a + beta2 * b for a, b in zip(s_topk, s_eff, strict=True)]
    gamma1, gamma2 = _dispersion(s_global), _dispersion(s_local)
    modules = {
        name: ModuleSensitivity(
            s_global=s_global[i],
            s_topk=s_topk[i],
            s_eff=raw[name][2],
            s_local=s_local[i],
            theta=gamma1 * s_global[i] + gamma2 * s_local[i],
        )
        for i, name in enumerate(raw)
    }
    return SensitivityReport(modules, SensitivityCoefficients(beta1, beta2, gamma1, gamma2))


def _dispersion(values: list[float]) -> float:
    """``σ/μ²`` with the population standard deviation; 0 when the metric is constant.

    The metrics are non-negative, so σ > 0 implies μ > 0. A constant metric (σ = 0, e.g. every
    S_local is 0 because S_topk and S_eff are constant) does not tell the targets apart and
    gets weight 0; if all four are constant every θ is 0 and the ranks come out equal.
    """
    mean = math.fsum(values) / len(values)
    deviation = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))
    return deviation / mean**2 if deviation > 0 else 0.0


def sensitivity_ranks(
    report: SensitivityReport, rank_per_module: int, r_max: int, r_min: int = 1
) -> dict[str, int]:
    """``r_l ∝ θ_l`` with ``Σ r_l = r̄ |T|`` exactly, clamped to ``[r_min, r_max]``."""
    total = rank_per_module * len(report.modules)
    return allocate_ranks(report.thetas(), None, total, r_min, r_max, "proportional")
