"""Run a suite's tasks through lm-eval on an in-memory model and keep the configured metrics.

Tasks run through ``lm_eval.simple_evaluate`` on ``HFLM(pretrained=model, tokenizer=...)`` (a
PreTrainedModel or a PeftModel, evaluated as it is in memory), one call per distinct
(limit, batch size), so per-task overrides apply. Tasks come from the generated folder only
(``TaskManager(include_path=..., include_defaults=False)``), which also skips indexing lm-eval's
~15k stock configs (~20 s).

Context length: HFLM's window is ``eval.max_length`` or the model's
``max_position_embeddings``; longer log-likelihood inputs are cut from the left (the oldest
few-shot examples go first), and generation keeps the last ``max_length - max_gen_toks`` context
tokens. Nothing fails on long few-shot prompts. lm-eval warns once per cut input (a thousand lines
on the bundled task with tiny-llama's 512 tokens); those warnings are counted instead and reported
as one line per ``simple_evaluate`` call.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from torch import nn
from transformers import PreTrainedTokenizerBase

from ctrlora.errors import ConfigError
from ctrlora.evaluation.batching import BatchSize
from ctrlora.evaluation.config import EvalConfig
from ctrlora.evaluation.tasks import SuiteTasks

Row = dict[str, dict[str, dict[str, float | None]]]  # task -> metric -> {"value", "stderr"}

log = logging.getLogger(__name__)
TRUNCATION_WARNING = "exceeds model's maximum length"


def harness_version() -> str:
    return version("lm_eval")


def seed_arguments(seed: int | None) -> dict[str, int]:
    """lm-eval's four seeds set to `seed` (None keeps lm-eval's defaults)."""
    if seed is None:
        return {}
    return {
        name: seed
        for name in ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")
    }


LanguageModels = Callable[[BatchSize], Any]  # batch size (an int, auto or auto:N) -> an lm-eval LM


def hf_models(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig) -> LanguageModels:
    """lm-eval's HFLM on the in-memory `model`, one per batch size (``eval.backend=hf``)."""
    return lambda batch_size: HFLM(
        pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=cfg.max_batch_size,
        max_length=cfg.max_length,
    )


def run_tasks(models: LanguageModels, cfg: EvalConfig, tasks: SuiteTasks) -> tuple[Row, dict[str, Any]]:
    """Evaluate the LM ``models(batch_size)`` gives on every task of `cfg`; returns (row, versions).

    Tasks that share a limit and a batch size run in one ``simple_evaluate`` call. ``versions``
    records the harness version and, per task, lm-eval's task version, the shots used, the
    number of scored documents and the limit (None: the whole split).
    """
    manager = TaskManager(include_path=str(tasks.directory), include_defaults=False)
    batches: dict[tuple[int | float | None, BatchSize], list[str]] = {}
    for name, spec in cfg.tasks.items():
        setting = (limit_value(spec.limit, cfg.limit), spec.batch_size or cfg.batch_size)
        batches.setdefault(setting, []).append(name)
    row: Row = {}
    versions: dict[str, Any] = {"lm_eval": harness_version(), "tasks": {}, "num_fewshot": {}, "samples": {}, "limit": {}}
    for (limit, batch_size), names in batches.items():
        lm = models(batch_size)
        with truncations_counted(names, lm.max_length):
            output = simple_evaluate(
                model=lm,
                tasks=names,
                task_manager=manager,
                limit=limit,
                log_samples=False,
                **seed_arguments(cfg.seed),
            )
        for name in names:
            result = output["results"][name]
            row[name] = select_metrics(name, result, cfg.tasks[name].metrics)
            versions["tasks"][name] = output["versions"][name]
            versions["num_fewshot"][name] = output["n-shot"][name]
            versions["samples"][name] = result["sample_len"]
            versions["limit"][name] = limit
    return {name: row[name] for name in cfg.tasks}, versions


@contextmanager
def truncations_counted(tasks: list[str], max_length: int) -> Iterator[None]:
    """Swallow lm-eval's per-input "Truncating ... tokens from the left" warnings; log their count once."""
    cut = 0

    def count_truncation(record: logging.LogRecord) -> bool:
        nonlocal cut
        if TRUNCATION_WARNING in record.getMessage():
            cut += 1
            return False
        return True

    hflm_logger = logging.getLogger(HFLM.__module__)  # the logger lm-eval's HFLM warns on
    hflm_logger.addFilter(count_truncation)
    try:
        yield
    finally:
        hflm_logger.removeFilter(count_truncation)
        if cut:
            log.warning(
                "%s: %d log-likelihood inputs were longer than the context window (%d tokens) and lost "
                "their oldest tokens (eval.max_length sets the window)",
                ", ".join(tasks), cut, max_length,
            )


def limit_value(task_limit: float | None, suite_limit: float | None) -> int | float | None:
    """The task's limit, else the suite's; whole numbers as int (lm-eval reads a float < 1 as a fraction)."""
    limit = task_limit if task_limit is not None else suite_limit
    return int(limit) if limit is not None and limit >= 1 else limit


def select_metrics(
    task: str, result: dict[str, Any], wanted: list[str]
) -> dict[str, dict[str, float | None]]:
    """``{metric: {"value", "stderr"}}`` for the `wanted` lm-eval keys (all when empty).

    lm-eval names a metric ``"<metric>,<filter>"`` and its standard error
    ``"<metric>_stderr,<filter>"``; the default filter ``none`` is dropped from the name, so
    keys read ``acc``, ``acc_norm``, ``exact_match,strict-match``.
    """
    available = {}
    for key in result:
        metric, comma, filter_name = key.partition(",")
        if comma and not metric.endswith("_stderr"):
            available[metric if filter_name == "none" else key] = (key, f"{metric}_stderr,{filter_name}")
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise ConfigError(
            f"eval.tasks.{task}.metrics: {', '.join(unknown)} not computed by lm-eval for {task}; "
            f"available: {', '.join(available)}"
        )
    return {
        name: {
            "value": float(result[available[name][0]]),
            "stderr": as_stderr(result.get(available[name][1])),
        }
        for name in wanted or available
    }


def as_stderr(value: Any) -> float | None:
    """lm-eval writes "N/A" where it has no standard error."""
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None
