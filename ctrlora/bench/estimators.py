"""The estimator table (issue 3): each curvature estimator's time per calibration batch on the bench
model, through `estimate_curvature` as the curvature-aware methods call it (frozen backbone, the
run's calibration batches, every target projection).

Each estimator runs twice, on 1 batch and on n: the difference over n − 1 is the time of one more
batch (its passes and statistics), the rest the fixed cost (hooks, factor storage, the final
eigendecompositions). Wall clock and the main thread's CPU time are both kept: on a shared CPU the
CPU time is the steadier (the bench runs torch on one thread). A third, untimed estimate on one
batch counts its matrix products' FLOPs (`counted_flops`), set against a LoRA step's: where the time
ratio is close to the FLOP ratio, the pass is as fast as its arithmetic allows.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ctrlora.backbones import load_backbone, load_tokenizer
from ctrlora.bench.config import EstimatorSpec
from ctrlora.bench.probes import MemoryProbe, counted_flops, release_memory
from ctrlora.bench.runs import run_device
from ctrlora.config import TrainConfig
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.curvature.runtime import batch_to_device
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.methods.base import target_linears


def time_estimators(
    train_config: Callable[[list[str]], TrainConfig], specs: dict[str, EstimatorSpec], num_batches: int,
    probe: MemoryProbe,
) -> dict[str, dict[str, Any]]:
    """``{estimator: timing}`` over the first calibration batches (`spec.batches`, else `num_batches`).

    `train_config(overrides)` composes the bench run's `conf/train.yaml` with extra overrides; each
    spec's overrides select its `curvature=` settings. Per batch = the estimate's own `estimate_s`
    (its `CurvatureReport`) over the batches, set-up of hooks and factors included.
    """
    if not specs:
        return {}
    cfg = train_config([])
    L.seed_everything(cfg.seed, verbose=False)
    tokenizer = load_tokenizer(cfg.model)
    datamodule = FinetuneDataModule(
        cfg.data, tokenizer, task=cfg.model.task, seed=cfg.seed, calibration=cfg.calibration,
        base_dir=Path.cwd(),
    )
    datamodule.setup("fit")
    backbone = load_backbone(cfg.model, accelerator=cfg.trainer.accelerator).to(run_device(cfg))
    most = max(spec.batches or num_batches for spec in specs.values())
    all_batches = list(islice(datamodule.calibration_dataloader(), most))
    targets = list(target_linears(backbone, list(cfg.model.target_modules)))
    with torch.no_grad():  # warm-up, so the first estimator does not pay the backbone's first forward
        backbone(**batch_to_device(all_batches[0], run_device(cfg)))
    rows = {}
    for name, spec in specs.items():
        curvature = train_config(list(spec.overrides)).curvature
        batches = all_batches[: spec.batches or num_batches]
        release_memory()
        probe.start()
        estimate = partial(
            estimate_curvature, backbone, targets=targets, cfg=curvature, want_grad=spec.want_grad,
            sketch_rank=spec.sketch_rank, progress=False,
        )
        one = timed(partial(estimate, batches[:1]))
        every = timed(partial(estimate, batches)) if len(batches) > 1 else one
        peak = probe.peak()
        flops = counted_flops(partial(estimate, batches[:1]))
        rows[name] = {
            "want_grad": spec.want_grad,
            "batches": len(batches),
            "tokens_per_batch": sum(int(batch["attention_mask"].sum()) for batch in batches) / len(batches),
            **marginal_and_fixed(one, every, len(batches)),
            "flops_one_batch": flops,
            "calibration_batches": -(-cfg.calibration.num_samples // cfg.calibration.batch_size),
            "peak_memory_bytes": peak,
            "settings": asdict(curvature),
        }
    return rows


def timed(work: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, main-thread CPU seconds) of `work()`."""
    wall, cpu = time.perf_counter(), time.thread_time()
    work()
    return time.perf_counter() - wall, time.thread_time() - cpu


def marginal_and_fixed(one: tuple[float, float], every: tuple[float, float], count: int) -> dict[str, float | None]:
    """Per batch ``(t_n − t_1)/(n − 1)`` and fixed ``t_1 − per batch``, wall and CPU; with n = 1 the one
    estimate's time is the per-batch time and the fixed cost is unknown (None)."""
    row: dict[str, float | None] = {}
    for index, clock in enumerate(("", "cpu_")):
        per_batch = (every[index] - one[index]) / (count - 1) if count > 1 else one[index]
        row[f"{clock}per_batch_s"] = per_batch
        row[f"{clock}fixed_s"] = one[index] - per_batch if count > 1 else None
    return row
