"""CTR-LoRA's refresher (docs/METHODS.md §6.3): what happens at each refresh step, and its resumable state.

At a refresh the factors of the adapted modules are re-estimated at the current weights (on the
calibration set through the PEFT model, or from the training batches' own statistics), the
trust-region metric is rebuilt from them, and before ``ctr.freeze_at`` (with ``ctr.reallocate``)
rank units move between adapted modules when the greedy optimum beats the current utility by
``ctr.hysteresis`` (`allocation.reallocate`, applied by `adapter_resize.resize_adapters`). The
refresher satisfies `ctr_refresh.Refreshing`, so `ctr_refresh.CurvatureRefresh` drives it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from peft import PeftModel
from torch import nn

from ctrlora.allocation import reallocate, total_utility
from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.lowrank import WhitenedSpectrum, damped_factors
from ctrlora.curvature.online import TrainingStatistics
from ctrlora.curvature.result import CurvatureResult
from ctrlora.errors import ConfigError
from ctrlora.methods.adapter_resize import replace_adapter, resize_adapters
from ctrlora.methods.base import Budget
from ctrlora.methods.ctr_refresh import (
    REFRESHED_CURVATURE,
    RefreshSchedule,
    load_refreshed_curvature,
    save_refreshed_curvature,
)
from ctrlora.methods.ctr_trust import TrustRegion
from ctrlora.methods.settings import CtrSettings
from ctrlora.peft_layout import ADAPTER, PEFT_PREFIX, adapter_parameters
from ctrlora.process_ranks import is_rank_zero


class RefreshedMethod(Protocol):
    """What the refresher reads and changes on its method (`CtrLoraMethod`)."""

    settings: CtrSettings
    budget: Budget
    run_dir: Path
    peft_model: PeftModel
    layers: dict[str, nn.Module]
    ranks: dict[str, int]
    costs: dict[str, int]
    r_max: int
    calibration: Any
    trust: TrustRegion

    def curvature_settings(self, kind: str | None = None) -> CurvatureConfig: ...

    def estimate(self, model: nn.Module, batches: Any, targets: list[str], cfg: CurvatureConfig, **kwargs: Any) -> CurvatureResult: ...

    def adapted_spectra(self, curvature: CurvatureResult, names: list[str]) -> dict[str, WhitenedSpectrum]: ...

    def alpha_for(self, rank: int) -> float: ...


def without_gradient(curvature: CurvatureResult, names: list[str]) -> CurvatureResult:
    """The factors of `names` only (what a refresh file keeps; a shared ``a`` stays shared)."""
    return CurvatureResult(
        {name: replace(curvature[name], grad=None, grad_sketch=None) for name in names}, curvature.report
    )


class CtrRefresher:
    """Refreshes the curvature of `method` on `schedule`; keeps the refresh and re-allocation histories."""

    def __init__(self, method: RefreshedMethod, schedule: RefreshSchedule, total_steps: int) -> None:
        self.method, self.schedule, self.total_steps = method, schedule, total_steps
        self.training_statistics: TrainingStatistics | None = None
        self.last_refresh_step = 0
        self.refreshes: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []

    def watch_training(self, base_model: nn.Module, names: list[str]) -> None:
        """``ctr.refresh_source: training``: record K-FAC statistics of `names` from the training batches."""
        settings = self.method.settings
        self.training_statistics = TrainingStatistics(
            base_model, names, self.method.curvature_settings("kfac"), settings.reallocate
        )

    def refresh(self, trainer: L.Trainer) -> None:
        """Re-estimate the factors at the current weights; re-allocate before the freeze point."""
        method, step = self.method, trainer.global_step
        start = time.perf_counter()
        moving = method.settings.reallocate and step < method.settings.freeze_at * self.total_steps
        method.trust.release()
        if self.training_statistics is not None:
            result = self.training_statistics.result()
        else:
            result = self.estimate_at_current_weights(want_grad=moving)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        changes = self.reallocate_ranks(result, optimizer, step) if moving else {}
        method.trust.build(result, method.layers)
        self.refreshes.append({
            "step": step, "source": method.settings.refresh_source, "seconds": time.perf_counter() - start,
            "tokens": result.report.tokens, "changes": changes,
        })
        self.last_refresh_step = step
        if is_rank_zero():
            save_refreshed_curvature(
                without_gradient(result, list(method.layers)), method.run_dir / REFRESHED_CURVATURE.format(step=step)
            )

    def estimate_at_current_weights(self, *, want_grad: bool) -> CurvatureResult:
        """The adapted modules' factors on (this rank's shard of) the calibration set, by base-model name.

        The passes go through the PEFT model itself, the root module: under FSDP2 its hooks gather
        the weights outside the decoder layers (embeddings, head), which calling the inner base model
        would skip.
        """
        method = self.method
        names = list(method.layers)
        result = method.estimate(
            method.peft_model, method.calibration, [PEFT_PREFIX + name for name in names],
            method.curvature_settings(), want_grad=want_grad, sketch_rank=method.r_max, label="refresh",
        )
        return CurvatureResult({name: result[PEFT_PREFIX + name] for name in names}, result.report)

    def reallocate_ranks(
        self, curvature: CurvatureResult, optimizer: torch.optim.Optimizer | None, step: int
    ) -> dict[str, list[int]]:
        """Greedy re-allocation among the adapted modules (ranks ≥ 1) with hysteresis; applies it."""
        method = self.method
        settings, cfg = method.settings, method.curvature_settings()
        current = {name: method.ranks[name] for name in method.layers}
        spectra = method.adapted_spectra(curvature, list(method.layers))
        utilities = {}
        for name in method.layers:
            values = spectra[name].utilities()
            utilities[name] = values + [0.0] * max(0, current[name] - len(values))
        target = reallocate(
            current, utilities, {name: method.costs[name] for name in method.layers}, method.budget.allowed_params,
            max(1, settings.r_min), method.r_max, settings.hysteresis, settings.score,
        )
        changes = {name: [current[name], rank] for name, rank in target.items() if rank != current[name]}
        resize_adapters(
            method.layers, changes, method.peft_model.peft_config[ADAPTER], method.alpha_for,
            lambda name: damped_factors(curvature[name], cfg.damping, cfg.pi_damping), optimizer,
        )
        method.ranks.update({name: rank for name, (_, rank) in changes.items()})
        if changes:
            self.history.append({
                "step": step, "changes": changes,
                "utility_before": total_utility(current, utilities), "utility_after": total_utility(target, utilities),
            })
        return changes

    def state_dict(self) -> dict[str, Any]:
        """Where the factors in use are (once refreshed), the histories, and a training-statistics window
        in progress."""
        return {
            "curvature_file": REFRESHED_CURVATURE.format(step=self.last_refresh_step) if self.refreshes else None,
            "refreshes": self.refreshes,
            "history": self.history,
            "last_refresh_step": self.last_refresh_step,
            "training_statistics": self.training_statistics and self.training_statistics.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], ranks: dict[str, int]) -> None:
        """Resize the adapters to the checkpoint's `ranks` (before its weights load), restore the metric of the
        last refresh and the histories."""
        method = self.method
        changed = {name: rank for name, rank in ranks.items() if rank != method.ranks[name]}
        if changed and state["curvature_file"] is None:
            raise ConfigError(
                f"the checkpoint's ranks differ from this run's step-0 allocation ({sorted(changed)[:3]}...) though"
                " no refresh re-allocated them: it was calibrated differently (calibration.*, curvature.*, budget.*)"
            )
        config = method.peft_model.peft_config[ADAPTER]
        for name, rank in changed.items():
            layer = method.layers[name]
            B, A = adapter_parameters(layer)
            replace_adapter(layer, name, config, B.new_zeros(B.shape[0], rank), A.new_zeros(rank, A.shape[1]),
                            method.alpha_for(rank))
            method.ranks[name] = rank
        if state["curvature_file"] is not None and method.settings.trust_region:
            method.trust.build(load_refreshed_curvature(method.run_dir / state["curvature_file"]), method.layers)
        self.refreshes, self.history = list(state["refreshes"]), list(state["history"])
        self.last_refresh_step = state["last_refresh_step"]
        if state["training_statistics"] is not None and self.training_statistics is not None:
            self.training_statistics.load_state_dict(state["training_statistics"])
