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

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import lightning as L
from peft import PeftModel
from torch import Tensor
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from ctrlora.curvature.lowrank import DampedPairs, WhitenedSpectrum, curvature_step_factors
from ctrlora.curvature.objectives import tokens_per_loss_term
from ctrlora.curvature.result import CurvatureResult
from ctrlora.curvature.runtime import input_device, world_size
from ctrlora.errors import ConfigError
from ctrlora.methods.allocating import AllocatingMethod
from ctrlora.methods.base import MethodContext, register_method
from ctrlora.methods.ctr_refresh import CurvatureRefresh, RefreshSchedule
from ctrlora.methods.ctr_refresher import CtrRefresher
from ctrlora.methods.ctr_trust import TrustRegion
from ctrlora.methods.settings import CtrSettings
from ctrlora.peft_layout import ADAPTER, lora_layers, set_adapter


def composed_context(ctx: MethodContext) -> MethodContext:
    """`ctr.compose` as the LoRA-family switches it stands for (DoRA, PiSSA init, LoRA+ ratio 16)."""
    method, compose = ctx.method, ctx.method.ctr.compose
    if compose == "dora":
        method = replace(method, use_dora=True)
    elif compose == "pissa":
        method = replace(method, init="pissa_niter_4")
    elif compose == "loraplus":
        method = replace(method, loraplus_ratio=method.loraplus_ratio or 16.0)
    return replace(ctx, method=method)


