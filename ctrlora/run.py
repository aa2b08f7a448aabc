"""One run, top to bottom (docs/DESIGN.md §4): config -> backbone -> data -> method -> fit -> save -> report."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from omegaconf import DictConfig, OmegaConf
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctrlora import report
from ctrlora.backbones import load_backbone, load_tokenizer, resolve_source
from ctrlora.checkpoints import SignalCheckpoint, latest_checkpoint, resumable_checkpoint
from ctrlora.config import TrainConfig, load_train_config, validate_config
from ctrlora.console import phase
from ctrlora.curvature.runtime import return_freed_host_memory
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.environment import check_environment
from ctrlora.errors import FAILED_FILE, RunDirError, RunStopped
from ctrlora.evaluation.base_row import backbone_key
from ctrlora.evaluation.classification import classifier_eval_section
from ctrlora.evaluation.sections import task_rows
from ctrlora.evaluation.suite import evaluate_model, evaluate_saved_adapter
from ctrlora.evaluation.validation import PeriodicValidation, validation_section
from ctrlora.fsdp import evaluation_model, gather_adapter_state
from ctrlora.head_warmup import head_warmup_steps, warm_up_head
from ctrlora.lit import FinetuneModule, RunStats
from ctrlora.methods.base import Method, build_method
from ctrlora.process_ranks import adopt_submitit_ranks, is_rank_zero
from ctrlora.task_types import SEQUENCE_CLASSIFICATION
from ctrlora.trainers import build_loggers, build_trainer
from ctrlora.wandb_logging import log_run_summary

log = logging.getLogger(__name__)
OUTPUTS = (
    "adapter", "checkpoints", "results.json", "summary.md", "metrics.csv", "allocation.json", "rank_heatmap.png",
    "loss_curve.png", FAILED_FILE,
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
    elif finished or unfinished:
        check_same_experiment(cfg, run_dir, finished)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir, finished


def check_same_experiment(cfg: TrainConfig, run_dir: Path, finished: bool) -> None:
    """Refuse to resume a run dir whose saved config.yaml trains something else, or to return a finished
    run as the result of other settings; the changed keys are named. Keys of `report.NON_SEMANTIC_KEYS`
    may change, and so may ``eval.*`` while training is unfinished (evaluation comes at its end)."""
    saved = run_dir / "config.yaml"
    if not saved.exists():
        return
    changed = [key for key in report.changed_keys(load_train_config(saved), cfg)
               if finished or not key.startswith("eval.")]
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        evaluate = f" (to evaluate it again: python evaluate.py run_dir={run_dir} eval=...)" if finished else ""
        raise RunDirError(
            f"run_dir={run_dir} holds a run with other settings ({saved}; changed: {shown}). resume=true"
            f" continues only the same experiment{evaluate}: pass overwrite=true to start again, or choose"
            " another run_dir."
        )


class AdapterSetup(L.Callback):
    """Builds the method's model (calibration, allocation, adapters) on the training device.

    Usually at assembly, so the PEFT model exists before `fit` (under data parallelism every rank then
    calibrates on the whole set, before any process group: identical results, W times the work). A
    method whose calibration only sums statistics (``shards_calibration``) is instead built inside
    `fit` under data parallelism, in `setup`: Lightning starts ranks 1.. only when rank 0 enters
    `fit` (SLURM's tasks first meet there too), and `setup` comes after the process group and before
    DDP wraps the model, FSDP2 shards it (`configure_model`) and a checkpoint is restored. Each rank
    estimates on its shard of the calibration set and the estimators all-reduce the sums, so every
    rank gets the whole set's factors for 1/W of the work. The ranks then check they allocated the
    same adapters and start from rank 0's values (as DDP's wrap does), so FSDP's shards come from
    one model.
    """

    def __init__(self, method: Method, datamodule: FinetuneDataModule, cfg: TrainConfig, stats: RunStats) -> None:
        self.method, self.datamodule, self.cfg, self.stats = method, datamodule, cfg, stats
        self.prepared = False

    def prepare(
        self, backbone: PreTrainedModel, trainer: L.Trainer, world_size: int = 1, rank: int = 0
    ) -> nn.Module:
        """`method.prepare` on the training device with calibration shard `rank` of `world_size`, from the
        run's seed whatever ran before (so one process and every rank draw the same initial adapters).
        First, with ``calibration.head_warmup_steps``, the fresh head is trained alone on the whole
        calibration set (every rank alike), whatever the method; a classifier's base row is then
        scored: the frozen backbone with the head that training starts from."""
        L.seed_everything(self.cfg.seed, workers=True, verbose=False)
        backbone = backbone.to(trainer.strategy.root_device)
        head = list(self.cfg.model.modules_to_save)
        steps = head_warmup_steps(self.cfg.calibration.head_warmup_steps, head)
        if steps > 0:
            self.stats.head_warmup = warm_up_head(
                backbone, self.datamodule.calibration_dataloader(1, 0), head, steps, self.cfg.calibration.head_warmup_lr
            )
        if self.cfg.model.task == SEQUENCE_CLASSIFICATION and self.cfg.eval.suite != "none":
            # random state kept: iterating a DataLoader draws from it, and the adapters' init follows
            cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
            with phase("scoring the base model (before adaptation) on the test split"), torch.random.fork_rng(cuda):
                self.stats.base_eval = task_rows(classifier_eval_section(backbone, self.datamodule, self.cfg.eval))
        calibration = None
        if self.method.needs_calibration:
            calibration = self.datamodule.calibration_dataloader(world_size, rank)
        self.prepared = True
        work = "calibration, allocation and adapters" if calibration is not None else "adapters"
        with phase(f"{self.cfg.method.name}: {work}"):
            model = self.method.prepare(backbone, calibration)
        return_freed_host_memory()  # the calibration pass's activations and the unstored estimates
        report.write_allocation(self.method, Path(self.cfg.run_dir))
        return model

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.prepared:
            return
        model = self.prepare(pl_module.model, trainer, trainer.world_size, trainer.global_rank)
        model.train()
        pl_module.model = model
        adopt_rank_zero_adapters(model, trainer.strategy)


def adopt_rank_zero_adapters(model: nn.Module, strategy: Strategy) -> None:
    """Fail on every rank unless all ranks hold the same trainable shapes (the allocation); then
    broadcast rank 0's trainable values. A collective every rank must enter."""
    trainable = {name: param for name, param in model.named_parameters() if param.requires_grad}
    shapes = {name: tuple(param.shape) for name, param in trainable.items()}
    reference = strategy.broadcast(shapes, src=0)
    names = shapes.keys() | reference.keys()
    differing = sorted(name for name in names if shapes.get(name) != reference.get(name))
    flag = torch.tensor(float(bool(differing)), device=strategy.root_device)
    disagreeing = int(strategy.reduce(flag, reduce_op="sum"))
    if disagreeing:
        raise RuntimeError(
            f"the ranks built different adapters: {disagreeing} rank(s) differ from rank 0 (rank"
            f" {strategy.global_rank}: {differing[:5]}); the curvature statistics must agree on every rank"
        )
    with torch.no_grad():
        for param in trainable.values():
            torch.distributed.broadcast(param.data, src=0)


