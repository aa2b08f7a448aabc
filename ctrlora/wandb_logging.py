"""The end-of-run record of a W&B run (`logger=wandb`): allocation, spectra, plots, evaluation.

During training Lightning's `WandbLogger` already records the config, `train/loss`, the learning
rates (`lr-AdamW*`) and the method's scalars (`method/*`, e.g. CTR-LoRA's λ and trust-region
penalty). `log_run_summary`, called once results.json is written, adds what only exists at the end:

    allocation/ranks        table module | rank | params | d_out | d_in   (from allocation.json)
    allocation/rank_heatmap image rank_heatmap.png
    curvature/spectra       table module | k | sigma  (allocation.json's per-module singular values)
    train/loss_curve        image loss_curve.png
    eval/results            table task | metric | value | stderr | base  (results.json `eval`)
    summary                 eval/<task>/<metric>, train/*, budget/*

then finishes the run. Every item is also readable without W&B: the files in the run dir.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, WandbLogger

from ctrlora.evaluation.sections import task_rows
from ctrlora.methods.base import ALLOCATION_FILE, HEATMAP_FILE

IMAGES = {"allocation/rank_heatmap": HEATMAP_FILE, "train/loss_curve": "loss_curve.png"}
SPECTRUM_KEYS = ("sigma", "singular_values", "spectrum")
TRAIN_SUMMARY_KEYS = ("steps", "tokens", "tokens_per_s", "final_loss", "peak_memory_bytes")


def ranks_rows(allocation: Mapping[str, Any]) -> list[list[Any]]:
    """One row per target module: name, rank, adapter parameters, d_out, d_in."""
    rows = []
    for name, record in allocation.get("modules", {}).items():
        d_out, d_in = (record.get("shape") or [None, None])[:2]
        rows.append([name, record.get("rank"), record.get("params"), d_out, d_in])
    return rows


def spectra_rows(allocation: Mapping[str, Any]) -> list[list[Any]]:
    """(module, k, σ_k) for every module whose record carries a spectrum."""
    rows = []
    for name, record in allocation.get("modules", {}).items():
        values = next((record[key] for key in SPECTRUM_KEYS if isinstance(record.get(key), list)), [])
        rows.extend([name, k, float(value)] for k, value in enumerate(values))
    return rows


def eval_rows(section: Mapping[str, Any]) -> list[list[Any]]:
    """(task, metric, value, stderr, base value) for every metric of the `eval` section."""
    base = section.get("base", {})
    rows = []
    for task, metrics in task_rows(dict(section)).items():
        for metric, entry in metrics.items():
            reference = base.get(task, {}).get(metric, {})
            rows.append([task, metric, entry.get("value"), entry.get("stderr"), reference.get("value")])
    return rows


def summary_values(results: Mapping[str, Any]) -> dict[str, Any]:
    """Scalars for the run summary: train metrics, budget, and each eval metric."""
    train = results.get("train", {})
    values: dict[str, Any] = {f"train/{key}": train[key] for key in TRAIN_SUMMARY_KEYS if key in train}
    budget = results.get("run", {}).get("budget", {})
    values.update(
        {f"budget/{key}": value for key, value in budget.items() if isinstance(value, (int, float))}
    )
    for task, metric, value, _, _ in eval_rows(results.get("eval", {})):
        values[f"eval/{task}/{metric}"] = value
    return values


def log_run_summary(loggers: Sequence[Logger], run_dir: Path, results: Mapping[str, Any]) -> None:
    """Log the end-of-run tables, images and summary to the run's W&B logger, then finish the run.

    Does nothing when no `WandbLogger` is among `loggers` (`logger=csv|tensorboard`). Call on rank 0
    after results.json is written.
    """
    wandb_logger = next((logger for logger in loggers if isinstance(logger, WandbLogger)), None)
    if wandb_logger is None:
        return
    import wandb

    run = wandb_logger.experiment
    payload: dict[str, Any] = {}
    allocation_path = run_dir / ALLOCATION_FILE
    if allocation_path.exists():
        allocation = json.loads(allocation_path.read_text())
        payload["allocation/ranks"] = wandb.Table(
            columns=["module", "rank", "params", "d_out", "d_in"], data=ranks_rows(allocation)
        )
        spectra = spectra_rows(allocation)
        if spectra:
            payload["curvature/spectra"] = wandb.Table(columns=["module", "k", "sigma"], data=spectra)
    for key, name in IMAGES.items():
        if (run_dir / name).exists():
            payload[key] = wandb.Image(str(run_dir / name))
    evaluation = eval_rows(results.get("eval", {}))
    if evaluation:
        payload["eval/results"] = wandb.Table(
            columns=["task", "metric", "value", "stderr", "base"], data=evaluation
        )
    if payload:
        run.log(payload)
    run.summary.update(summary_values(results))
    run.finish()
