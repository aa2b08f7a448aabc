"""The estimator table (issue 3): each curvature estimator's time per calibration batch on the bench
model, through `estimate_curvature` as the curvature-aware methods call it (frozen backbone, the
run's calibration batches, every target projection)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ctrlora.backbones import load_backbone, load_tokenizer
from ctrlora.bench.config import EstimatorSpec
from ctrlora.bench.probes import MemoryProbe, release_memory
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
        result = estimate_curvature(
            backbone, batches, targets, curvature, want_grad=spec.want_grad, progress=False
        )
        rows[name] = {
            "want_grad": spec.want_grad,
            "batches": len(batches),
            "tokens_per_batch": sum(int(batch["attention_mask"].sum()) for batch in batches) / len(batches),
            "estimate_s": result.report.estimate_s,
            "per_batch_s": result.report.estimate_s / len(batches),
            "peak_memory_bytes": probe.peak(),
            "settings": asdict(curvature),
        }
        del result
    return rows
