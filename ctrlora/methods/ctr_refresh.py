"""CTR-LoRA's curvature refresh during training (docs/METHODS.md §6.3).

`CurvatureRefresh` (a Lightning callback) calls ``method.refresh(trainer)`` right after the optimizer
step whose index is a multiple of ``ctr.refresh_every`` (and below the last step), once per step
whatever the gradient accumulation. With ``ctr.refresh_source: training`` it also feeds
`TrainingStatistics` from the training micro-batches of the ``ctr.refresh_batches`` optimizer
steps before each refresh:

    S_a = (1/P) Σ_p x_p x_pᵀ,   S_g = (1/T) Σ_p g_p g_pᵀ,   G = (1/T) Σ_p g_p x_pᵀ,

over the non-padding positions p (P of them, T counted tokens; counts and sums over all ranks) of
those batches (the same token rules and per-token gradient scale as the ``kfac`` estimator): no extra forward or backward, only outer
products of what the hooks see. The training loss is a mean over the batch's loss items D (HF's causal-LM loss divides by
the supervised-token count; under DDP by the all-rank count over the world size) and Lightning
divides it by the accumulation steps, so the hooked output gradient is multiplied by
``D × accumulate_grad_batches`` to give the per-token ``g_t`` of the summed loss. The trust-region
term adds no output gradient (it acts on A and B directly).

Refreshed factors are written once per refresh to ``checkpoints/curvature/`` and checkpoints
refer to the file, so frequent checkpoints of a large model stay small.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor, nn

from ctrlora.atomic import staged
from ctrlora.curvature.activation import input_factors
from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.factors import stored_factor
from ctrlora.curvature.hooks import TargetRecorder
from ctrlora.curvature.memory import plan_storage, target_shapes
from ctrlora.curvature.objectives import objective_for
from ctrlora.curvature.passes import OuterProductSums
from ctrlora.curvature.result import CurvatureReport, CurvatureResult, ModuleCurvature
from ctrlora.curvature.runtime import accumulation_dtype, all_reduce_count, input_device

if TYPE_CHECKING:
    from ctrlora.methods.ctr_lora import CtrLoraMethod


REFRESHED_CURVATURE = "checkpoints/curvature/refresh-{step:07d}.pt"  # relative to the run dir


def save_refreshed_curvature(curvature: CurvatureResult, path: Path, keep: int = 2) -> None:
    """Write refreshed factors once per refresh; checkpoints refer to the file, so they stay small
    however often they are written. The `keep` newest files of the folder are kept, so a checkpoint
    written before the latest refresh still finds the factors it used."""
    with staged(path) as partial:
        torch.save(curvature.state_dict(), partial)
    for stale in sorted(path.parent.glob("refresh-*.pt"))[:-keep]:
        stale.unlink()


def load_refreshed_curvature(path: Path) -> CurvatureResult:
    if not path.exists():
        raise FileNotFoundError(f"the checkpoint's refreshed curvature {path} is missing; resume from a newer checkpoint")
    return CurvatureResult.from_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def loss_items(batch: dict[str, Tensor], trainer: L.Trainer) -> float:
    """D, the number the training loss of `batch` was divided by (see the module docstring)."""
    labels = batch["labels"]
    if labels.dim() == 1:
        return float(labels.shape[0])
    tokens = (labels[:, 1:] != -100).sum().float()
    if trainer.world_size == 1:
        return float(tokens)
    return float(trainer.strategy.reduce(tokens, reduce_op="sum")) / trainer.world_size


class TrainingStatistics:
    """K-FAC factors (and G) accumulated from hooked training micro-batches."""

    def __init__(self, model: nn.Module, names: list[str], cfg: CurvatureConfig, want_grad: bool) -> None:
        self.model, self.names, self.cfg, self.want_grad = model, names, cfg, want_grad
        modules = {name: model.get_submodule(name) for name in names}
        self.dtype = accumulation_dtype(modules.values())
        self.recorder = TargetRecorder(
            modules, on_input=self._on_input, on_output_grad=self._on_output_grad, stash_inputs=want_grad
        )
        self.clear()
        self._hooks = ExitStack()
        self._phase = ExitStack()
        self.recording = False

    def clear(self) -> None:
        self.inputs, self.grads, self.cross = (OuterProductSums(self.dtype) for _ in range(3))
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
        self.inputs.add_outer(name, rows)

    def _on_output_grad(self, name: str, grad: Tensor, inputs: Tensor | None, job: str) -> None:
        grad = grad.to(self.dtype) * self.scale
        self.grads.add_outer(name, self.recorder.token_rows(name, grad))
        if self.want_grad:
            self.cross.add_cross(name, grad.reshape(-1, grad.shape[-1]), inputs.reshape(-1, inputs.shape[-1]))

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


class CurvatureRefresh(L.Callback):
    """Runs CTR-LoRA's refresh schedule (and the training-source statistics) inside the fit loop."""

    def __init__(self, method: CtrLoraMethod) -> None:
        self.method = method

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *_: Any) -> None:
        statistics = self.method.training_statistics
        if statistics is not None and self.method.collects_for(trainer.global_step + 1):
            statistics.start_forward(batch, loss_items(batch, trainer) * trainer.accumulate_grad_batches)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        statistics = self.method.training_statistics
        if statistics is not None and statistics.recording:
            statistics.start_backward()

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        statistics = self.method.training_statistics
        if statistics is not None and statistics.recording:
            statistics.end_backward()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if self.method.is_refresh_step(step) and step > self.method.last_refresh_step:
            self.method.refresh(trainer)