@dataclass
class RunParts:
    """Everything one run trains with, assembled but not yet fitted."""

    tokenizer: PreTrainedTokenizerBase
    datamodule: FinetuneDataModule
    method: Method
    module: FinetuneModule
    stats: RunStats
    trainer: L.Trainer

    @property
    def model(self) -> nn.Module:
        """The method's (PEFT) model; the backbone until `fit` begins where `AdapterSetup` builds it there."""
        return self.module.model


def assemble(cfg: TrainConfig, run_dir: Path) -> RunParts:
    """Seed, then build tokenizer, data, backbone, method and the Trainer; then the method's ranks and
    adapters (for a method that shards its calibration across ranks, `fit` builds them: `AdapterSetup`).

    Denormal floats are flushed to zero on CPU: Adam's second moments of tiny gradients fall below
    fp32's normal range, and x86 arithmetic on denormals is many times slower (CG-LoRA's steps took
    1.3× LoRA's on bench-small for that alone, 0.94× with the flush)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_flush_denormal(True)
    tokenizer = load_tokenizer(cfg.model)
    datamodule = FinetuneDataModule(
        cfg.data, tokenizer, task=cfg.model.task, seed=cfg.seed, calibration=cfg.calibration, base_dir=Path.cwd()
    )
    datamodule.setup("fit")
    num_labels = len(datamodule.label_names) if cfg.model.task == SEQUENCE_CLASSIFICATION else None
    with phase(f"loading {cfg.model.name}"):
        backbone = load_backbone(
            cfg.model, accelerator=cfg.trainer.accelerator, quantize_4bit=cfg.method.quantize_4bit,
            num_labels=num_labels,
        )
    total_steps = cfg.trainer.max_steps
    method = build_method(cfg, total_steps=total_steps, run_dir=run_dir)
    stats = RunStats()
    adapters = AdapterSetup(method, datamodule, cfg, stats)
    loggers = build_loggers(cfg.logger, run_dir, report.run_name(cfg), asdict(cfg))
    callbacks = [adapters, stats, SignalCheckpoint(run_dir / "checkpoints"), *method.callbacks()]
    if cfg.eval.val_every_n_steps:
        callbacks.append(PeriodicValidation(datamodule, cfg.eval))
    trainer = build_trainer(cfg.trainer, loggers, callbacks, run_dir)
    in_fit = trainer.world_size > 1 and method.shards_calibration
    model = backbone if in_fit else adapters.prepare(backbone, trainer)
    module = FinetuneModule(model, method, cfg.optim, total_steps)
    return RunParts(tokenizer, datamodule, method, module, stats, trainer)


def evaluate_run(cfg: TrainConfig, run: RunParts) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The `val` section (validation loss and classifier metrics; None without a validation split) and
    the `eval` section: the suite through lm-eval on the in-memory model (its base row cached), or
    accuracy / macro-F1 / MCC on the test split for a sequence classifier (its base row: the frozen
    backbone with the head training started from, scored before adaptation); ``{}`` for eval=none."""
    num_labels = len(run.datamodule.label_names) if cfg.model.task == SEQUENCE_CLASSIFICATION else None
    model = evaluation_model(  # under FSDP: the backbone + the saved adapter (the sharded model needs all ranks)
        run.model, Path(cfg.run_dir) / "adapter",
        lambda: load_backbone(cfg.model, accelerator=cfg.trainer.accelerator,
                              quantize_4bit=cfg.method.quantize_4bit, num_labels=num_labels),
    )
    with phase("validation"):
        val = validation_section(model, run.datamodule, cfg.eval)
    with phase(f"test evaluation (eval={cfg.eval.suite})"):
        return val, evaluate_test(cfg, run, model)


