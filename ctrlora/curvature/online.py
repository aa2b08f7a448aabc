"""K-FAC statistics of the training batches themselves (docs/METHODS.md §6.3, ``ctr.refresh_source:
training``): no extra forward or backward, only outer products of what the hooks see.

Over the non-padding positions p (P of them, T counted tokens; counts and sums over all ranks) of
the recorded micro-batches:

    S_a = (1/P) Σ_p x_p x_pᵀ,   S_g = (1/T) Σ_p g_p g_pᵀ,   G = (1/T) Σ_p g_p x_pᵀ,

with the token rules of the ``kfac`` estimator. The caller gives each micro-batch the scale that
turns the hooked output gradient into the per-token ``g_p`` of the summed loss (the training loss is
a mean, see `ctrlora.methods.ctr_refresh.loss_items`).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor, nn

from ctrlora.curvature.activation import input_factors
from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.factors import stored_factor
from ctrlora.curvature.hooks import TargetRecorder
from ctrlora.curvature.memory import GB, dense_grad_bytes, plan_storage, resolve_grad_mode, target_shapes
from ctrlora.curvature.objectives import objective_for
from ctrlora.curvature.passes import CrossProductSums, OuterProductSums
from ctrlora.curvature.result import CurvatureReport, CurvatureResult, ModuleCurvature
from ctrlora.curvature.runtime import accumulation_dtype, all_reduce_count, input_device
from ctrlora.errors import ConfigError


class TrainingStatistics:
    """K-FAC factors (and G) accumulated from hooked training micro-batches."""

    def __init__(self, model: nn.Module, names: list[str], cfg: CurvatureConfig, want_grad: bool) -> None:
        self.model, self.names, self.cfg, self.want_grad = model, names, cfg, want_grad
        modules = {name: model.get_submodule(name) for name in names}
        self.dtype = accumulation_dtype(modules.values())
        shapes, element_bytes = target_shapes(model, names), torch.finfo(self.dtype).bits // 8
        if want_grad and resolve_grad_mode(cfg, shapes, element_bytes).grad_mode == "sketch":
            size = dense_grad_bytes(shapes, element_bytes) / GB
            raise ConfigError(
                f"ctr.refresh_source=training with ctr.reallocate=true sums every target's dense gradient over"
                f" the training window ({size:.1f} GB here), above curvature.dense_grad_max_gb="
                f"{cfg.dense_grad_max_gb}; the window has no passes to sketch it. Use ctr.refresh_source=calibration"
                " (its passes sketch G), ctr.reallocate=false, or a larger curvature.dense_grad_max_gb"
            )
        self.recorder = TargetRecorder(
            modules, on_input=self._on_input, on_output_grad=self._on_output_grad, stash_inputs=want_grad
        )
        self.clear()
        self._hooks = ExitStack()
        self._phase = ExitStack()
        self.recording = False

    def clear(self) -> None:
        self.inputs, self.grads = OuterProductSums(self.dtype), OuterProductSums(self.dtype)
        self.cross = CrossProductSums(self.dtype)
        self.tokens = self.positions = 0
        self.scale = 1.0

    def start_forward(self, batch: dict[str, Tensor], scale: float) -> None:
        """Hook the targets for the coming forward of `batch` (its output gradients scaled by `scale`)."""
        if not self.recording:
            self._hooks.enter_context(self.recorder)
            self.recording = True
        objective = objective_for(batch)
        mask = objective.position_mask(batch)
        self.tokens += int(objective.token_mask(batch).sum())
        self.positions += int(mask.sum())
        self.scale = scale
        self._phase.close()
        self._phase.enter_context(self.recorder.forward(mask))

    def start_backward(self) -> None:
        self._phase.close()
        self._phase.enter_context(self.recorder.backward("labels"))

    def end_backward(self) -> None:
        self._phase.close()

    def stop(self) -> None:
        """Remove the hooks (between windows and before a calibration pass)."""
        self._phase.close()
        self._hooks.close()
        self.recording = False

    def _on_input(self, name: str, rows: Tensor) -> None:
        self.inputs.add(name, rows)

    def _on_output_grad(self, name: str, grad: Tensor, inputs: Tensor | None, job: str) -> None:
        grad = grad.to(self.dtype) * self.scale
        self.grads.add(name, self.recorder.token_rows(name, grad))
        if self.want_grad:
            self.cross.add(name, grad.reshape(-1, grad.shape[-1]), inputs.reshape(-1, inputs.shape[-1]))

    def result(self) -> CurvatureResult:
        """The factors of the window so far (raw, like an estimate), then cleared."""
        self.stop()
        device = input_device(self.model)
        tokens, positions = all_reduce_count(self.tokens, device), all_reduce_count(self.positions, device)
        if tokens == 0:
            raise RuntimeError("no training tokens were recorded before the curvature refresh")
        plan = plan_storage(target_shapes(self.model, self.names), self.cfg, want_grad=self.want_grad)
        a_factors = input_factors(self.inputs.means(positions), self.recorder, plan)
        g_moments = self.grads.means(tokens)
        gradients = self.cross.means(tokens) if self.want_grad else {}
        modules = {
            name: ModuleCurvature(
                a=a_factors[name], g=stored_factor(g_moments[name], plan.module(name).g.rank),
                grad=gradients.get(name), tokens=tokens,
            )
            for name in self.names
        }
        report = CurvatureReport(kind="kfac", tokens=tokens, settings={"source": "training"})
        self.clear()
        return CurvatureResult(modules, report)

    def state_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs.sums, "grads": self.grads.sums, "cross": self.cross.sums,
            "tokens": self.tokens, "positions": self.positions, "input_alias": dict(self.recorder.input_alias),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inputs.sums, self.grads.sums, self.cross.sums = state["inputs"], state["grads"], state["cross"]
        self.tokens, self.positions = state["tokens"], state["positions"]
        self.recorder.input_alias = dict(state["input_alias"])
