"""What `evaluate.py` does: evaluate a finished run dir, an adapter dir, or the base model alone.

    python evaluate.py run_dir=runs/x                  # the run's own suite; merges into its results.json
    python evaluate.py run_dir=runs/x eval=paper       # another suite (eval.* overrides need eval=<suite>)
    python evaluate.py adapter=path/to/adapter model=llama2-7b eval=paper output=eval.json
    python evaluate.py model=llama2-7b eval=paper      # the base model alone (its cached row)

Run-dir mode loads the run's backbone (its ``config.yaml``) and ``adapter/`` as plain PEFT,
evaluates exactly as the run did in memory, and merges the ``eval`` section into the run's
``results.json`` task by task — unless a task is scored with a limit (``eval.limit`` or the
task's) other than the one its recorded numbers had: a part of the test split never replaces a
run's numbers, it goes to ``<run_dir>/eval_limited.json`` instead. Every mode returns the section; `evaluate.py` prints it
as JSON on stdout (or writes it to ``output``), everything else going to stderr. A base row
missing from the cache is computed on a freshly loaded backbone.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from ctrlora import report
from ctrlora.backbones import load_backbone, load_tokenizer
from ctrlora.config import ModelConfig, TrainConfig, load_train_config
from ctrlora.errors import ConfigError, RunDirError
from ctrlora.evaluation.base_row import backbone_key
from ctrlora.evaluation.config import EvalConfig
from ctrlora.evaluation.sections import limits, merge_eval_sections
from ctrlora.evaluation.suite import evaluate_backbone, evaluate_model
from ctrlora.task_types import SEQUENCE_CLASSIFICATION

log = logging.getLogger(__name__)
LIMITED_FILE = "eval_limited.json"  # run_dir mode: where a limited evaluation goes


@dataclass
class EvaluateConfig:
    """`conf/evaluate.yaml`: which model to evaluate, on which suite, and where the output goes."""

    run_dir: str | None = None  # a finished run: its config.yaml, adapter/ and results.json
    adapter: str | None = None  # a PEFT adapter dir, on the backbone given by `model`
    output: str | None = None  # adapter / base modes: write the JSON here (stdout when null)
    accelerator: str | None = None  # cpu | gpu; null: the run's trainer.accelerator (run_dir mode), else cpu
    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register_evaluate_config() -> None:
    """Register the schema that `conf/evaluate.yaml` extends (idempotent)."""
    ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def evaluate_saved(cfg: EvaluateConfig) -> dict[str, Any]:
    """Dispatch on the mode; returns the ``eval`` section (run_dir mode: after merging it)."""
    if cfg.run_dir and cfg.adapter:
        raise ConfigError("set run_dir or adapter, not both (run_dir=<run> already names its adapter/)")
    if cfg.run_dir:
        return evaluate_run_dir(Path(cfg.run_dir), cfg)
    if cfg.eval == EvalConfig():
        raise ConfigError("choose a suite: eval=paper | eval=local | eval=<your own conf/eval/*.yaml>")
    accelerator = cfg.accelerator or "cpu"

    def backbone() -> Any:
        return on_device(load_backbone(cfg.model, accelerator=accelerator), accelerator)

    tokenizer = load_tokenizer(cfg.model)
    key = backbone_key(cfg.model, accelerator=accelerator)
    if cfg.adapter:
        model = PeftModel.from_pretrained(backbone(), cfg.adapter)
        section = evaluate_model(model, tokenizer, cfg.eval, base_model_key=key, base_model=backbone)
    else:
        section = evaluate_backbone(backbone(), tokenizer, cfg.eval, base_model_key=key)
    return section


def evaluate_run_dir(run_dir: Path, cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate a finished run's adapter on its backbone and merge into its results.json (a limited
    evaluation: into eval_limited.json)."""
    results_path, adapter_dir = run_dir / "results.json", run_dir / "adapter"
    if not results_path.exists() or not adapter_dir.is_dir():
        raise RunDirError(
            f"run_dir={run_dir} is not a finished run (needs results.json and adapter/); "
            f"to evaluate a bare adapter use adapter=<dir> model=<backbone>"
        )
    run = load_train_config(run_dir / "config.yaml")
    accelerator = cfg.accelerator or run.trainer.accelerator
    quantized = run.method.quantize_4bit
    tokenizer = load_tokenizer(run.model)
    if run.model.task == SEQUENCE_CLASSIFICATION:
        suite = run.eval if cfg.eval == EvalConfig() else cfg.eval
        section = evaluate_encoder_run(run, tokenizer, adapter_dir, suite, accelerator)
    else:
        suite = run_suite_config(run.eval, cfg.eval)

        def backbone() -> Any:
            return on_device(
                load_backbone(run.model, accelerator=accelerator, quantize_4bit=quantized),
                accelerator,
                quantized,
            )

        section = evaluate_model(
            PeftModel.from_pretrained(backbone(), adapter_dir),
            tokenizer,
            suite,
            base_model_key=backbone_key(run.model, accelerator=accelerator, quantize_4bit=quantized),
            base_model=backbone,
        )
    results = json.loads(results_path.read_text())
    recorded = limits(results.get("eval", {}))
    if any(limit is not None and (task not in recorded or recorded[task] != limit) for task, limit in limits(section).items()):
        log.warning("a limited evaluation: written to %s, results.json left as it was", run_dir / LIMITED_FILE)
        report.write_json(run_dir / LIMITED_FILE, section)
        return section
    results["eval"] = merge_eval_sections(results.get("eval", {}), section)
    report.write_json(results_path, results)
    return results["eval"]


def evaluate_encoder_run(
    run: TrainConfig, tokenizer: Any, adapter_dir: Path, suite: EvalConfig, accelerator: str
) -> dict[str, Any]:
    """Encoder runs: accuracy, macro-F1 and MCC on the run's test split (``suite``'s batch size and limit)."""
    from ctrlora.data.datamodule import FinetuneDataModule
    from ctrlora.evaluation.classification import classifier_eval_section

    datamodule = FinetuneDataModule(
        run.data, tokenizer, task=run.model.task, seed=run.seed, base_dir=Path.cwd()
    )
    datamodule.setup("test")
    if (adapter_dir / "adapter_config.json").exists():
        backbone = load_backbone(run.model, accelerator=accelerator, num_labels=len(datamodule.label_names or []))
        model = PeftModel.from_pretrained(on_device(backbone, accelerator), adapter_dir)
    else:  # method=head_only / full_ft save the whole fine-tuned model
        model = on_device(AutoModelForSequenceClassification.from_pretrained(adapter_dir), accelerator)
    return classifier_eval_section(model, datamodule, suite)


def run_suite_config(run_eval: EvalConfig, requested: EvalConfig) -> EvalConfig:
    """The suite to run on a saved run: the requested one, or the run's own when none was chosen."""
    if requested == EvalConfig():
        if not run_eval.tasks:
            raise ConfigError(
                f"the run was trained with eval={run_eval.suite} (no tasks); choose a suite: eval=local|paper"
            )
        return run_eval
    if not requested.tasks:
        raise ConfigError("eval.* overrides need a suite to apply to: add eval=<paper|local|...>")
    return requested


def on_device(model: Any, accelerator: str, quantized: bool = False) -> Any:
    """Move the model to the GPU for accelerator=gpu (4-bit models are placed by bitsandbytes)."""
    if accelerator in ("gpu", "cuda") and not quantized:
        return model.to("cuda")
    return model
