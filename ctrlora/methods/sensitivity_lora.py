"""Sensitivity-LoRA (arXiv 2509.09119, docs/METHODS.md §4): one-shot proportional rank allocation.

The Hessian proxy of a target ``W ∈ R^{m×n}`` is ``2 S_a`` shared by its m rows, with
``S_a = (1/P) Σ_p x_p x_pᵀ`` over the P non-padding positions of a forward-only pass over the
calibration set (the estimator kind is forced to ``activation``). Its diagonal gives the global trace, the Top-k and
effective-rank metrics, their ``σ/μ²`` weights and ``θ_l`` (`sensitivity_metrics`); ranks
``r_l ∝ θ_l`` with ``Σ r_l = r̄ |T|`` exactly. Adapters start as in LoRA (A random, B = 0).
"""

from __future__ import annotations

from dataclasses import asdict

from peft import PeftModel
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from ctrlora.curvature.factors import DenseFactor, DiagonalFactor, Factor, LowRankFactor
from ctrlora.errors import ConfigError
from ctrlora.methods.allocating import AllocatingMethod
from ctrlora.methods.base import register_method
from ctrlora.methods.sensitivity_metrics import sensitivity_ranks, sensitivity_scores


def factor_diagonal(factor: Factor) -> Tensor:
    """``diag(S)`` of a stored factor, without materialising a low-rank one:
    ``diag(U diag(λ) Uᵀ + σ(I − UUᵀ)) = σ + Σ_k (λ_k − σ) U_{ik}²``."""
    if isinstance(factor, DenseFactor):
        return factor.matrix.diagonal()
    if isinstance(factor, DiagonalFactor):
        return factor.diagonal
    if isinstance(factor, LowRankFactor):
        return factor.isotropic + factor.eigvecs.pow(2) @ (factor.eigvals - factor.isotropic)
    raise TypeError(f"unknown factor storage {type(factor).__name__}")


@register_method("sensitivity_lora")
class SensitivityLoraMethod(AllocatingMethod):
    needs_calibration = True
    rule = "proportional"

    def prepare(self, model: PreTrainedModel, calibration: DataLoader | None) -> PeftModel:
        settings = self.ctx.method.sensitivity
        if calibration is None:
            raise ConfigError("method=sensitivity_lora needs the calibration loader (calibration.num_samples > 0)")
        self.resolve(model)
        names = list(self.shapes)
        cfg = self.curvature_settings("activation")
        curvature = self.estimate(model, calibration, names, cfg, cache_key=self.calibration_key(model))
        diagonals = {name: (factor_diagonal(curvature[name].a), self.shapes[name][0]) for name in names}
        report = sensitivity_scores(diagonals, settings.topk_frac, settings.eff_alpha)
        r_max = self.default_r_max(settings.r_max)
        self.ranks = sensitivity_ranks(report, self.budget.rank, r_max, settings.r_min)
        peft_model = self.wrap(model, self.allocated_config(self.ranks))
        self.record = self.base_record({name: asdict(metrics) for name, metrics in report.modules.items()}, settings)
        self.record["coefficients"] = asdict(report.coefficients)
        self.record["r_max"] = r_max
        self.record["rank_total_allowed"] = self.budget.rank * len(names)
        return peft_model
