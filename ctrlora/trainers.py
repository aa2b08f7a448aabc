"""Build the Lightning Trainer of a run: strategy, precision, loggers, checkpoints, progress bar."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy, Strategy

from ctrlora.config import LoggerConfig, TrainerConfig
from ctrlora.errors import ConfigError

LOGGERS = ("csv", "wandb", "tensorboard")
STRATEGIES = ("auto", "ddp")


def build_strategy(cfg: TrainerConfig) -> Strategy | str:
    if cfg.strategy == "auto":
        return "auto"
    if cfg.strategy == "ddp":
        return DDPStrategy(process_group_backend=cfg.process_group_backend, find_unused_parameters=False)
    raise ConfigError(f"trainer.strategy={cfg.strategy!r} is unknown; valid: {', '.join(STRATEGIES)}")


def build_loggers(cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict) -> list[Logger]:
    """`metrics.csv` is always written in the run dir; wandb or tensorboard log alongside it."""
    if cfg.name not in LOGGERS:
        raise ConfigError(f"logger.name={cfg.name!r} is unknown; valid: {', '.join(LOGGERS)}")
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    if cfg.name == "wandb":
        wandb = WandbLogger(
            project=cfg.project, entity=cfg.entity, group=cfg.group, name=run_name, tags=list(cfg.tags),
            save_dir=str(run_dir), offline=cfg.mode == "offline", mode=cfg.mode,
        )
        wandb.log_hyperparams(config)
        loggers.append(wandb)
    elif cfg.name == "tensorboard":
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    return loggers


def checkpoint_callback(run_dir: Path, every_n_steps: int) -> ModelCheckpoint:
    """Keep the newest checkpoint (plus `last.ckpt`), written every `every_n_steps` optimizer steps."""
    return ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"),
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=every_n_steps,
        save_top_k=1,
        save_last=True,
    )


def build_trainer(
    cfg: TrainerConfig, loggers: list[Logger], callbacks: list[L.Callback], run_dir: Path
) -> L.Trainer:
    callbacks = [*callbacks, checkpoint_callback(run_dir, cfg.checkpoint_every_n_steps)]
    callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.progress_bar:
        callbacks.append(RichProgressBar())
    return L.Trainer(
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=build_strategy(cfg),
        precision=cfg.precision,
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
