"""lm-eval task YAMLs for one suite, generated at run time into a folder lm-eval reads.

Every stock task is derived from lm-eval's own YAML by ``include:`` (an absolute path into the
installed package), so prompts, targets, ``process_docs``, filters and metrics stay lm-eval's;
the generated file overrides only the shots, the generation length and — with
``eval.data_dir`` — the dataset: the mirror's files through a ``json``/``parquet`` builder with
absolute paths (lm-eval resolves relative ``data_files`` against the working directory).

MMLU is lm-eval's group of 57 subject tasks. The generated ``mmlu`` group lists the subjects
the mirror holds (all 57 without a mirror) with lm-eval's own aggregate (acc weighted by
subject size). lm-eval's stock group nests the subjects in four categories, weighting by size at
both levels, which equals this flat size-weighted mean over the same subjects.

The folder is named by a hash of its contents, so one suite's YAMLs are written once and a
run's exact tasks can be re-run by the stock tools:
``lm_eval.simple_evaluate(..., task_manager=TaskManager(include_path=<folder>))``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from typing import Any

import lm_eval.tasks
import yaml
from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval's own loader: resolves `include:`

from ctrlora.data.sources import candidate_paths, load_rows
from ctrlora.errors import ConfigError, DataError
from ctrlora.evaluation.config import EvalConfig, TaskSpec
from ctrlora.evaluation.mirrors import MIRROR_BUILDERS, mirrored_dataset

STOCK_ROOT = Path(lm_eval.tasks.__file__).parent
STOCK_TASKS = {  # lm-eval task -> its YAML under lm_eval/tasks
    "gsm8k": "gsm8k/gsm8k.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "arc_easy": "arc/arc_easy.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "winogrande": "winogrande/default.yaml",
}
MMLU_DIR = STOCK_ROOT / "mmlu" / "default"  # mmlu_<subject>.yaml and the group _mmlu.yaml


@dataclass(frozen=True)
class SuiteTasks:
    """The generated task folder of a suite and every local file its tasks read."""

    directory: Path
    data_files: tuple[Path, ...]


def write_task_yamls(cfg: EvalConfig, cache_root: Path) -> SuiteTasks:
    """Generate the suite's task YAMLs under ``cache_root/lm_eval_tasks/<hash>/`` (once)."""
    configs = task_configs(cfg)
    texts = {
        stem: yaml.safe_dump(config, sort_keys=False, allow_unicode=True) for stem, config in configs.items()
    }
    digest = hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:16]
    directory = Path(cache_root) / "lm_eval_tasks" / digest
    if not directory.exists():
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{digest}-"))
        for stem, text in texts.items():
            (staging / f"{stem}.yaml").write_text(text)
        try:
            staging.rename(directory)
        except OSError:  # written meanwhile by another process, with the same contents
            shutil.rmtree(staging, ignore_errors=True)
    files = sorted({Path(path) for config in configs.values() for path in data_files(config)})
    return SuiteTasks(directory, tuple(files))


