"""One run, top to bottom (DESIGN §4): config -> backbone -> data -> method -> fit -> save -> report."""

from __future__ import annotations

import json
import logging
import shutil
import time
from datetime import datetime, timezone
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from ctrlora import report
from ctrlora.backbones import load_backbone, load_tokenizer
from ctrlora.config import TrainConfig, validate_config
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.errors import RunDirError
from ctrlora.lit import FinetuneModule, RunStats
from ctrlora.methods.base import Method, build_method
from ctrlora.trainers import build_loggers, build_trainer

log = logging.getLogger(__name__)
OUTPUTS = ("adapter", "checkpoints", "results.json", "summary.md", "metrics.csv", "allocation.json")


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """Create the run dir; return (path, finished). A finished run is never overwritten silently."""
    run_dir = Path(cfg.run_dir)
    finished = (run_dir / "results.json").exists()
    if finished and cfg.overwrite:
        for name in OUTPUTS:
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        finished = False
    elif finished and not cfg.resume:
        raise RunDirError(
            f"run_dir={run_dir} already holds a finished run (results.json). Pass overwrite=true to"
            " replace it, or choose another run_dir."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, finished


@dataclass
class RunParts:
    """Everything one run trains with, assembled but not yet fitted."""

    tokenizer: PreTrainedTokenizerBase
    datamodule: FinetuneDataModule
    method: Method
    model: PeftModel
    module: FinetuneModule
    stats: RunStats
    trainer: L.Trainer


def assemble(cfg: TrainConfig, run_dir: Path) -> RunParts:
    """Seed, then build tokenizer, data, backbone, method (ranks, adapters) and the Trainer."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(cfg.model)
    datamodule = FinetuneDataModule(
        cfg.data, tokenizer, task=cfg.model.task, seed=cfg.seed, calibration=cfg.calibration, base_dir=Path.cwd()
    )
    datamodule.setup("fit")
    num_labels = len(datamodule.label_names) if cfg.model.task == "sequence_classification" else None
    backbone = load_backbone(
        cfg.model, accelerator=cfg.trainer.accelerator, quantize_4bit=cfg.method.quantize_4bit,
        num_labels=num_labels,
    )
    total_steps = cfg.trainer.max_steps
    method = build_method(cfg, total_steps=total_steps, run_dir=run_dir)
    calibration = datamodule.calibration_dataloader() if method.needs_calibration else None
    model = method.prepare(backbone, calibration)
    module = FinetuneModule(model, method, cfg.optim, total_steps)
    stats = RunStats()
    loggers = build_loggers(cfg.logger, run_dir, report.run_name(cfg), asdict(cfg))
    trainer = build_trainer(cfg.trainer, loggers, [stats, *method.callbacks()], run_dir)
    return RunParts(tokenizer, datamodule, method, model, module, stats, trainer)


def train(composed: DictConfig) -> dict[str, Any]:
    """Fine-tune, save the adapter, evaluate, and write results.json; returns the results."""
    started_at, start = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    validate_config(composed)
    cfg: TrainConfig = OmegaConf.to_object(composed)
    run_dir, finished = prepare_run_dir(cfg)
    if finished:
        log.info("run_dir=%s is already finished; nothing to resume", run_dir)
        return json.loads((run_dir / "results.json").read_text())
    OmegaConf.save(composed, run_dir / "config.yaml", resolve=True)
    previous_metrics = report.set_aside_metrics(run_dir) if cfg.resume else None
    run = assemble(cfg, run_dir)
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path="last" if cfg.resume else None)
    if run.trainer.interrupted:
        raise KeyboardInterrupt(f"training interrupted; resume with resume=true run_dir={run_dir}")
    if not run.trainer.is_global_zero:
        return {}
    if previous_metrics is not None:
        report.merge_resumed_metrics(run_dir, previous_metrics, run.module.resumed_from_step)

    report.save_adapter(run.method, run.model, run.tokenizer, run_dir / "adapter")
    results = report.build_results(
        cfg, method=run.method, model=run.model, stats=run.stats, trainer=run.trainer,
        started_at=started_at, wall_s=time.perf_counter() - start,
    )
    report.write_outputs(run_dir, results)
    return results
