"""The ``eval`` section of results.json (docs/EVALUATION.md §2) — its shape, and merging two of them.

    {"<task>": {"<metric>": {"value": float, "stderr": float | None}, ...}, ...,
     "base": {"<task>": {...same shape...}},
     "versions": {"lm_eval": "0.4.13", "tasks": {task: version}, "num_fewshot": {task: n},
                  "samples": {task: n}, "limit": {task: eval.limit or None}, "suite": name,
                  "task_dir": generated YAML folder}}

Metric names are lm-eval's with the default filter dropped: ``acc``, ``acc_norm``,
``exact_match,strict-match``; encoder runs report ``accuracy``, ``macro_f1`` and ``mcc``.
"""

from __future__ import annotations

from typing import Any

RESERVED_KEYS = ("base", "versions")  # keys of the eval section that are not tasks


def task_rows(section: dict[str, Any]) -> dict[str, Any]:
    """The task entries of an ``eval`` section (without ``base`` and ``versions``)."""
    return {name: metrics for name, metrics in section.items() if name not in RESERVED_KEYS}


def limits(section: dict[str, Any]) -> dict[str, float | None]:
    """Per task of an ``eval`` section, the limit it was scored with (None: the whole split)."""
    recorded = section.get("versions", {}).get("limit") or {}
    return {task: recorded.get(task) for task in task_rows(section)}


def is_limited(section: dict[str, Any]) -> bool:
    """Whether any task of an ``eval`` section was scored on a limited part of its split."""
    return any(limit is not None for limit in limits(section).values())


def merge_eval_sections(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """New rows replace old rows of the same task (in the model's and the base row); versions merge."""
    merged = {**task_rows(old), **task_rows(new)}
    base = {**old.get("base", {}), **new.get("base", {})}
    if base:
        merged["base"] = base
    old_versions, new_versions = old.get("versions", {}), new.get("versions", {})
    versions = {**old_versions, **new_versions}
    for key, value in new_versions.items():
        if isinstance(value, dict) and isinstance(old_versions.get(key), dict):
            versions[key] = {**old_versions[key], **value}
    if versions:
        merged["versions"] = versions
    return merged
