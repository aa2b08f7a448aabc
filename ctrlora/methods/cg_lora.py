"""CG-LoRA (arXiv 2603.29824, METHODS §5): curvature-whitened gradient initialisation.

From K-FAC factors and the full-weight gradient G of the mean token loss on the calibration set
(the estimator kind is forced to ``kfac``), each target starts at

    ΔW₀ = η · S_g^{-1/2} [T]_r S_a^{-1/2},   T = −S_g^{-1/2} G S_a^{-1/2}  (damped factors),

the best rank-r step of the local quadratic model (`lowrank`), split into balanced factors
``s B₀ A₀ = ΔW₀``, ``B₀ᵀB₀ = A₀A₀ᵀ``. ``cg.eta: auto`` scores every η of ``cg.eta_grid`` by the mean
token loss of ``W + ΔW₀(η)`` on the last ``cg.eta_holdout_batches`` calibration batches (kept
out of the estimate) and keeps the best. ``cg.shift: false`` keeps W (the model starts moved by
ΔW₀); ``true`` subtracts ``s B₀A₀`` from W so the initial function is the pretrained one, and the
export converts the adapter back to a delta on the original base (PEFT's PiSSA conversion).
Ranks: r̄ everywhere, or ``cg.allocate: greedy`` on ``½σ²`` of T (CTR-LoRA's allocator).
The top-r SVD of T is exact for targets with m, n ≤ 4096, randomized for wider ones (METHODS §5).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from ctrlora.allocation import allocate_ranks
from ctrlora.config import TrainConfig
from ctrlora.curvature.hooks import calibration_mode
from ctrlora.curvature.objectives import objective_for
from ctrlora.curvature.result import CurvatureResult
from ctrlora.curvature.runtime import batch_to_device, input_device
from ctrlora.errors import ConfigError
from ctrlora.methods.allocating import AllocatingMethod, BatchRange, lora_layers, set_adapter
from ctrlora.methods.base import register_method
from ctrlora.methods.lowrank import DampedPairs, WhitenedSpectrum, curvature_step_factors, whitened_spectra

log = logging.getLogger(__name__)
EXACT_SVD_MAX_DIM = 4096  # METHODS §5: the top-r SVD of T is exact when m, n ≤ 4096, randomized beyond


@torch.no_grad()
def mean_token_loss(model: nn.Module, batches: Iterable[dict[str, Any]]) -> float:
    """``Σ_t ℓ_t / T`` over the counted tokens of `batches` (eval mode, METHODS §3 token rules)."""
    total, tokens, objective = 0.0, 0, None
    device = input_device(model)
    with calibration_mode(model, keep_checkpointing=False, input_grads=False):
        for batch in batches:
            batch = batch_to_device(batch, device)
            objective = objective or objective_for(batch)
            total += float(objective.loss(objective.forward(model, batch), batch))
            tokens += int(objective.token_mask(batch).sum())
    if tokens == 0:
        raise ValueError("the held-out calibration batches hold no counted tokens")
    return total / tokens


def shift_base_weight(name: str, weight: Tensor, step: Tensor) -> None:
    """``W ← W − ΔW₀`` in place, warning when ΔW₀ dwarfs W: the subtraction then cancels W's low-order
    digits in its dtype and the model no longer starts at the pretrained function."""
    ratio = float(step.abs().max() / weight.abs().max().clamp_min(torch.finfo(weight.dtype).tiny))
    if ratio * torch.finfo(weight.dtype).eps > 1e-5:
        log.warning(
            "method.cg.shift=true: the initial step of %s is %.3g times its base weight; subtracting it in %s"
            " loses the weight's low-order digits. Use a smaller method.cg.eta or method.cg.shift=false.",
            name, ratio, weight.dtype,
        )
    weight -= step.to(weight.dtype)


@register_method("cg_lora")
class CgLoraMethod(AllocatingMethod):
    needs_calibration = True

    def __init__(self, cfg: TrainConfig, *, total_steps: int, run_dir: Path) -> None:
        super().__init__(cfg, total_steps=total_steps, run_dir=run_dir)
        settings, method = cfg.method.cg, cfg.method
        settings.validate()
        if str(method.init) != "default":
            raise ConfigError(f"method.init={method.init!r}: CG-LoRA sets its own init; leave method.init=default")
        if method.use_dora:
            raise ConfigError("method.use_dora=true: DoRA's magnitudes are fixed before CG-LoRA's init; use method=dora")
        if settings.shift and method.quantize_4bit:
            raise ConfigError("method.cg.shift=true cannot modify 4-bit quantised base weights; use shift=false")
        self.eta = float("nan")
        self.eta_search: dict[str, float] = {}

    @property
    def rule(self) -> str:  # type: ignore[override]
        return self.cfg.method.cg.allocate

    @property
    def converts_on_export(self) -> bool:
        return self.cfg.method.cg.shift or super().converts_on_export

    def prepare(self, model: PreTrainedModel, calibration: DataLoader | None) -> PeftModel:
        settings = self.cfg.method.cg
        if calibration is None:
            raise ConfigError("method=cg_lora needs the calibration loader (calibration.num_samples > 0)")
        self.resolve(model)
        estimate_batches, holdout = self.split_calibration(calibration)
        cfg = self.curvature_settings("kfac")
        r_max = self.default_r_max(settings.r_max) if settings.allocate == "greedy" else self.budget.rank
        names = list(self.shapes)
        key = self.calibration_key(model, batches=[0, len(estimate_batches)] if holdout is not None else "all")
        curvature = self.estimate(model, estimate_batches, names, cfg, want_grad=True, sketch_rank=r_max, cache_key=key)
        ranks = {name: min(r_max, *self.shapes[name]) for name in names}
        spectra = whitened_spectra(
            curvature.modules, ranks, damping=cfg.damping, pi_split=cfg.pi_damping, seed=cfg.seed,
            exact_max_dim=EXACT_SVD_MAX_DIM,
        )
        self.ranks = self.allocate(spectra, r_max)
        steps = self.unit_steps(curvature, spectra)
        del curvature  # the factors are not needed in training
        peft_model = self.wrap(
            model, self.allocated_config(self.ranks), lambda m: self.initialise(m, steps, holdout)
        )
        self.record = self.base_record(self.module_records(spectra), settings)
        self.record.update(r_max=r_max, eta=self.eta, eta_search=self.eta_search)
        self.write_record()
        return peft_model

    def split_calibration(self, calibration: DataLoader) -> tuple[Iterable[dict[str, Any]], BatchRange | None]:
        """(estimate batches, held-out batches for the η search or None when η is fixed)."""
        settings = self.cfg.method.cg
        if settings.eta != "auto":
            return calibration, None
        count, held = len(calibration), settings.eta_holdout_batches
        if count <= held:
            raise ConfigError(
                f"method.cg.eta=auto holds out {held} calibration batch(es) to choose η but the calibration set"
                f" has only {count}; raise calibration.num_samples or set method.cg.eta to a number"
            )
        return BatchRange(calibration, 0, count - held), BatchRange(calibration, count - held, count)

    def allocate(self, spectra: Mapping[str, WhitenedSpectrum], r_max: int) -> dict[str, int]:
        """r̄ on every target (at most min(m, n)), or the greedy knapsack on ``u = ½σ²`` under ρN."""
        settings = self.cfg.method.cg
        if settings.allocate == "uniform":
            return {name: min(self.budget.rank, *self.shapes[name]) for name in spectra}
        utilities = {name: spectrum.utilities() for name, spectrum in spectra.items()}
        return allocate_ranks(
            utilities, self.costs, self.budget.allowed_params, settings.r_min, r_max, "greedy", settings.score
        )

    def unit_steps(
        self, curvature: CurvatureResult, spectra: Mapping[str, WhitenedSpectrum]
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """Balanced ``(B₁, A₁)`` of ``ΔW₀(η = 1)`` for every target with rank > 0 (at its LoRA scaling).

        ``ΔW₀(η)`` is linear in η and balancing scales both factors alike, so ``(√η B₁, √η A₁)`` are the
        balanced factors of any η > 0: the η search needs no further factor algebra.
        """
        cfg = self.curvature_settings("kfac")
        pairs = DampedPairs(cfg.damping, cfg.pi_damping)
        steps = {}
        for name, rank in self.ranks.items():
            if rank > 0:
                a, g = pairs(curvature[name])
                steps[name] = curvature_step_factors(spectra[name], a, g, rank, 1.0, self.scaling_for(rank))
        return steps

    def initialise(
        self, peft_model: PeftModel, steps: Mapping[str, tuple[Tensor, Tensor]], holdout: BatchRange | None
    ) -> None:
        """Choose η (held-out loss of ``W + ΔW₀(η)``), set ``(B₀, A₀) = √η (B₁, A₁)``, and shift W if asked."""
        layers = lora_layers(peft_model)
        settings = self.cfg.method.cg
        if holdout is None:
            self.eta = float(settings.eta)
        else:
            self.eta_search["0"] = mean_token_loss(peft_model, holdout)  # B = 0: the pretrained model
            for eta in map(float, settings.eta_grid):
                for name, layer in layers.items():
                    set_adapter(layer, *(math.sqrt(eta) * factor for factor in steps[name]))
                self.eta_search[repr(eta)] = mean_token_loss(peft_model, holdout)
            self.eta = min(map(float, settings.eta_grid), key=lambda eta: self.eta_search[repr(eta)])
        with torch.no_grad():
            for name, layer in layers.items():
                B, A = (math.sqrt(self.eta) * factor for factor in steps[name])
                set_adapter(layer, B, A)
                if settings.shift:
                    shift_base_weight(name, layer.base_layer.weight, layer.scaling["default"] * B @ A)

    def module_records(self, spectra: Mapping[str, WhitenedSpectrum]) -> dict[str, dict[str, Any]]:
        """Per module: the singular values of T up to its rank, their utilities, the modelled decrease."""
        records = {}
        for name, spectrum in spectra.items():
            rank = self.ranks[name]
            kept = [float(value) for value in spectrum.values[:rank]]
            records[name] = {
                "sigma": kept,
                "utility": sum(spectrum.utilities()[:rank]),
                "modelled_change": (-self.eta + 0.5 * self.eta**2) * sum(value**2 for value in kept),
            }
        return records
