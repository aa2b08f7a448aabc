"""Settings of the evaluation suites (docs/EVALUATION.md §1): the `eval=` config group.

A suite is a named set of lm-eval tasks, each with its own shots, metrics, limit and batch size,
all overridable from the command line (``eval.tasks.gsm8k.num_fewshot=0``, ``eval.limit=20``).
Stock tasks keep lm-eval's prompts and metrics; `eval.data_dir` only swaps where their data
comes from (`ctrlora.evaluation.tasks`). A task with a `local` section is built from a local
file instead (the bundled quotation-topic task of `eval=local`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ctrlora.errors import ConfigError, check_choice
from ctrlora.evaluation.batching import check_batch_size
from ctrlora.task_types import SEQUENCE_CLASSIFICATION

BACKENDS = ("hf", "vllm")


@dataclass
class LocalTaskData:
    """A multiple-choice task over a local json/jsonl/parquet file.

    The context is `prompt_template` filled with the row (``{text}`` -> the row's ``text``
    field); each candidate continuation is ``" " + choice`` (lm-eval's target delimiter), and
    the gold choice is the row's `label_field` (a choice word, or its index).
    """

    test: str = ""  # the evaluated rows; relative paths resolve against the working directory
    train: str | None = None  # few-shot examples (needed only when num_fewshot > 0)
    label_field: str = "label"
    prompt_template: str = "{text}"
    choices: list[str] = field(default_factory=list)
    version: float = 1.0  # bump when the prompt or the file changes meaning


@dataclass
class TaskSpec:
    """One task of a suite; unset values fall back to the suite's, then to lm-eval's own."""

    num_fewshot: int | None = None  # None: the stock task's default
    metrics: list[str] = field(default_factory=list)  # lm-eval keys "metric" or "metric,filter"; empty: all
    limit: float | None = None  # overrides eval.limit (int: documents per task; <1: a fraction)
    batch_size: Any = None  # overrides eval.batch_size (an int, auto or auto:N)
    max_gen_toks: int | None = None  # generative tasks: cap on generated tokens (lm-eval's default 256)
    local: LocalTaskData | None = None  # build the task from a local file instead of a stock lm-eval task


@dataclass
class EvalConfig:
    suite: str = "none"  # a label for the task set (paper | local | none | your own); recorded and cached by
    tasks: dict[str, TaskSpec] = field(default_factory=dict)  # lm-eval task name -> settings
    data_dir: str | None = None  # local mirrors of the stock tasks' data (see ctrlora/evaluation/mirrors.py)
    limit: float | None = None  # documents per task (smoke tests); null: all
    batch_size: Any = 8  # an int, or auto / auto:N: the largest that fits, from max_batch_size down
    max_batch_size: int = 64  # where batch_size=auto starts
    max_length: int | None = None  # context window for lm-eval; null: the model's max_position_embeddings
    seed: int | None = (
        None  # lm-eval's random/numpy/torch/few-shot seeds; null: lm-eval's defaults (0,1234,1234,1234)
    )
    base_row: bool = True  # also report the unadapted backbone (computed once, cached)
    val_metric: str = "auto"  # what train.py returns to a sweeper: auto (accuracy | loss) | loss | accuracy | macro_f1 | mcc
    val_every_n_steps: int | None = None  # also score validation during training (metrics.csv: val/...)
    cache_dir: str | None = None  # base rows and generated task YAMLs; null: the caller's cache root
    backend: str = "hf"  # hf: lm-eval's HFLM on the in-memory model | vllm: lm-eval's vLLM on the saved adapter
    vllm_args: dict[str, Any] = field(default_factory=dict)  # backend=vllm: more VLLM(...) arguments

    def __post_init__(self) -> None:
        check_choice("eval.backend", self.backend, BACKENDS)
        check_batch_size("eval.batch_size", self.batch_size)
        check_batch_size("eval.max_batch_size", self.max_batch_size)
        for name, spec in self.tasks.items():
            if spec.batch_size is not None:
                check_batch_size(f"eval.tasks.{name}.batch_size", spec.batch_size)


CLASSIFIER_METRICS = ("accuracy", "macro_f1", "mcc")


def objective_metric(val_metric: str, task: str) -> str:
    """``eval.val_metric`` resolved: ``auto`` is accuracy for a classifier, loss for a causal LM."""
    choices = ("auto", "loss", *CLASSIFIER_METRICS)
    if val_metric not in choices:
        raise ConfigError(f"eval.val_metric={val_metric!r} is not valid; choose one of {list(choices)}")
    if val_metric == "auto":
        return "accuracy" if task == SEQUENCE_CLASSIFICATION else "loss"
    if val_metric in CLASSIFIER_METRICS and task != SEQUENCE_CLASSIFICATION:
        raise ConfigError(f"eval.val_metric={val_metric} needs a classifier (model.task=sequence_classification)")
    return val_metric
