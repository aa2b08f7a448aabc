"""One run, top to bottom (DESIGN §4): config -> backbone -> data -> method -> fit -> save -> report."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from ctrlora import report
from ctrlora.backbones import load_backbone, load_tokenizer
from ctrlora.checkpoints import latest_checkpoint
from ctrlora.config import TrainConfig, validate_config
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.errors import RunDirError
from ctrlora.evaluation.base_row import backbone_key
from ctrlora.evaluation.classification import classifier_eval_section
from ctrlora.evaluation.suite import evaluate_model
from ctrlora.fsdp import evaluation_model, gather_adapter_state
from ctrlora.lit import FinetuneModule, RunStats
from ctrlora.methods.base import Method, build_method
from ctrlora.ranks import adopt_submitit_ranks, is_rank_zero
from ctrlora.trainers import build_loggers, build_trainer
from ctrlora.wandb_logging import log_run_summary

log = logging.getLogger(__name__)
OUTPUTS = (
    "adapter", "checkpoints", "results.json", "summary.md", "metrics.csv", "allocation.json", "rank_heatmap.png",
    "loss_curve.png",
)


def prepare_run_dir(cfg: TrainConfig) -> tuple[Path, bool]:
    """Create the run dir; return (path, finished). Neither a finished run nor the checkpoints of a
    killed one are overwritten or restarted silently; files are deleted by rank 0 only."""
    run_dir = Path(cfg.run_dir)
    finished = (run_dir / "results.json").exists()
    unfinished = not finished and latest_checkpoint(run_dir / "checkpoints") is not None
    if cfg.overwrite and (finished or unfinished):
        for name in OUTPUTS if is_rank_zero() else ():
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        finished = False
    elif finished and not cfg.resume:
        raise RunDirError(
            f"run_dir={run_dir} already holds a finished run (results.json). Pass overwrite=true to"
            " replace it, or choose another run_dir."
        )
    elif unfinished and not cfg.resume:
        raise RunDirError(
            f"run_dir={run_dir} holds checkpoints of an unfinished run. Pass resume=true to continue it,"
            " or overwrite=true to start again."
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


def evaluate_run(cfg: TrainConfig, run: RunParts) -> dict[str, Any]:
    """The `eval` section: the suite through lm-eval on the in-memory model (its base row cached),
    or accuracy / macro-F1 / MCC on the test split for a sequence classifier."""
    num_labels = len(run.datamodule.label_names) if cfg.model.task == "sequence_classification" else None
    model = evaluation_model(  # under FSDP: the backbone + the saved adapter (the sharded model needs all ranks)
        run.model, Path(cfg.run_dir) / "adapter",
        lambda: load_backbone(cfg.model, accelerator=cfg.trainer.accelerator,
                              quantize_4bit=cfg.method.quantize_4bit, num_labels=num_labels),
    )
    if cfg.model.task == "sequence_classification":
        return classifier_eval_section(model, run.datamodule, cfg.eval.batch_size)
    return evaluate_model(
        model, run.tokenizer, cfg.eval,
        base_model_key=backbone_key(cfg.model, accelerator=cfg.trainer.accelerator,
                                    quantize_4bit=cfg.method.quantize_4bit),
        base_model=lambda: load_backbone(cfg.model, accelerator=cfg.trainer.accelerator,
                                         quantize_4bit=cfg.method.quantize_4bit),
    )


def train(composed: DictConfig) -> dict[str, Any]:
    """Fine-tune, save the adapter, evaluate, and write results.json; returns the results."""
    started_at, start = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.perf_counter()
    adopt_submitit_ranks()
    validate_config(composed)
    cfg: TrainConfig = OmegaConf.to_object(composed)
    run_dir, finished = prepare_run_dir(cfg)
    if finished:
        log.info("run_dir=%s is already finished; nothing to resume", run_dir)
        return json.loads((run_dir / "results.json").read_text())
    if is_rank_zero():
        OmegaConf.save(composed, run_dir / "config.yaml", resolve=True)
    previous_metrics = report.set_aside_metrics(run_dir) if cfg.resume and is_rank_zero() else None
    run = assemble(cfg, run_dir)
    checkpoint = latest_checkpoint(run_dir / "checkpoints") if cfg.resume else None
    run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=checkpoint)
    if run.trainer.interrupted:
        raise KeyboardInterrupt(f"training interrupted; resume with resume=true run_dir={run_dir}")
    adapter_state = gather_adapter_state(run.model)  # FSDP: a collective on every rank; else None
    if not run.trainer.is_global_zero:
        return {}
    if previous_metrics is not None:
        report.merge_resumed_metrics(run_dir, previous_metrics, run.module.resumed_from_step)

    report.save_adapter(run.method, run.model, run.tokenizer, run_dir / "adapter", adapter_state)
    results = report.build_results(
        cfg, method=run.method, model=run.model, stats=run.stats, trainer=run.trainer,
        started_at=started_at, wall_s=time.perf_counter() - start,
    )
    results["eval"] = evaluate_run(cfg, run)
    report.write_outputs(run_dir, results)
    log_run_summary(run.trainer.loggers, run_dir, results)  # logger=wandb: tables, images, summary
    return results
