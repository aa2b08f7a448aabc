"""CTR-LoRA's curvature refresh during training (docs/METHODS.md §6.3).

`CurvatureRefresh` (a Lightning callback) calls ``method.refresh(trainer)`` right after the optimizer
step whose index is a multiple of ``ctr.refresh_every`` (and below the last step), once per step
whatever the gradient accumulation. With ``ctr.refresh_source: training`` it also feeds
`ctrlora.curvature.online.TrainingStatistics` from the training micro-batches of the
``ctr.refresh_batches`` optimizer steps before each refresh. The training loss is a mean over the
batch's loss items D (HF's causal-LM loss divides by the supervised-token count; under DDP by the
all-rank count over the world size) and Lightning divides it by the accumulation steps, so the hooked output gradient is multiplied by
``D × accumulate_grad_batches`` to give the per-token ``g_t`` of the summed loss. The trust-region
term adds no output gradient (it acts on A and B directly).

Refreshed factors are written once per refresh to ``checkpoints/curvature/`` and checkpoints
refer to the file, so frequent checkpoints of a large model stay small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor

from ctrlora.atomic import staged
from ctrlora.curvature.online import TrainingStatistics
from ctrlora.curvature.result import CurvatureResult
from ctrlora.curvature.runtime import return_freed_host_memory


@dataclass(frozen=True)
class RefreshSchedule:
    """Refresh after every ``every``-th optimizer step below ``total_steps`` (when ``active``); with
    training statistics, record the ``window`` optimizer steps before each refresh."""

    active: bool
    every: int
    window: int
    total_steps: int

    def is_refresh_step(self, step: int) -> bool:
        return self.active and 0 < step < self.total_steps and step % self.every == 0

    def collects_for(self, step: int) -> bool:
        """Whether optimizer step `step` (1-based) lies in the training-statistics window of a refresh."""
        upcoming = math.ceil(step / self.every) * self.every
        return upcoming < self.total_steps and upcoming - step < self.window


class Refreshing(Protocol):
    """What `CurvatureRefresh` drives: a method that refreshes its curvature on a `RefreshSchedule`."""

    schedule: RefreshSchedule
    training_statistics: TrainingStatistics | None
    last_refresh_step: int

    def refresh(self, trainer: L.Trainer) -> None: ...


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


class CurvatureRefresh(L.Callback):
    """Runs CTR-LoRA's refresh schedule (and the training-source statistics) inside the fit loop."""

    def __init__(self, method: Refreshing) -> None:
        self.method = method

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *_: Any) -> None:
        statistics = self.method.training_statistics
        if statistics is not None and self.method.schedule.collects_for(trainer.global_step + 1):
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
        if self.method.schedule.is_refresh_step(step) and step > self.method.last_refresh_step:
            self.method.refresh(trainer)
            return_freed_host_memory()  # the refresh's passes and the replaced metric, before training goes on
