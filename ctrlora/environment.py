"""What a valid config needs of this machine, checked before anything loads: the devices, the
packages its settings use, the model's weights and the evaluation's data. Each failure is a
`ConfigError` naming the key and the remedy."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ctrlora.config import ModelConfig
from ctrlora.errors import ConfigError
from ctrlora.task_types import SEQUENCE_CLASSIFICATION


def check_environment(cfg: DictConfig) -> None:
    """What a valid config needs of this machine, checked before anything loads: the devices, the
    packages its settings use, the model's weights (a local path, or offline the hub cache) and the
    evaluation's data."""
    check_devices(cfg.trainer)
    check_packages(cfg)
    check_model_path(cfg.model)
    check_offline_weights(cfg)
    check_eval_data(cfg)


def check_eval_data(cfg: DictConfig) -> None:
    """A causal LM's lm-eval suite: its local files and mirrors read row by row (every label among the
    choices), and offline its hub datasets cached; with ``eval.backend=vllm``, that vLLM can evaluate the
    run — before training, not after it."""
    if cfg.eval.backend == "vllm" and cfg.eval.suite != "none":
        from ctrlora.evaluation.vllm_backend import check_vllm_backend

        model = cfg.model
        check_vllm_backend(
            method=cfg.method.name, quantize_4bit=cfg.method.quantize_4bit, task=model.task,
            use_dora=cfg.method.use_dora or OmegaConf.select(cfg, "method.ctr.compose") == "dora",
            accelerator=cfg.trainer.accelerator, heads=list(model.modules_to_save),
            has_source=bool(model.path or model.hub_id or model.builder or model.package_dir),
        )
    if cfg.model.task == SEQUENCE_CLASSIFICATION or cfg.eval.suite == "none" or not cfg.eval.tasks:
        return  # a classifier is scored on its own test split, checked with the data
    from ctrlora.evaluation.suite import check_eval_inputs  # imports lm-eval: only when a suite runs

    check_eval_inputs(OmegaConf.to_object(cfg.eval), offline=cfg.offline)


def check_devices(trainer: DictConfig) -> None:
    """A GPU trainer needs a visible GPU; CPU processes cannot outnumber the cores (each rank needs one)."""
    import torch

    if trainer.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer={trainer.name} (trainer.accelerator={trainer.accelerator}) needs a GPU and none is visible;"
            " on CPU use trainer=cpu, or for DDP/FSDP over processes trainer.accelerator=cpu"
            " trainer.process_group_backend=gloo trainer.precision=32-true trainer.devices=2"
        )
    cores = os.cpu_count() or 1
    if trainer.accelerator == "cpu" and isinstance(trainer.devices, int) and trainer.devices > cores:
        raise ConfigError(
            f"trainer.devices={trainer.devices} CPU processes on a machine with {cores} cores; use at most"
            f" trainer.devices={cores} (or trainer=gpu on a GPU machine)"
        )


def check_model_path(model: ModelConfig | DictConfig) -> None:
    """``model.path``, when set, is a folder with a config.json (save_pretrained's output)."""
    if not model.path:
        return
    path = Path(model.path)
    if not path.exists():
        raise ConfigError(f"model.path={model.path!r} does not exist (model {model.name!r})")
    if path.is_dir() and not (path / "config.json").exists():
        raise ConfigError(
            f"model.path={model.path!r} holds no config.json (model {model.name!r}): point it at the folder"
            " with the weights, config.json and the tokenizer files (save_pretrained's output)"
        )


def check_offline_weights(cfg: DictConfig) -> None:
    """Offline, a model named only by its hub id must already be in the Hugging Face cache."""
    model = cfg.model
    if not cfg.offline or model.path or model.package_dir or model.builder or not model.hub_id:
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(model.hub_id, "config.json"), str):
        raise ConfigError(
            f"model {model.name!r} ({model.hub_id}) has no local copy: not in the Hugging Face cache, and"
            " offline=true; set model.path=<local folder with its weights> (or offline=false where the hub is reachable)"
        )


OPTIONAL_PACKAGES = {  # what a setting needs, and the install command (torch pinned: no CUDA pull)
    "bitsandbytes": 'pip install "bitsandbytes>=0.50.2,<0.51" torch==2.13.0',
}


def check_packages(cfg: DictConfig) -> None:
    """A setting whose package is missing fails here, before any weights load."""
    if cfg.method.quantize_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"method={cfg.method.name} quantizes the backbone to 4 bits and needs bitsandbytes:"
            f" {OPTIONAL_PACKAGES['bitsandbytes']}"
        )
