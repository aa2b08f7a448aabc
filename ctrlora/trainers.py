"""Build the Lightning Trainer of a run: strategy, precision, loggers, checkpoints, progress bar."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy

from ctrlora.checkpoints import AtomicCheckpointIO
from ctrlora.config import LoggerConfig, TrainerConfig
from ctrlora.console import StepProgress
from ctrlora.errors import ConfigError

LOGGERS = ("csv", "wandb", "tensorboard")
STRATEGIES = ("auto", "ddp", "fsdp")


def build_strategy(cfg: TrainerConfig) -> Strategy | str:
    """`auto` (one process), `ddp`, or `fsdp` (FSDP2 through `ctrlora.fsdp.AdapterFSDPStrategy`)."""
    if cfg.strategy == "auto":
        return "auto"
    if cfg.strategy == "ddp":
        return DDPStrategy(process_group_backend=cfg.process_group_backend, find_unused_parameters=False)
    if cfg.strategy == "fsdp":
        from ctrlora.fsdp import AdapterFSDPStrategy

        return AdapterFSDPStrategy(process_group_backend=cfg.process_group_backend)
    raise ConfigError(f"trainer.strategy={cfg.strategy!r} is unknown; valid: {', '.join(STRATEGIES)}")


def sweep_group() -> str | None:
    """The W&B group of a sweep's runs: the sweep dir's name under a Hydra multirun (submitit,
    basic launcher), or `WANDB_RUN_GROUP`, which `hydra/launcher=local` sets for its job processes."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return os.environ.get("WANDB_RUN_GROUP")


def earlier_wandb_id(run_dir: Path) -> str | None:
    """The W&B run id of an earlier attempt of this run (`wandb/latest-run` -> `*run-<time>-<id>`)."""
    latest = run_dir / "wandb" / "latest-run"
    return latest.resolve().name.rsplit("-", 1)[-1] if latest.exists() else None


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict) -> list[Logger]:
    """`metrics.csv` is always written in the run dir; wandb or tensorboard log alongside it.

    The CSV file is appended to at every logged step, so a killed run loses no rows (Lightning's
    default buffers 100 steps) and a resume can splice the history exactly. `config` is the run's
    resolved config (logged as hyperparameters); when its `resume` is set, W&B continues the earlier
    attempt's run (same id) instead of starting a second one.
    """
    if cfg.name not in LOGGERS:
        raise ConfigError(f"logger.name={cfg.name!r} is unknown; valid: {', '.join(LOGGERS)}")
    loggers: list[Logger] = [
        CSVLogger(save_dir=str(run_dir), name="", version="", flush_logs_every_n_steps=1)
    ]
    if cfg.name == "wandb":
        earlier_id = earlier_wandb_id(run_dir) if config.get("resume") else None
        wandb = WandbLogger(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group or sweep_group(),
            name=run_name,
            tags=list(cfg.tags),
            save_dir=str(run_dir),
            offline=cfg.mode == "offline",
            mode=cfg.mode,
            id=earlier_id,
            resume="allow" if earlier_id else None,
        )
        wandb.log_hyperparams(config)
        loggers.append(wandb)
    elif cfg.name == "tensorboard":
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    return loggers


def checkpoint_callback(run_dir: Path, every_n_steps: int, max_steps: int) -> ModelCheckpoint:
    """Keep the two newest checkpoints (the older one goes once the newer is written: a fallback for a
    resume), written every `every_n_steps` optimizer steps — at most every half run, so a run
    shorter than the interval still has one to resume from; `last.ckpt` links to the newest.

    Files are overwritten in place (no `-v1` copies when a resumed run reaches a step again).
    """
    return ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=min(every_n_steps, max(1, max_steps // 2)),
        monitor="step",
        mode="max",
        save_top_k=2,
        save_last="link",
        enable_version_counter=False,
    )


def check_rank_launch(trainer: L.Trainer) -> None:
    """Refuse a Hydra multirun job whose Trainer would start its own rank processes.

    Lightning re-runs `sys.argv` for ranks 1.., which in a multirun is the whole sweep (every job
    again, in other output dirs). In a sweep the ranks must come from the launcher:
    `hydra/launcher=local` runs each job as its own `python train.py` process (Lightning then
    starts the ranks correctly), submitit/SLURM start `tasks_per_node` processes per job.
    """
    if trainer.num_devices * trainer.num_nodes < 2 or trainer.strategy.cluster_environment is None:
        return
    if trainer.strategy.cluster_environment.creates_processes_externally:
        return
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            f"a multirun job with trainer.devices={trainer.num_devices} would re-launch the whole sweep for"
            " each extra rank; use hydra/launcher=local (one process per job), or a submitit launcher with"
            f" hydra.launcher.tasks_per_node={trainer.num_devices}"
        )


def build_trainer(
    cfg: TrainerConfig, loggers: list[Logger], callbacks: list[L.Callback], run_dir: Path
) -> L.Trainer:
    callbacks = [*callbacks, checkpoint_callback(run_dir, cfg.checkpoint_every_n_steps, cfg.max_steps)]
    if cfg.progress_bar:
        callbacks.append(StepProgress())
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=build_strategy(cfg),
        precision=cfg.precision,
        plugins=[AtomicCheckpointIO()],
        max_steps=cfg.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.gradient_clip_val,
        log_every_n_steps=cfg.log_every_n_steps,
        logger=loggers,
        callbacks=callbacks,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        use_distributed_sampler=False,  # the StepSampler shards by rank itself
        default_root_dir=str(run_dir),
    )
    check_rank_launch(trainer)
    return trainer
