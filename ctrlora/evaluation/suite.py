"""Evaluate an adapted model on the configured suite (docs/DESIGN.md §4 step 7) and build results.json's
``eval`` section (`ctrlora.evaluation.sections`): the model's row, the cached base row, and the
versions that produced them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctrlora import backbones
from ctrlora.errors import ConfigError
from ctrlora.evaluation.base_row import cached_base_row
from ctrlora.evaluation.config import EvalConfig
from ctrlora.evaluation.harness import Row, hf_models, run_tasks
from ctrlora.evaluation.sections import RESERVED_KEYS
from ctrlora.evaluation.tasks import SuiteTasks, dataset_cached, hub_datasets, task_configs, write_task_yamls
from ctrlora.evaluation.vllm_backend import (
    uniform_rank_adapter,
    vllm_factory,
    vllm_model_args,
    without_adapter,
)

BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq")  # PEFT inits that rewrite the base weights


def evaluate_model(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig,
    *,
    base_model_key: str,
    cache_root: Path | None = None,
    base_model: Callable[[], PreTrainedModel] | None = None,
    rank_zero: bool = True,
) -> dict[str, Any]:
    """The ``eval`` section for `model`, evaluated as it is in memory (train/eval mode restored after).

    The base row is read from the cache (`cache_root_of`), else computed on
    ``base_model()`` (a freshly loaded backbone) when given, else on `model` itself inside
    ``model.disable_adapter()`` — the backbone exactly, unless the adapter's initialisation
    rewrote the base weights: PEFT's PiSSA/OLoRA/CorDA/LoftQ inits are refused there, and
    CG-LoRA with ``cg.shift=true`` must pass `base_model`.

    Returns ``{}`` for an empty suite and when ``rank_zero`` is false (call it on every rank;
    only global rank 0 evaluates).
    """
    if not rank_zero or not cfg.tasks:
        return {}
    if cfg.base_row and base_model is None:
        check_base_unchanged(model)
    tasks = prepare(cfg, cache_root)
    was_training = model.training
    try:
        row, versions = run_tasks(hf_models(model, tokenizer, cfg), cfg, tasks)
        section: dict[str, Any] = dict(row)
        if cfg.base_row:
            section["base"], _ = cached_base_row(
                cfg,
                tasks,
                base_model_key=base_model_key,
                cache_root=cache_root_of(cfg, cache_root),
                compute=lambda: base_model_row(model, tokenizer, cfg, tasks, base_model),
            )
    finally:
        model.train(was_training)
    section["versions"] = suite_versions(versions, cfg, tasks)
    return section


def evaluate_backbone(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig,
    *,
    base_model_key: str,
    cache_root: Path | None = None,
) -> dict[str, Any]:
    """The unadapted backbone's row on the suite (the same cache as the base row), with its versions."""
    if not cfg.tasks:
        return {}
    tasks = prepare(cfg, cache_root)
    row, versions = cached_base_row(
        cfg,
        tasks,
        base_model_key=base_model_key,
        cache_root=cache_root_of(cfg, cache_root),
        compute=lambda: run_tasks(hf_models(model, tokenizer, cfg), cfg, tasks),
    )
    return {**row, "versions": suite_versions(versions, cfg, tasks)}


def suite_versions(versions: dict[str, Any], cfg: EvalConfig, tasks: SuiteTasks) -> dict[str, Any]:
    """The section's ``versions``: lm-eval's, plus the suite, the generated task folder and the backend."""
    return {**versions, "suite": cfg.suite, "task_dir": str(tasks.directory), "backend": cfg.backend}


def cache_root_of(cfg: EvalConfig, cache_root: Path | None) -> Path:
    """Where base rows and generated task YAMLs live: ``eval.cache_dir``, else `cache_root`, else
    ``$CTRLORA_CACHE/eval`` (shared by all runs, so a backbone's base row is computed once)."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    return Path(cache_root) if cache_root is not None else backbones.cache_root() / "eval"


def prepare(cfg: EvalConfig, cache_root: Path | None) -> SuiteTasks:
    check_task_names(cfg)
    return write_task_yamls(cfg, cache_root_of(cfg, cache_root))


def check_task_names(cfg: EvalConfig) -> None:
    reserved = [name for name in cfg.tasks if name in RESERVED_KEYS]
    if reserved:
        raise ConfigError(f"eval.tasks: {', '.join(reserved)} is reserved in results.json; rename the task")


def check_eval_inputs(cfg: EvalConfig, offline: bool) -> None:
    """What the suite reads, checked before training: task names, local files and mirrors row by row,
    and (offline) that every hub dataset without a mirror is in the local cache."""
    check_task_names(cfg)
    configs = task_configs(cfg)
    missing = sorted(repo for repo in hub_datasets(configs) if not dataset_cached(repo)) if offline else []
    if missing:
        raise ConfigError(
            f"eval={cfg.suite} reads {', '.join(missing)} from the Hugging Face hub, which offline=true rules out"
            " and which are not cached; set eval.data_dir=<folder of mirrors> (written once by"
            " scripts/export_mirrors.py), eval=none, or offline=false where the hub is reachable"
        )


def check_base_unchanged(model: PeftModel) -> None:
    """Refuse adapters whose PEFT initialisation rewrote the base weights (disabling them then
    does not give the backbone)."""
    changing = sorted(
        {
            str(config.init_lora_weights)
            for config in model.peft_config.values()
            if str(getattr(config, "init_lora_weights", "")).lower().startswith(BASE_CHANGING_INITS)
        }
    )
    if changing:
        raise ConfigError(
            f"init_lora_weights={', '.join(changing)} rewrote the base weights, so disabling the adapter "
            "does not give the backbone: pass base_model=<a loader of the backbone> to evaluate_model"
        )


def base_model_row(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: EvalConfig,
    tasks: SuiteTasks,
    base_model: Callable[[], PreTrainedModel] | None,
) -> tuple[Row, dict[str, Any]]:
    """The suite on the backbone: a freshly loaded one, or `model` with its adapters disabled."""
    if base_model is not None:
        return run_tasks(hf_models(base_model(), tokenizer, cfg), cfg, tasks)
    with model.disable_adapter():
        return run_tasks(hf_models(model, tokenizer, cfg), cfg, tasks)


def evaluate_saved_adapter(
    cfg: EvalConfig, *, pretrained: str, adapter_dir: Path, base_model_key: str, cache_root: Path | None = None
) -> dict[str, Any]:
    """The ``eval`` section through vLLM (``eval.backend=vllm``): the base weights at `pretrained` plus the
    adapter saved in `adapter_dir`, rewritten at one rank beside it (`vllm_backend.uniform_rank_adapter`).
    The base row comes from the same engine with no adapter in its requests, cached like HFLM's (keyed
    by the backend too: the two engines' numerics differ in the last digits)."""
    if not cfg.tasks:
        return {}
    tasks = prepare(cfg, cache_root)
    uniform = adapter_dir.with_name(adapter_dir.name + "_vllm")
    rank = uniform_rank_adapter(adapter_dir, uniform)
    models = vllm_factory(vllm_model_args(cfg, pretrained, uniform, rank))
    row, versions = run_tasks(models, cfg, tasks)
    section: dict[str, Any] = dict(row)
    if cfg.base_row:
        section["base"], _ = cached_base_row(
            cfg, tasks, base_model_key=f"{base_model_key}+vllm", cache_root=cache_root_of(cfg, cache_root),
            compute=lambda: run_tasks(without_adapter(models), cfg, tasks),
        )
    section["versions"] = suite_versions(versions, cfg, tasks)
    return section
