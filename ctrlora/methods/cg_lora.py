"""CG-LoRA (arXiv 2603.29824, docs/METHODS.md §5): curvature-whitened gradient initialisation.

From K-FAC factors and the full-weight gradient G of the mean token loss on the calibration set
(the estimator kind is forced to ``kfac``), each target starts at

    ΔW₀ = η · S_g^{-1/2} [T]_r S_a^{-1/2},   T = −S_g^{-1/2} G S_a^{-1/2}  (damped factors),

the best rank-r step of the local quadratic model (`lowrank`), split into balanced factors
``s B₀ A₀ = ΔW₀``, ``B₀ᵀB₀ = A₀A₀ᵀ``. η = 1 is the full step of the K-FAC model, which
underestimates the curvature along it (25–1000× on a real encoder). ``cg.eta: auto`` therefore
takes the exact quadratic model along the joint direction D = ΔW₀(η=1) of all modules
(`curvature.directional`: one JVP per calibration batch, Gauss–Newton curvature),
``η* = −⟨G, D⟩ / DᵀCD``, times ``cg.eta_scale``, and backtracks over {η, η/4, η/16} on the last
``cg.eta_holdout_batches`` calibration batches (kept out of the estimate): the first η that
lowers their loss below the pretrained model's is kept; if none does, the adapters keep LoRA's
init (A random, B = 0) and the run says so. ``cg.shift: false`` keeps W (the model starts moved
by ΔW₀); ``true`` subtracts ``s B₀A₀`` from W so the initial function is the pretrained one, and
the export converts the adapter back to a delta on the original base (PEFT's PiSSA conversion).
Ranks: r̄ everywhere, or ``cg.allocate: greedy`` on ``½σ²`` of T (CTR-LoRA's allocator).
The top-r SVD of T is exact for targets with m, n ≤ 4096, randomized for wider ones (docs/METHODS.md §5).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from peft import PeftModel
from peft.utils.integrations import dequantize_module_weight
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from ctrlora.curvature.directional import directional_model
from ctrlora.curvature.lowrank import DampedPairs, WhitenedSpectrum, curvature_step_factors
from ctrlora.curvature.objectives import summed_loss
from ctrlora.curvature.result import CurvatureResult
from ctrlora.errors import ConfigError
from ctrlora.methods.allocating import AllocatingMethod, BatchRange
from ctrlora.methods.base import MethodContext, register_method
from ctrlora.peft_layout import ADAPTER, PEFT_PREFIX, adapter_parameters, lora_layers, set_adapter

log = logging.getLogger(__name__)


def mean_token_loss(model: nn.Module, batches: Iterable[dict[str, Any]]) -> float:
    """``Σ_t ℓ_t / T`` over the counted tokens of `batches` (eval mode, docs/METHODS.md §3 token rules)."""
    return summed_loss(model, batches).per_token


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

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        settings, method = ctx.method.cg, ctx.method
        if str(method.init) != "default":
            raise ConfigError(f"method.init={method.init!r}: CG-LoRA sets its own init; leave method.init=default")
        if method.use_dora:
            raise ConfigError("method.use_dora=true: DoRA's magnitudes are fixed before CG-LoRA's init; use method=dora")
        if settings.shift and method.quantize_4bit:
            raise ConfigError("method.cg.shift=true cannot modify 4-bit quantised base weights; use shift=false")
        self.eta = float("nan")
        self.eta_model: dict[str, float] = {}  # eta=auto: slope, curvature and η* of the exact quadratic model
        self.eta_search: dict[str, float] = {}  # eta=auto: held-out loss per η tried
        self.weight_norms: dict[str, float] = {}  # ‖W‖_F of the adapted modules, for the record

    @property
    def rule(self) -> str:  # type: ignore[override]
        return self.ctx.method.cg.allocate

    @property
    def converts_on_export(self) -> bool:
        return self.ctx.method.cg.shift or super().converts_on_export

    def prepare(self, model: PreTrainedModel, calibration: DataLoader | None) -> PeftModel:
        settings = self.ctx.method.cg
        if calibration is None:
            raise ConfigError("method=cg_lora needs the calibration loader (calibration.num_samples > 0)")
        self.resolve(model)
        estimate_batches, holdout = self.split_calibration(calibration)
        cfg = self.curvature_settings("kfac")
        r_max = self.default_r_max(settings.r_max) if settings.allocate == "greedy" else self.budget.rank
        names = list(self.shapes)
        key = self.calibration_key(model, batches=[0, len(estimate_batches)] if holdout is not None else "all")
        curvature = self.estimate(model, estimate_batches, names, cfg, want_grad=True, sketch_rank=r_max, cache_key=key)
        spectra = self.spectra_of(curvature, names, r_max)
        self.ranks = self.allocate(spectra, r_max)
        steps = self.unit_steps(curvature, spectra)
        del curvature  # the factors are not needed in training
        peft_model = self.wrap(
            model, self.allocated_config(self.ranks), lambda m: self.initialise(m, steps, estimate_batches, holdout)
        )
        self.record = self.base_record(self.module_records(spectra, steps), settings)
        self.record.update(
            r_max=r_max, eta=self.eta, eta_model=self.eta_model, eta_search=self.eta_search,
            init="lora (no step lowered the held-out loss)" if self.eta == 0 else "curvature step",
        )
        return peft_model

    def split_calibration(self, calibration: DataLoader) -> tuple[Iterable[dict[str, Any]], BatchRange | None]:
        """(estimate batches, held-out batches for the η search or None when η is fixed)."""
        settings = self.ctx.method.cg
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
        settings = self.ctx.method.cg
        if settings.allocate == "uniform":
            return {name: min(self.budget.rank, *self.shapes[name]) for name in spectra}
        return self.greedy_ranks(spectra, settings.r_min, r_max, settings.score)

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
        self,
        peft_model: PeftModel,
        steps: Mapping[str, tuple[Tensor, Tensor]],
        estimate_batches: Iterable[dict[str, Any]],
        holdout: BatchRange | None,
    ) -> None:
        """Choose η (`choose_eta`), set ``(B₀, A₀) = √η (B₁, A₁)`` and shift W if asked; η = 0 keeps LoRA's init."""
        layers = lora_layers(peft_model)
        settings = self.ctx.method.cg
        self.weight_norms = {name: float(dequantize_module_weight(layer.base_layer).float().norm()) for name, layer in layers.items()}
        self.eta = float(settings.eta) if holdout is None else self.choose_eta(peft_model, layers, steps, estimate_batches, holdout)
        if self.eta == 0:
            return
        with torch.no_grad():
            for name, layer in layers.items():
                B, A = (math.sqrt(self.eta) * factor for factor in steps[name])
                set_adapter(layer, B, A)
                if settings.shift:
                    shift_base_weight(name, layer.base_layer.weight, layer.scaling[ADAPTER] * B @ A)

    def choose_eta(
        self,
        peft_model: PeftModel,
        layers: Mapping[str, nn.Module],
        steps: Mapping[str, tuple[Tensor, Tensor]],
        estimate_batches: Iterable[dict[str, Any]],
        holdout: BatchRange,
    ) -> float:
        """``η* · cg.eta_scale`` from the exact quadratic model along D, backtracked on the held-out batches.

        D is put into the adapters as ``A = A₁`` with B's tangent ``B₁`` at ``B = 0`` (``s B A`` is then
        linear in the tangent: ``ΔW = ε s B₁A₁ = ε D``). The candidates are η, η/4, η/16; the first whose
        held-out loss is below the pretrained model's (B = 0) wins; none: 0, and LoRA's init is restored.
        """
        initial = {name: tuple(p.detach().clone() for p in adapter_parameters(layer)) for name, layer in layers.items()}
        tangents = {}
        for name, layer in layers.items():
            B, A = adapter_parameters(layer)
            set_adapter(layer, torch.zeros_like(B), steps[name][1])
            tangents[PEFT_PREFIX + name + f".lora_B.{ADAPTER}.weight"] = steps[name][0].to(B.dtype)
        quadratic = directional_model(peft_model, estimate_batches, tangents)
        self.eta_model = {"slope": quadratic.slope, "curvature": quadratic.curvature, "eta_star": quadratic.minimiser}
        self.eta_search = {"0": mean_token_loss(peft_model, holdout)}  # B = 0: the pretrained model
        scaled = quadratic.minimiser * self.ctx.method.cg.eta_scale
        chosen = 0.0
        for eta in ([scaled, scaled / 4, scaled / 16] if math.isfinite(scaled) else []):
            for name, layer in layers.items():
                set_adapter(layer, *(math.sqrt(eta) * factor for factor in steps[name]))
            self.eta_search[repr(eta)] = mean_token_loss(peft_model, holdout)
            if self.eta_search[repr(eta)] < self.eta_search["0"]:
                chosen = eta
                break
        if chosen == 0:
            for name, layer in layers.items():
                set_adapter(layer, *initial[name])
            log.warning(
                "CG-LoRA: no step along the curvature direction lowered the held-out calibration loss (%s);"
                " the adapters keep LoRA's init (A random, B = 0)", self.eta_search,
            )
        return chosen

    def module_records(
        self, spectra: Mapping[str, WhitenedSpectrum], steps: Mapping[str, tuple[Tensor, Tensor]]
    ) -> dict[str, dict[str, Any]]:
        """Per module: the singular values of T up to its rank, their utilities, the K-FAC-modelled change,
        and ``‖s B₀A₀‖ / ‖W‖`` (Frobenius; ``‖sBA‖² = s² tr(BᵀB · AAᵀ)``, never an m×n product)."""
        records = {}
        for name, spectrum in spectra.items():
            rank = self.ranks[name]
            kept = [float(value) for value in spectrum.values[:rank]]
            records[name] = {
                "sigma": kept,
                "utility": sum(spectrum.utilities()[:rank]),
                "modelled_change": (-self.eta + 0.5 * self.eta**2) * sum(value**2 for value in kept),
            }
            if rank > 0:
                B, A = steps[name]
                update = self.eta * self.scaling_for(rank) * float(torch.trace((B.T @ B) @ (A @ A.T)).sqrt())
                records[name]["update_to_weight"] = update / self.weight_norms[name]
        return records