def evaluate_test(cfg: TrainConfig, run: RunParts, model: nn.Module) -> dict[str, Any]:
    """The `eval` section of `evaluate_run`."""
    if cfg.eval.suite == "none":
        return {}
    if cfg.model.task == SEQUENCE_CLASSIFICATION:
        section = classifier_eval_section(model, run.datamodule, cfg.eval)
        return {**section, "base": run.stats.base_eval} if run.stats.base_eval else section
    if cfg.eval.backend == "vllm":  # the engine loads its own weights: the trained model leaves the GPU first
        model.to("cpu")
        torch.cuda.empty_cache()
        return evaluate_saved_adapter(
            cfg.eval, pretrained=resolve_source(cfg.model), adapter_dir=Path(cfg.run_dir) / "adapter",
            base_model_key=backbone_key(cfg.model, accelerator=cfg.trainer.accelerator),
        )
    return evaluate_model(
        model, run.tokenizer, cfg.eval,
        base_model_key=backbone_key(cfg.model, accelerator=cfg.trainer.accelerator,
                                    quantize_4bit=cfg.method.quantize_4bit),
        base_model=lambda: load_backbone(cfg.model, accelerator=cfg.trainer.accelerator,
                                         quantize_4bit=cfg.method.quantize_4bit),
    )


def train(composed: DictConfig, *, checked: bool = False) -> dict[str, Any]:
    """Fine-tune, save the adapter, evaluate, and write results.json; returns the results.

    `checked`: the caller has already run `validate_config` and `check_environment` on `composed`
    (train.py does, before importing this module)."""
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    adopt_submitit_ranks()
    if not checked:
        validate_config(composed)
        check_environment(composed)
    cfg: TrainConfig = OmegaConf.to_object(composed)
    run_dir, finished = prepare_run_dir(cfg)
    if finished:
        log.info("run_dir=%s is already finished; nothing to resume", run_dir)
        return json.loads((run_dir / "results.json").read_text())
    if is_rank_zero():
        OmegaConf.save(composed, run_dir / "config.yaml", resolve=True)
        (run_dir / FAILED_FILE).unlink(missing_ok=True)
    previous_metrics = report.set_aside_metrics(run_dir) if cfg.resume and is_rank_zero() else None
    run = assemble(cfg, run_dir)
    checkpoint = resumable_checkpoint(run_dir / "checkpoints") if cfg.resume else None
    if cfg.resume and checkpoint is None:
        log.warning("resume=true but run_dir=%s has no checkpoint that opens: training starts at step 0", run_dir)
    with phase(f"training ({cfg.trainer.max_steps} steps)"):
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=checkpoint)
    if run.trainer.interrupted:
        raise KeyboardInterrupt(f"training interrupted; resume with resume=true run_dir={run_dir}")
    stop = next(callback for callback in run.trainer.callbacks if isinstance(callback, SignalCheckpoint))
    if stop.stopped_by:
        requeued = stop.pass_on()
        raise RunStopped(f"{stop.stopped_by} stopped the run after step {stop.stopped_at} (its checkpoint is"
                         f" written){requeued}; continue it with resume=true run_dir={run_dir}")
    adapter_state = gather_adapter_state(run.model)  # FSDP: a collective on every rank; else None
    if not run.trainer.is_global_zero:
        return {}
    if previous_metrics is not None:
        report.merge_resumed_metrics(run_dir, previous_metrics, run.module.resumed_from_step)

    report.save_adapter(run.method, run.model, run.tokenizer, run_dir / "adapter", adapter_state)
    report.write_allocation(run.method, run_dir)  # the ranks training ended with (after any re-allocation)
    results = report.build_results(
        cfg, method=run.method, model=run.model, stats=run.stats, trainer=run.trainer,
        started_at=started_at, wall_s=run.stats.wall_s(),
    )
    results["val"], results["eval"] = evaluate_run(cfg, run)
    report.write_outputs(run_dir, results)
    log_run_summary(run.trainer.loggers, run_dir, results)  # logger=wandb: tables, images, summary
    log.info("finished: %s (summary.md, results.json, adapter/)", run_dir)
    return results