def task_configs(cfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """Every task config of the suite by file stem, its local files and mirrors checked row by row."""
    configs: dict[str, dict[str, Any]] = {}
    for name, spec in cfg.tasks.items():
        if spec.local is not None:
            configs[name] = local_task_config(name, spec)
        elif name == "mmlu":
            configs.update(mmlu_configs(spec, cfg.data_dir))
        elif name in STOCK_TASKS:
            configs[name] = stock_task_config(name, spec, cfg.data_dir)
        else:
            known = ", ".join(["mmlu", *STOCK_TASKS])
            raise ConfigError(
                f"eval.tasks.{name}: unknown task; known stock tasks: {known} — or give "
                f"eval.tasks.{name}.local (a multiple-choice task over a local file)"
            )
    return configs


def hub_datasets(configs: dict[str, dict[str, Any]]) -> set[str]:
    """The Hugging Face hub datasets the task configs read (those without a local file or mirror)."""
    paths = {config.get("dataset_path") or stock_config(Path(config["include"])).get("dataset_path")
             for config in configs.values() if "group" not in config}
    return {path for path in paths if path and path not in MIRROR_BUILDERS.values()}


def dataset_cached(repo: str) -> bool:
    """Whether `datasets` can load hub dataset `repo` offline: its prepared copy under
    HF_DATASETS_CACHE (``namespace___name/<config>/<version>/<hash>``) or its files in the hub cache."""
    from datasets import config as datasets_config
    from datasets.naming import camelcase_to_snakecase
    from huggingface_hub.constants import HF_HUB_CACHE

    *namespace, name = repo.split("/")
    prepared = Path(datasets_config.HF_DATASETS_CACHE) / "___".join([*namespace, camelcase_to_snakecase(name)])
    return any(prepared.glob("*/*/*")) or (Path(HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}").is_dir()


def data_files(config: dict[str, Any]) -> list[str]:
    return list((config.get("dataset_kwargs") or {}).get("data_files", {}).values())


def stock_config(path: Path) -> dict[str, Any]:
    """A stock task config with its includes merged (``!function`` values left as paths)."""
    return load_yaml(path, resolve_func=False)


def derived_config(name: str, stock_path: Path, spec: TaskSpec, mirror: Path | None) -> dict[str, Any]:
    """``include:`` the stock YAML; override shots, generation length and (with a mirror) the data.

    `name` is the task's key in ``eval.tasks`` (named in errors)."""
    stock = stock_config(stock_path)
    config: dict[str, Any] = {"include": str(stock_path)}
    shots = spec.num_fewshot if spec.num_fewshot is not None else int(stock.get("num_fewshot") or 0)
    if spec.num_fewshot is not None:
        config["num_fewshot"] = spec.num_fewshot
    if spec.max_gen_toks is not None:
        if stock.get("output_type") != "generate_until":
            raise ConfigError(
                f"eval.tasks.{name}.max_gen_toks applies to generative tasks; "
                f"{stock['task']} is {stock.get('output_type')}"
            )
        config["generation_kwargs"] = {
            **stock.get("generation_kwargs", {}),
            "max_gen_toks": spec.max_gen_toks,
        }
    if mirror is not None:
        config.update(mirrored_dataset(stock, mirror, shots))
    return config


def stock_task_config(name: str, spec: TaskSpec, data_dir: str | None) -> dict[str, Any]:
    mirror = Path(data_dir).resolve() / name if data_dir else None
    return derived_config(name, STOCK_ROOT / STOCK_TASKS[name], spec, mirror)


def mmlu_configs(spec: TaskSpec, data_dir: str | None) -> dict[str, dict[str, Any]]:
    """One config per subject (those in the mirror, else all 57) plus the ``mmlu`` group."""
    stock_subjects = sorted(path.stem.removeprefix("mmlu_") for path in MMLU_DIR.glob("mmlu_*.yaml"))
    if data_dir is None:
        subjects = stock_subjects
    else:
        root = Path(data_dir).resolve() / "mmlu"
        subjects = sorted(path.name for path in root.iterdir() if path.is_dir()) if root.is_dir() else []
        unknown = sorted(set(subjects) - set(stock_subjects))
        if not subjects or unknown:
            raise DataError(
                f"eval.data_dir: {root} must hold one folder per MMLU subject "
                f"({'unknown: ' + ', '.join(unknown) if unknown else 'found none'}); "
                f"subjects: {', '.join(stock_subjects)}"
            )
    configs = {
        f"mmlu_{subject}": derived_config(
            "mmlu",
            MMLU_DIR / f"mmlu_{subject}.yaml",
            spec,
            Path(data_dir).resolve() / "mmlu" / subject if data_dir else None,
        )
        for subject in subjects
    }
    group = stock_config(MMLU_DIR / "_mmlu.yaml")
    configs["mmlu"] = {
        "group": "mmlu",
        "task": list(configs),
        "aggregate_metric_list": group["aggregate_metric_list"],
        "metadata": group["metadata"],
    }
    return configs


def local_task_config(name: str, spec: TaskSpec) -> dict[str, Any]:
    """A multiple-choice task over a local file (`LocalTaskData`), checked row by row first."""
    data = spec.local
    assert data is not None
    key = f"eval.tasks.{name}.local"
    if not data.choices:
        raise ConfigError(f"{key}.choices is empty; list the answer words, e.g. [computers, food, law]")
    shots = spec.num_fewshot or 0
    if shots > 0 and not data.train:
        raise ConfigError(f"{key}.train is null but num_fewshot={shots}; give a file of few-shot examples")
    files = {"test": local_file(data.test, f"{key}.test")}
    if data.train and shots > 0:
        files["train"] = local_file(data.train, f"{key}.train")
    builders = {MIRROR_BUILDERS[path.suffix] for path in files.values()}
    if len(builders) > 1:
        raise ConfigError(
            f"{key}: test and train files must share one format, got {', '.join(map(str, files.values()))}"
        )
    fields = template_fields(data.prompt_template, f"{key}.prompt_template")
    for split, path in files.items():
        check_local_rows(path, f"{key}.{split}", fields, data.label_field, (f"{key}.choices", data.choices))
    config: dict[str, Any] = {
        "task": name,
        "dataset_path": builders.pop(),
        "dataset_kwargs": {"data_files": {split: str(path) for split, path in files.items()}},
        "test_split": "test",
        "training_split": "train" if "train" in files else None,
        "output_type": "multiple_choice",
        "doc_to_text": format_to_jinja(data.prompt_template),
        "doc_to_target": data.label_field,
        "doc_to_choice": list(data.choices),
        "num_fewshot": shots,
        "metric_list": [
            {"metric": metric} for metric in spec.metrics or ["acc"]
        ],  # lm-eval's own aggregations
        "metadata": {"version": data.version},
    }
    return config


def local_file(source: str, key: str) -> Path:
    if not source:
        raise ConfigError(f"{key} is empty; give the path of a json/jsonl/parquet file")
    path = next((path for path in candidate_paths(source, None) if path.is_file()), None)
    if path is None:
        raise DataError(f"{key}: file {source!r} not found")
    if path.suffix not in MIRROR_BUILDERS:
        raise DataError(f"{key}: {source!r} is not {', '.join(MIRROR_BUILDERS)}")
    return path.resolve()


def template_fields(template: str, key: str) -> list[str]:
    """The row fields a ``str.format`` template reads (plain ``{name}`` only)."""
    fields = []
    for _, name, spec, conversion in Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ConfigError(f"{key}: use plain {{field}} placeholders, got {template!r}")
        fields.append(name)
    return fields


def format_to_jinja(template: str) -> str:
    """The Jinja template lm-eval renders for a ``str.format`` template: ``{text}`` -> ``{{ text }}``;
    literal text holding braces is wrapped in ``{% raw %}``."""
    parts, literal = [], ""
    for text, name, _, _ in Formatter().parse(template):
        literal += text
        if name is not None:
            parts += [jinja_literal(literal), f"{{{{ {name} }}}}"]
            literal = ""
    return "".join([*parts, jinja_literal(literal)])


def jinja_literal(text: str) -> str:
    return f"{{% raw %}}{text}{{% endraw %}}" if "{" in text or "}" in text else text


def check_local_rows(
    path: Path, key: str, fields: list[str], label_field: str, choices: tuple[str, list[str]]
) -> None:
    """Every row of the file at config key `key` has the template's fields and a label among the
    choices (or a valid index); `choices` is (its config key, the answer words)."""
    choices_key, choices = choices
    table = load_rows(str(path), key=key)
    for index, row in enumerate(table.rows):
        missing = [name for name in [*fields, label_field] if name not in row]
        if missing:
            raise DataError(f"{table.location(index)}: missing field(s) {', '.join(missing)} ({key})")
        label = row[label_field]
        valid_index = isinstance(label, int) and 0 <= label < len(choices)
        if label not in choices and not valid_index:
            raise DataError(
                f"{table.location(index)}: {label_field}={label!r} is not one of the choices "
                f"{', '.join(choices)} ({choices_key}; file {key})"
            )
