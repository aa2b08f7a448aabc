"""The base model's row: the unadapted backbone on the same suite, computed once and cached.

The cache file ``<cache_root>/base_rows/<backbone key>/<suite>-<digest>.json`` is keyed by the
backbone, the suite, the harness version and everything else that changes the numbers: the
generated task YAMLs (shots, prompts, data paths), the bytes of every local data file, the
limits, the reported metrics, the seed and the context length.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ctrlora.atomic import write_text_atomic
from ctrlora.backbones import compute_dtype, resolve_source
from ctrlora.config import ModelConfig
from ctrlora.evaluation.config import EvalConfig
from ctrlora.evaluation.harness import Row, harness_version, limit_value
from ctrlora.evaluation.tasks import SuiteTasks


def backbone_key(model: ModelConfig, *, accelerator: str = "cpu", quantize_4bit: bool = False) -> str:
    """``<name>-<hash>``: the model name and a hash of where its weights load from, dtype and quantisation."""
    identity = {
        "source": resolve_source(model),
        "dtype": str(compute_dtype(model, accelerator)),
        "4bit": quantize_4bit,
    }
    return f"{model.name}-{sha256_of(identity)[:12]}"


def sha256_of(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_row_key(cfg: EvalConfig, tasks: SuiteTasks, base_model_key: str) -> dict[str, Any]:
    """Everything the base row's numbers depend on."""
    return {
        "backbone": base_model_key,
        "suite": cfg.suite,
        "lm_eval": harness_version(),
        "task_yamls": tasks.directory.name,  # a hash of the generated YAMLs
        "data": {str(path): file_digest(path) for path in tasks.data_files},
        "limits": {name: limit_value(spec.limit, cfg.limit) for name, spec in cfg.tasks.items()},
        "metrics": {name: list(spec.metrics) for name, spec in cfg.tasks.items()},
        "seed": cfg.seed,
        "max_length": cfg.max_length,
    }


def base_row_path(cache_root: Path, cfg: EvalConfig, key: dict[str, Any]) -> Path:
    return (
        Path(cache_root)
        / "base_rows"
        / safe_name(key["backbone"])
        / f"{safe_name(cfg.suite)}-{sha256_of(key)[:16]}.json"
    )


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def cached_base_row(
    cfg: EvalConfig,
    tasks: SuiteTasks,
    *,
    base_model_key: str,
    cache_root: Path,
    compute: Callable[[], tuple[Row, dict[str, Any]]],
) -> tuple[Row, dict[str, Any]]:
    """The cached (row, versions) for this key, else ``compute()``'s, written to the cache first."""
    key = base_row_key(cfg, tasks, base_model_key)
    path = base_row_path(cache_root, cfg, key)
    if path.exists():
        cached = json.loads(path.read_text())
        return cached["row"], cached["versions"]
    row, versions = compute()
    record = {"key": key, "row": row, "versions": versions}
    write_text_atomic(path, json.dumps(record, indent=2) + "\n", per_process=True)  # ranks/runs may race
    return row, versions