@register_method("ctrlora")
class CtrLoraMethod(AllocatingMethod):
    shards_calibration = True  # every pass sums statistics across ranks: each rank may take its shard

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(composed_context(ctx))
        settings, method = self.settings, self.ctx.method
        if settings.init == "curvature" and (str(method.init) != "default" or method.use_dora):
            raise ConfigError(
                "method.ctr.init=curvature sets the adapters after PEFT's init: it cannot be combined with"
                f" method.init={method.init!r} or DoRA (use_dora={method.use_dora})"
            )
        if self.needs_curvature and self.ctx.curvature.kind == "activation":
            raise ConfigError("method=ctrlora needs gradients: use curvature=kfac or curvature=hutchinson")
        schedule = RefreshSchedule(
            active=(settings.trust_region or settings.reallocate) and settings.refresh_every < self.total_steps,
            every=settings.refresh_every, window=settings.refresh_batches, total_steps=self.total_steps,
        )
        cfg = self.ctx.curvature
        self.trust = TrustRegion(settings, self.total_steps, damping=cfg.damping, pi_split=cfg.pi_damping)
        self.refresher = CtrRefresher(self, schedule, self.total_steps)
        self.utilities: dict[str, list[float]] = {}  # u_k = ½σ_k² per target (the singular vectors are not kept)

    @property
    def settings(self) -> CtrSettings:
        return self.ctx.method.ctr

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

    def prepare(self, model: PreTrainedModel, calibration: DataLoader | None) -> PeftModel:
        """Curvature on `calibration` (under data parallelism this rank's shard: the sums are all-reduced),
        ranks, adapters, and the trust-region metric. The loader is kept for the refreshes."""
        settings, refreshing = self.settings, self.refresher.schedule.active
        if settings.reallocate and refreshing and world_size() > 1:
            raise ConfigError(
                "method.ctr.reallocate=true changes parameter shapes mid-training, which data-parallel"
                " gradient buckets and FSDP shards cannot follow; run it in one process or set"
                " method.ctr.reallocate=false"
            )
        self.resolve(model)
        self.r_max = self.default_r_max(settings.r_max)
        names = list(self.shapes)
        curvature, spectra = None, {}
        if self.needs_curvature:
            if calibration is None:
                raise ConfigError("method=ctrlora needs the calibration loader (calibration.num_samples > 0)")
            want_grad = settings.allocation == "greedy" or settings.init == "curvature"
            curvature = self.estimate(
                model, calibration, names, self.curvature_settings(), want_grad=want_grad, sketch_rank=self.r_max,
                cache_key=self.calibration_key(model),
            )
            self.trust.loss_scale = tokens_per_loss_term(calibration, input_device(model))
            if want_grad:
                spectra = self.adapted_spectra(curvature, names)
                self.utilities = {name: spectrum.utilities() for name, spectrum in spectra.items()}
        if settings.allocation == "uniform":
            self.ranks = {name: min(max(self.budget.rank, settings.r_min), self.r_max) for name in names}
        else:
            self.ranks = self.greedy_ranks(spectra, settings.r_min, self.r_max, settings.score)
        self.calibration = calibration
        # the singular vectors (m + n) × r_max per target serve the initialisation only: not held in training
        self.peft_model = self.wrap(
            model, self.allocated_config(self.ranks), lambda m: self.initialise(m, curvature, spectra)
        )
        self.layers = lora_layers(self.peft_model)
        self.trust.build(curvature, self.layers)
        if settings.refresh_source == "training" and refreshing:
            self.refresher.watch_training(self.peft_model.get_base_model(), list(self.layers))
        return self.peft_model

    def adapted_spectra(self, curvature: CurvatureResult, names: list[str]) -> dict[str, WhitenedSpectrum]:
        """Whitened-gradient spectra up to ``r_max`` (randomized: ``ctr.oversampling``, ``ctr.power_iters``)."""
        settings = self.settings
        return self.spectra_of(
            curvature, names, self.r_max, oversampling=settings.oversampling, power_iters=settings.power_iters
        )

    def initialise(
        self, peft_model: PeftModel, curvature: CurvatureResult | None, spectra: Mapping[str, WhitenedSpectrum]
    ) -> None:
        """``ctr.init: curvature`` factors (from `spectra`), and the anchors of inits that move the base weights."""
        cfg = self.curvature_settings()
        pairs = DampedPairs(cfg.damping, cfg.pi_damping)
        for name, layer in lora_layers(peft_model).items():
            if self.settings.init == "curvature":
                a, g = pairs(curvature[name])
                set_adapter(layer, *curvature_step_factors(
                    spectra[name], a, g, self.ranks[name], self.settings.init_scale, layer.scaling[ADAPTER]
                ))
            if self.converts_on_export:
                self.trust.anchor(name, layer)

    def extra_loss(self, model: PeftModel, step: int) -> Tensor | None:
        return self.trust.loss(self.layers, step)

    def step_metrics(self) -> dict[str, float | Tensor]:
        return self.trust.step_metrics()

    def callbacks(self) -> list[L.Callback]:
        return [CurvatureRefresh(self.refresher)] if self.refresher.schedule.active else []

    def allocation_record(self) -> dict[str, Any]:
        """allocation.json at the current ranks: utilities per module, r_max, compose and the re-allocations."""
        modules = {}
        for name, utilities in self.utilities.items():
            modules[name] = {"utility": sum(utilities[: self.ranks[name]]), "utilities": utilities}
        record = self.base_record(modules, self.settings)
        record.update(r_max=self.r_max, compose=self.settings.compose, reallocations=self.refresher.history)
        return record

    def curvature_summary(self) -> dict[str, Any]:
        summary = super().curvature_summary()
        refreshes = self.refresher.refreshes
        summary.update(refreshes=refreshes, refresh_s=sum(refresh["seconds"] for refresh in refreshes))
        return summary

    def state_dict(self) -> dict[str, Any]:
        """Ranks, the estimates so far and the refresher's state: what a resumed run needs to continue exactly."""
        return {"ranks": dict(self.ranks), "curvature_reports": self.curvature_reports, **self.refresher.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore after `prepare`, before the checkpoint's weights load (so shapes are resized first)."""
        if not state:
            return
        self.refresher.load_state_dict(state, state["ranks"])
        resumed = [{**report, "label": f"{report['label']} (resume)"} for report in self.curvature_reports]
        self.curvature_reports = list(state["curvature_reports"]) + resumed
