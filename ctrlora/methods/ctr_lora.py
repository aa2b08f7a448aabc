"""CTR-LoRA (arXiv 2510.15962, docs/METHODS.md §6): curvature rank allocation plus a curvature trust region.

1. Allocation (step 0, frozen base): K-FAC factors and gradients (``curvature=kfac``, or the
   Kronecker fit of ``curvature=hutchinson``) on the calibration set; each target's rank units
   are worth ``u_{l,k} = ½ σ_{l,k}²`` of its whitened gradient (`lowrank`), and the greedy knapsack
   spends ``ρN`` parameters on them (``ctr.allocation: uniform`` gives r̄ everywhere). A module
   with rank 0 gets no adapter. Adapters start as in LoRA, or (``ctr.init: curvature``) at the
   curvature step scaled by ``ctr.init_scale``.
2. Trust region: ``L_task + λ(t) · ½ Σ_l ‖s_l (B_l A_l − B⁰_l A⁰_l)‖²_{M_l}`` with the damped
   raw Kronecker metric ``M_l = (T/N) S_g ⊗ S_a`` (``ctr.metric: fisher``: the K-FAC model of the
   training loss, so λ is dimensionless) or its unit-mean form (``normalized``), from r×r Gram
   matrices (`ctr_trust`, `trust_region`), λ annealed from ``ctr.lambda0``. The anchor ``B⁰A⁰`` is 0 except
   for inits that move the base weights (``ctr.compose: pissa``), where the displacement from the
   pretrained weight is ``s(BA − B⁰A⁰)``.
3. Refresh (`ctr_refresh`): every ``ctr.refresh_every`` steps the factors are re-estimated at the
   current weights (calibration set, or the training batches' own statistics), and with
   ``ctr.reallocate`` rank units move between adapted modules (grow/shrink, `adapter_resize`) when
   the greedy optimum beats the current utility by ``ctr.hysteresis``, until ``ctr.freeze_at``.

Every ablation of docs/METHODS.md §6.4 is a key: ``ctr.trust_region=false`` (λ = 0),
``ctr.allocation=uniform``, both (plain LoRA through this code path, no calibration pass),
``curvature=hutchinson``, ``ctr.lambda0``/``ctr.lambda_schedule``, ``ctr.compose=loraplus|dora|pissa``.
The refreshed factors, ranks and histories are in `state_dict`, so a resumed run continues exactly.

Data parallelism (DDP, FSDP2): `run.AdapterSetup` calls `prepare` inside `fit` with this rank's
shard of the calibration set (``shards_calibration``); every estimate all-reduces its sums, so the
factors, the allocation and the metric are those of the whole set on every rank. Under FSDP2 the
penalty gathers the sharded adapters (`trust_region.full_weight`) and a calibration refresh runs
through the root PEFT model. Re-allocation needs one process.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from peft import PeftModel
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from ctrlora.allocation import allocate_ranks, reallocate, total_utility
from ctrlora.config import TrainConfig
from ctrlora.curvature.lowrank import (
    EXACT_SVD_MAX_DIM,
    DampedPairs,
    WhitenedSpectrum,
    curvature_step_factors,
    damped_factors,
    whitened_spectra,
)
from ctrlora.curvature.objectives import tokens_per_loss_term
from ctrlora.curvature.online import TrainingStatistics
from ctrlora.curvature.result import CurvatureResult
from ctrlora.curvature.runtime import input_device, world_size
from ctrlora.errors import ConfigError
from ctrlora.methods.adapter_resize import replace_adapter, resize_adapters
from ctrlora.methods.allocating import AllocatingMethod
from ctrlora.methods.base import register_method
from ctrlora.methods.ctr_refresh import (
    REFRESHED_CURVATURE,
    CurvatureRefresh,
    RefreshSchedule,
    load_refreshed_curvature,
    save_refreshed_curvature,
)
from ctrlora.methods.ctr_trust import TrustRegion
from ctrlora.methods.settings import CtrSettings
from ctrlora.peft_layout import ADAPTER, PEFT_PREFIX, adapter_parameters, lora_layers, set_adapter
from ctrlora.process_ranks import is_rank_zero


def composed_config(cfg: TrainConfig) -> TrainConfig:
    """`ctr.compose` as the LoRA-family switches it stands for (DoRA, PiSSA init, LoRA+ ratio 16)."""
    method, compose = cfg.method, cfg.method.ctr.compose
    if compose == "dora":
        method = replace(method, use_dora=True)
    elif compose == "pissa":
        method = replace(method, init="pissa_niter_4")
    elif compose == "loraplus":
        method = replace(method, loraplus_ratio=method.loraplus_ratio or 16.0)
    return replace(cfg, method=method)


def without_gradient(curvature: CurvatureResult, names: list[str]) -> CurvatureResult:
    """The factors of `names` only (what a refresh file keeps; a shared ``a`` stays shared)."""
    return CurvatureResult(
        {name: replace(curvature[name], grad=None, grad_sketch=None) for name in names}, curvature.report
    )


@register_method("ctrlora")
class CtrLoraMethod(AllocatingMethod):
    shards_calibration = True  # every pass sums statistics across ranks: each rank may take its shard

    def __init__(self, cfg: TrainConfig, *, total_steps: int, run_dir: Path) -> None:
        super().__init__(composed_config(cfg), total_steps=total_steps, run_dir=run_dir)
        settings = self.settings
        if settings.init == "curvature" and (str(self.cfg.method.init) != "default" or self.cfg.method.use_dora):
            raise ConfigError(
                "method.ctr.init=curvature sets the adapters after PEFT's init: it cannot be combined with"
                f" method.init={self.cfg.method.init!r} or DoRA (use_dora={self.cfg.method.use_dora})"
            )
        if self.needs_curvature and self.cfg.curvature.kind == "activation":
            raise ConfigError("method=ctrlora needs gradients: use curvature=kfac or curvature=hutchinson")
        cfg = self.curvature_settings()
        self.schedule = RefreshSchedule(
            active=(settings.trust_region or settings.reallocate) and settings.refresh_every < total_steps,
            every=settings.refresh_every, window=settings.refresh_batches, total_steps=total_steps,
        )
        self.trust = TrustRegion(settings, total_steps, damping=cfg.damping, pi_split=cfg.pi_damping)
        self.layers: dict[str, nn.Module] = {}
        self.spectra: dict[str, WhitenedSpectrum] = {}
        self.training_statistics: TrainingStatistics | None = None
        self.last_refresh_step = 0
        self.refreshes: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []

    @property
    def settings(self) -> CtrSettings:
        return self.cfg.method.ctr

    @property
    def rule(self) -> str:  # type: ignore[override]
        return self.settings.allocation

    @property
    def needs_curvature(self) -> bool:
        """Uniform ranks, LoRA init, no trust region and no re-allocation need no calibration pass."""
        s = self.settings
        return s.allocation == "greedy" or s.trust_region or s.init == "curvature" or s.reallocate

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.needs_curvature

    @property
    def refreshes_during_training(self) -> bool:
        return self.schedule.active

    # --- step 0: curvature, allocation, adapters -------------------------------------------------

    def prepare(self, model: PreTrainedModel, calibration: DataLoader | None) -> PeftModel:
        """Curvature on `calibration` (under data parallelism this rank's shard: the sums are all-reduced),
        ranks, adapters, and the trust-region metric. The loader is kept for the refreshes."""
        settings = self.settings
        if settings.reallocate and self.refreshes_during_training and world_size() > 1:
            raise ConfigError(
                "method.ctr.reallocate=true changes parameter shapes mid-training, which data-parallel"
                " gradient buckets and FSDP shards cannot follow; run it in one process or set"
                " method.ctr.reallocate=false"
            )
        self.resolve(model)
        self.r_max = self.default_r_max(settings.r_max)
        names = list(self.shapes)
        curvature = None
        if self.needs_curvature:
            if calibration is None:
                raise ConfigError("method=ctrlora needs the calibration loader (calibration.num_samples > 0)")
            cfg = self.curvature_settings()
            want_grad = settings.allocation == "greedy" or settings.init == "curvature"
            curvature = self.estimate(
                model, calibration, names, cfg, want_grad=want_grad, sketch_rank=self.r_max,
                cache_key=self.calibration_key(model),
            )
            if want_grad:
                self.spectra = self.spectra_of(curvature, names)
        self.ranks = self.allocate()
        self.calibration = calibration
        if curvature is not None:
            self.trust.loss_scale = tokens_per_loss_term(calibration, input_device(model))
        self.peft_model = self.wrap(model, self.allocated_config(self.ranks), lambda m: self.initialise(m, curvature))
        self.layers = lora_layers(self.peft_model)
        self.trust.build(curvature, self.layers)
        if settings.refresh_source == "training" and self.refreshes_during_training:
            self.training_statistics = TrainingStatistics(  # K-FAC statistics whatever curvature.kind
                self.peft_model.get_base_model(), list(self.layers), self.curvature_settings("kfac"), settings.reallocate
            )
        self.update_record()
        return self.peft_model

    def spectra_of(self, curvature: CurvatureResult, names: list[str]) -> dict[str, WhitenedSpectrum]:
        """The top-``min(r_max, m, n)`` whitened-gradient spectrum of each of `names`: exact when m, n ≤
        4096, else randomized (``ctr.oversampling``, ``ctr.power_iters``; docs/METHODS.md §6.1)."""
        cfg, settings = self.curvature_settings(), self.settings
        ranks = {name: min(self.r_max, *self.shapes[name]) for name in names}
        return whitened_spectra(
            curvature.modules, ranks, damping=cfg.damping, pi_split=cfg.pi_damping,
            oversampling=settings.oversampling, power_iters=settings.power_iters, seed=cfg.seed,
            exact_max_dim=EXACT_SVD_MAX_DIM,
        )

    def allocate(self) -> dict[str, int]:
        settings = self.settings
        if settings.allocation == "uniform":
            return allocate_ranks(
                dict.fromkeys(self.shapes, 0.0), None, self.budget.rank, settings.r_min, self.r_max, "uniform"
            )
        utilities = {name: spectrum.utilities() for name, spectrum in self.spectra.items()}
        return allocate_ranks(
            utilities, self.costs, self.budget.allowed_params, settings.r_min, self.r_max, "greedy", settings.score
        )

    def initialise(self, peft_model: PeftModel, curvature: CurvatureResult | None) -> None:
        """``ctr.init: curvature`` factors, and the anchors of inits that move the base weights."""
        cfg = self.curvature_settings()
        pairs = DampedPairs(cfg.damping, cfg.pi_damping)
        for name, layer in lora_layers(peft_model).items():
            if self.settings.init == "curvature":
                a, g = pairs(curvature[name])
                scaling = layer.scaling[ADAPTER]
                set_adapter(layer, *curvature_step_factors(
                    self.spectra[name], a, g, self.ranks[name], self.settings.init_scale, scaling
                ))
            if self.converts_on_export:
                self.trust.anchor(name, layer)

    # --- the trust region (ctr_trust) -----------------------------------------------------------

    def extra_loss(self, model: PeftModel, step: int) -> Tensor | None:
        return self.trust.loss(self.layers, step)

    def step_metrics(self) -> dict[str, float | Tensor]:
        return self.trust.step_metrics()

    # --- refresh and re-allocation --------------------------------------------------------------

    def callbacks(self) -> list[L.Callback]:
        return [CurvatureRefresh(self)] if self.refreshes_during_training else []

    def refresh(self, trainer: L.Trainer) -> None:
        """Re-estimate the factors at the current weights; re-allocate before the freeze point."""
        step, settings = trainer.global_step, self.settings
        start = time.perf_counter()
        moving = settings.reallocate and step < settings.freeze_at * self.total_steps
        if self.training_statistics is not None:
            result = self.training_statistics.result()
        else:
            result = self.estimate_at_current_weights(want_grad=moving)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        changes = self.reallocate_ranks(result, optimizer, step) if moving else {}
        self.trust.build(result, self.layers)
        self.refreshes.append({
            "step": step, "source": settings.refresh_source, "seconds": time.perf_counter() - start,
            "tokens": result.report.tokens, "changes": changes,
        })
        self.last_refresh_step = step
        if is_rank_zero():
            save_refreshed_curvature(
                without_gradient(result, list(self.layers)), self.run_dir / REFRESHED_CURVATURE.format(step=step)
            )

    def estimate_at_current_weights(self, *, want_grad: bool) -> CurvatureResult:
        """The adapted modules' factors on (this rank's shard of) the calibration set, by base-model name.

        The passes go through the PEFT model itself, the root module: under FSDP2 its hooks gather
        the weights outside the decoder layers (embeddings, head), which calling the inner base model
        would skip.
        """
        names = list(self.layers)
        targets = [PEFT_PREFIX + name for name in names]
        result = self.estimate(
            self.peft_model, self.calibration, targets, self.curvature_settings(), want_grad=want_grad,
            sketch_rank=self.r_max, label="refresh",
        )
        return CurvatureResult({name: result[PEFT_PREFIX + name] for name in names}, result.report)

    def reallocate_ranks(
        self, curvature: CurvatureResult, optimizer: torch.optim.Optimizer | None, step: int
    ) -> dict[str, list[int]]:
        """Greedy re-allocation among the adapted modules (ranks ≥ 1) with hysteresis; applies it."""
        settings, cfg = self.settings, self.curvature_settings()
        current = {name: self.ranks[name] for name in self.layers}
        utilities = {}
        spectra = self.spectra_of(curvature, list(self.layers))
        for name in self.layers:
            values = spectra[name].utilities()
            utilities[name] = values + [0.0] * max(0, current[name] - len(values))
        costs = {name: self.costs[name] for name in self.layers}
        target = reallocate(
            current, utilities, costs, self.budget.allowed_params, max(1, settings.r_min), self.r_max,
            settings.hysteresis, settings.score,
        )
        changes = {name: [current[name], rank] for name, rank in target.items() if rank != current[name]}
        resize_adapters(
            self.layers, changes, self.peft_model.peft_config[ADAPTER], self.alpha_for,
            lambda name: damped_factors(curvature[name], cfg.damping, cfg.pi_damping), optimizer,
        )
        self.ranks.update({name: rank for name, (_, rank) in changes.items()})
        if changes:
            self.history.append({
                "step": step, "changes": changes,
                "utility_before": total_utility(current, utilities), "utility_after": total_utility(target, utilities),
            })
            self.update_record()
        return changes

    # --- records and resume ---------------------------------------------------------------------

    def update_record(self) -> None:
        modules = {}
        for name, spectrum in self.spectra.items():
            utilities = spectrum.utilities()
            modules[name] = {"utility": sum(utilities[: self.ranks[name]]), "utilities": utilities}
        self.record = self.base_record(modules, self.settings)
        self.record.update(r_max=self.r_max, compose=self.settings.compose, reallocations=self.history)
        self.write_record()

    def curvature_summary(self) -> dict[str, Any]:
        summary = super().curvature_summary()
        summary.update(refreshes=self.refreshes, refresh_s=sum(refresh["seconds"] for refresh in self.refreshes))
        return summary

    def state_dict(self) -> dict[str, Any]:
        """Ranks, where the factors in use are (once refreshed), the refresh/re-allocation histories, and a
        training-statistics window in progress: everything a resumed run needs to continue exactly."""
        return {
            "ranks": dict(self.ranks),
            "curvature_file": REFRESHED_CURVATURE.format(step=self.last_refresh_step) if self.refreshes else None,
            "refreshes": self.refreshes,
            "history": self.history,
            "last_refresh_step": self.last_refresh_step,
            "curvature_reports": self.curvature_reports,
            "training_statistics": self.training_statistics and self.training_statistics.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore after `prepare`, before the checkpoint's weights load (so shapes are resized first)."""
        if not state:
            return
        changed = {name: rank for name, rank in state["ranks"].items() if rank != self.ranks[name]}
        if changed and state["curvature_file"] is None:
            raise ConfigError(
                f"the checkpoint's ranks differ from this run's step-0 allocation ({sorted(changed)[:3]}...) though"
                " no refresh re-allocated them: it was calibrated differently (calibration.*, curvature.*, budget.*)"
            )
        config = self.peft_model.peft_config[ADAPTER]
        for name, rank in changed.items():
            layer = self.layers[name]
            B, A = adapter_parameters(layer)
            replace_adapter(layer, name, config, B.new_zeros(B.shape[0], rank), A.new_zeros(rank, A.shape[1]),
                            self.alpha_for(rank))
            self.ranks[name] = rank
        if state["curvature_file"] is not None and self.settings.trust_region:  # the metric of the last refresh
            self.trust.build(load_refreshed_curvature(self.run_dir / state["curvature_file"]), self.layers)
        self.refreshes, self.history = list(state["refreshes"]), list(state["history"])
        self.last_refresh_step = state["last_refresh_step"]
        resumed = [{**report, "label": f"{report['label']} (resume)"} for report in self.curvature_reports]
        self.curvature_reports = list(state["curvature_reports"]) + resumed
        if state["training_statistics"] is not None and self.training_statistics is not None:
            self.training_statistics.load_state_dict(state["training_statistics"])
        self.update_record()
