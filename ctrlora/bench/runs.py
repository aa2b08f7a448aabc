"""The bench's runs: each method through the code users run (`run.assemble` + `Trainer.fit`), and
the LoRA run's steps in a bare PyTorch + PEFT loop, for the framework's overhead."""

from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ctrlora import report
from ctrlora.bench.probes import IterationClock, MemoryProbe, StepClock, counted_flops, release_memory
from ctrlora.config import TrainConfig
from ctrlora.curvature.runtime import batch_to_device
from ctrlora.errors import ConfigError
from ctrlora.run import assemble

AUTOCAST = {"32-true": None, "32": None, "bf16-mixed": torch.bfloat16}


def run_device(cfg: TrainConfig) -> torch.device:
    """Where the run trains: the first GPU for `trainer.accelerator=gpu`, else the CPU."""
    return torch.device("cuda", 0) if cfg.trainer.accelerator in ("gpu", "cuda") else torch.device("cpu")


def load_average() -> float | None:
    """The 1-minute load average (how busy the machine was), None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def measure_method(cfg: TrainConfig, warmup: int, steps: int, probe: MemoryProbe) -> dict[str, Any]:
    """Assemble and fit one run as `train.py` would (without evaluation); time each loop iteration.

    Returns the set-up time (backbone, data, calibration, allocation, adapters), the step-time
    summary of the `steps` steps after `warmup`, tokens per step and per second, the peak memory of
    set-up and of training (a curvature refresh included) above the process at rest, the logged
    losses, and the run's own `results.json` sections (`run`, `train`, `allocation`).
    """
    release_memory()
    load_before = load_average()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    probe.start()
    start = time.perf_counter()
    run = assemble(cfg, Path(cfg.run_dir))
    setup_s = time.perf_counter() - start
    release_memory()  # what set-up freed goes back, so the training peak is training's own
    setup_peak = probe.peak()
    clock = StepClock(run_device(cfg))
    run.trainer.callbacks.append(clock)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    train_peak = probe.peak()
    results = report.build_results(
        cfg, method=run.method, model=run.model, stats=run.stats, trainer=run.trainer,
        started_at=started_at, wall_s=time.perf_counter() - start,
    )
    train = results["train"]
    timing = clock.clock.summary(warmup, steps)
    tokens_per_step = train["tokens"] / train["steps"]
    return {
        "setup_s": setup_s,
        "step_time": timing,
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / timing["median_s"],
        "peak_memory_bytes": {"setup": setup_peak, "train": train_peak, "run": max(setup_peak, train_peak)},
        "memory_source": probe.source,
        "num_examples": run.datamodule.stats.num_examples,
        "calibration_examples": min(cfg.calibration.num_samples, run.datamodule.stats.num_examples),
        "losses": list(run.stats.losses),
        "load_average": [load_before, load_average()],
        "results": {key: results[key] for key in ("run", "train", "allocation") if key in results},
    }


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast that Lightning's `precision` applies around the forward pass."""
    if precision not in AUTOCAST:
        raise ConfigError(
            f"trainer.precision={precision!r} has no bare-loop equivalent in the bench;"
            f" valid: {', '.join(AUTOCAST)}"
        )
    dtype = AUTOCAST[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def bare_lora_steps(cfg: TrainConfig, warmup: int, steps: int, probe: MemoryProbe) -> dict[str, Any]:
    """The steps of `measure_method(cfg)` without Lightning: forward, backward, gradient clipping,
    AdamW and the learning-rate schedule in a plain loop.

    The model, data and optimizer come from the same `assemble` (same seed, so the same adapter
    initialisation, batches and dropout masks) and `FinetuneModule.configure_optimizers`; only the
    loop differs. Losses stay on the device until the end, as a lean loop keeps them.
    """
    release_memory()
    probe.start()
    run = assemble(cfg, Path(cfg.run_dir))
    device = run_device(cfg)
    model = run.model.to(device)
    optimizers = run.module.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    clock = IterationClock(device)
    batches = iter(run.datamodule.train_dataloader())
    losses = []
    for step in range(cfg.trainer.max_steps):
        clock.mark(step)
        batch = batch_to_device(next(batches), device)
        loss = step_loss(model, batch, cfg.trainer.precision, device)
        plain_update(loss, parameters, optimizer, scheduler, cfg.trainer.gradient_clip_val)
        losses.append(loss.detach())
    timing, peak = clock.summary(warmup, steps), probe.peak()
    # counted after the timed steps, on the last batch again (packed: every batch has the same shape)
    step_flops = counted_flops(lambda: step_loss(model, batch, cfg.trainer.precision, device).backward())
    optimizer.zero_grad(set_to_none=True)
    return {
        "step_time": timing,
        "step_flops": step_flops,
        "peak_memory_bytes": peak,
        "losses": [float(loss) for loss in losses],
    }


def step_loss(model: torch.nn.Module, batch: dict[str, Any], precision: str, device: torch.device) -> torch.Tensor:
    """The training loss of `batch` under the run's autocast."""
    with autocast(precision, device):
        return model(**batch).loss


def plain_update(loss: torch.Tensor, parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                 scheduler: Any, clip: float | None) -> None:
    """A hand-written loop's update: backward, gradient-norm clipping at `clip`, the optimizer's step,
    the schedule's step, gradients cleared."""
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(parameters, clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
