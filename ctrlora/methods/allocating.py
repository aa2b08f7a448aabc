"""What the curvature-aware methods share: calibration estimates, whitened spectra and the greedy
allocation on them, per-module ranks in a stock `LoraConfig`, and the allocation record (the content
of `allocation.json`, which `report.write_allocation` writes with `rank_heatmap.png`).

Unequal ranks go into PEFT as ``rank_pattern`` and ``alpha_pattern`` keyed by the full module
names (docs/METHODS.md §1). The scaling rule fixes ``α_l`` so that PEFT's ``α_l / r_l`` is the intended
scale: ``constant`` ``s = α/r̄`` (``α_l = α r_l / r̄``), ``rslora`` ``s = α/√r_l``
(``α_l = α √r_l``) or ``standard`` ``s = α/r_l`` (``α_l = α``). rsLoRA is expressed through
``alpha_pattern`` rather than ``use_rslora`` so the PiSSA-style export conversion, which doubles
``r`` and ``α`` together, keeps every module's scale. A module with rank 0 gets no adapter: it is
left out of ``target_modules``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, replace
from itertools import islice
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from ctrlora.allocation import allocate_ranks, allocation_params
from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.curvature.lowrank import EXACT_SVD_MAX_DIM, WhitenedSpectrum, whitened_spectra
from ctrlora.curvature.result import CurvatureResult
from ctrlora.errors import ConfigError
from ctrlora.methods.base import (
    ALLOCATION_FILE,
    HEATMAP_FILE,
    Budget,
    MethodContext,
    resolve_budget,
    target_linears,
    to_float32_trainables,
)
from ctrlora.methods.lora_family import LoraMethod

SCALINGS = ("constant", "rslora", "standard")


class BatchRange:
    """Batches ``start:stop`` of a re-iterable loader, itself re-iterable (for multi-pass estimates)."""

    def __init__(self, batches: Iterable[dict[str, Any]], start: int, stop: int) -> None:
        self.batches, self.start, self.stop = batches, start, stop

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return islice(iter(self.batches), self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start


class AllocatingMethod(LoraMethod):
    """A LoRA method whose ranks (and possibly initial adapters) come from calibration curvature."""

    rule: str = "uniform"  # the allocation rule recorded in allocation.json

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if ctx.method.scaling not in SCALINGS:
            raise ConfigError(f"method.scaling={ctx.method.scaling!r} is not valid; choose one of {list(SCALINGS)}")
        if ctx.method.rslora:
            raise ConfigError(
                f"method.rslora=true does not apply to method={ctx.method.name} (ranks differ per module);"
                " use method.scaling=rslora"
            )
        self.shapes: dict[str, tuple[int, int]] = {}
        self.ranks: dict[str, int] = {}
        self.curvature_reports: list[dict[str, Any]] = []
        self.record: dict[str, Any] = {}

    # --- budget and ranks ---------------------------------------------------------------------

    def resolve(self, model: nn.Module) -> Budget:
        """Resolve the budget and the target shapes name -> (d_out, d_in)."""
        targets = list(self.ctx.model.target_modules)
        self.budget = resolve_budget(self.ctx.budget, model, targets)
        self.shapes = target_linears(model, targets)
        return self.budget

    def default_r_max(self, r_max: int | None) -> int:
        """``r_max`` or ``max(r̄, min(64, 4 r̄))`` when unset."""
        rank = self.budget.rank
        return r_max if r_max is not None else max(rank, min(64, 4 * rank))

    @property
    def costs(self) -> dict[str, int]:
        """Parameters of one rank unit per module, ``n_l + m_l``."""
        return {name: d_out + d_in for name, (d_out, d_in) in self.shapes.items()}

    def alpha_for(self, rank: int) -> float:
        """``α_l`` that makes PEFT's ``α_l / r_l`` follow `method.scaling` (module docstring)."""
        alpha, scaling = self.ctx.method.alpha, self.ctx.method.scaling
        if scaling == "constant":
            return alpha * rank / self.budget.rank
        if scaling == "rslora":
            return alpha * math.sqrt(rank)
        return alpha

    def scaling_for(self, rank: int) -> float:
        return self.alpha_for(rank) / rank

    def allocated_config(self, ranks: Mapping[str, int]) -> LoraConfig:
        """The stock `LoraConfig`: full names of the modules with rank > 0, their ranks and alphas."""
        active = {name: rank for name, rank in ranks.items() if rank > 0}
        if not active:
            raise ConfigError("the allocation gave every target rank 0: raise budget.rank / budget.ratio")
        return self.lora_config(
            self.budget.rank,
            target_modules=list(active),
            rank_pattern=dict(active),
            alpha_pattern={name: self.alpha_for(rank) for name, rank in active.items()},
            use_rslora=False,
        )

    def wrap(
        self, model: nn.Module, config: LoraConfig, initialise: Callable[[PeftModel], None] | None = None
    ) -> PeftModel:
        """`get_peft_model` as the LoRA family does it (4-bit preparation, fp32 adapters), then the
        method's own `initialise`, then — when the init moves the base weights — the initial
        adapter saved for the export conversion."""
        if self.ctx.method.quantize_4bit:
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=self.ctx.model.gradient_checkpointing
            )
        peft_model = get_peft_model(model, config)
        to_float32_trainables(peft_model)
        if initialise is not None:
            initialise(peft_model)
        if self.converts_on_export:
            self._save_initial_adapter(peft_model)
        return peft_model

    # --- curvature ------------------------------------------------------------------------------

    def curvature_settings(self, kind: str | None = None) -> CurvatureConfig:
        """The run's `curvature=` settings, with the estimator kind forced when a method needs one."""
        cfg = self.ctx.curvature
        return cfg if kind is None or kind == cfg.kind else replace(cfg, kind=kind)

    def estimate(
        self,
        model: nn.Module,
        batches: Iterable[dict[str, Any]],
        targets: list[str],
        cfg: CurvatureConfig,
        *,
        want_grad: bool = False,
        sketch_rank: int | None = None,
        cache_key: dict[str, Any] | None = None,
        label: str = "initial",
    ) -> CurvatureResult:
        """`estimate_curvature` on the calibration batches; its report is kept for results.json.

        ``cache_key``: for estimates of the pretrained weights only — what identifies the batches
        beyond `calibration_key` (e.g. a held-out split); with ``curvature.cache_dir`` set, a
        matching earlier estimate is loaded. None (mid-training refreshes) never uses the cache.
        """
        result = estimate_curvature(
            model, batches, targets, cfg, want_grad=want_grad, sketch_rank=sketch_rank,
            progress=self.ctx.progress_bar, cache_key=cache_key,
        )
        self.curvature_reports.append({"label": label, **result.report.to_dict()})
        return result

    def calibration_key(self, model: nn.Module, **batches: Any) -> dict[str, Any]:
        """What an estimate of the pretrained `model` depends on besides the estimator settings."""
        config = getattr(model, "config", None)
        return {
            **batches,
            "model": getattr(config, "_name_or_path", None) or self.ctx.model.name,
            "dtype": str(next(model.parameters()).dtype),
            **self.ctx.calibration_source,
        }

    def spectra_of(
        self, curvature: CurvatureResult, names: list[str], r_max: int, *, oversampling: int = 10, power_iters: int = 2
    ) -> dict[str, WhitenedSpectrum]:
        """The top-``min(r_max, m, n)`` spectrum of each of `names`' whitened gradient: exact when m, n ≤
        4096, else randomized with `oversampling` and `power_iters` (docs/METHODS.md §5, §6.1)."""
        cfg = self.curvature_settings()
        return whitened_spectra(
            {name: curvature[name] for name in names}, {name: min(r_max, *self.shapes[name]) for name in names},
            damping=cfg.damping, pi_split=cfg.pi_damping, oversampling=oversampling, power_iters=power_iters,
            seed=cfg.seed, exact_max_dim=EXACT_SVD_MAX_DIM,
        )

    def greedy_ranks(
        self, spectra: Mapping[str, WhitenedSpectrum], r_min: int, r_max: int, score: str
    ) -> dict[str, int]:
        """The greedy knapsack on the rank units' utilities ``u = ½σ²`` under the budget ρN."""
        utilities = {name: spectrum.utilities() for name, spectrum in spectra.items()}
        return allocate_ranks(utilities, self.costs, self.budget.allowed_params, r_min, r_max, "greedy", score)

    # --- the allocation record ------------------------------------------------------------------

    def base_record(self, modules: Mapping[str, Mapping[str, Any]], settings: Any) -> dict[str, Any]:
        """allocation.json: per-module rank/params (+ method scores), budget used vs allowed, settings."""
        used = allocation_params(self.ranks, self.costs)
        return {
            "method": self.name,
            "rule": self.rule,
            "scaling": self.ctx.method.scaling,
            "alpha": self.ctx.method.alpha,
            "budget": {
                "rank": self.budget.rank,
                "ratio": self.budget.ratio,
                "backbone_params": self.budget.backbone_params,
                "allowed_params": self.budget.allowed_params,
                "used_params": used,
                "uniform_params": self.budget.target_params,
                "rank_total": sum(self.ranks.values()),
                "modules_adapted": sum(1 for rank in self.ranks.values() if rank > 0),
                "modules_total": len(self.ranks),
            },
            "modules": {
                name: {
                    "rank": self.ranks[name],
                    "shape": list(self.shapes[name]),
                    "params": self.ranks[name] * self.costs[name],
                    "scaling": self.scaling_for(self.ranks[name]) if self.ranks[name] else None,
                    **modules.get(name, {}),
                }
                for name in self.shapes
            },
            "settings": asdict(settings) if settings is not None else {},
            "curvature_settings": asdict(self.ctx.curvature),
        }

    def allocation_record(self) -> dict[str, Any]:
        """What `prepare` recorded (`base_record` plus the method's own entries)."""
        return self.record

    def allocation_summary(self) -> dict[str, Any]:
        """The `allocation` section of results.json."""
        record = self.allocation_record()
        return {
            "rule": record.get("rule"),
            "file": ALLOCATION_FILE,
            "heatmap": HEATMAP_FILE,
            "budget": record.get("budget"),
            "ranks": dict(self.ranks),
        }

    def curvature_summary(self) -> dict[str, Any]:
        """The `train.curvature` section of results.json: each estimate's report (time, memory, tokens)."""
        initial = [report for report in self.curvature_reports if report["label"] != "refresh"]
        return {
            "estimates": self.curvature_reports,
            "calibration_s": sum(report["estimate_s"] for report in initial),
        }

