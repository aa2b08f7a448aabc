"""Run outputs: the stock PEFT adapter, results.json (docs/EVALUATION.md §2), summary.md, the loss curve."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning as L
import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from ctrlora.atomic import staged, write_text_atomic
from ctrlora.config import TrainConfig
from ctrlora.evaluation.sections import task_rows
from ctrlora.lit import RunStats
from ctrlora.methods.base import ALLOCATION_FILE, HEATMAP_FILE, Method, trainable_parameter_count
from ctrlora.plots import loss_curve, rank_heatmap
from ctrlora.process_ranks import is_rank_zero

# keys that say where a run writes, logs or caches, and how it reports progress, not what it computes
NON_SEMANTIC_KEYS = (
    "run_dir", "resume", "overwrite", "logger", "trainer.progress_bar", "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps", "data.num_workers", "curvature.cache_dir", "eval.cache_dir",
    "eval.data_dir",
)
PACKAGES = ("torch", "transformers", "peft", "lightning", "lm_eval", "ctrlora")


def run_name(cfg: TrainConfig) -> str:
    return f"{cfg.model.name}-{cfg.method.name}-{cfg.data.name}-s{cfg.seed}"


def semantic_config(cfg: TrainConfig) -> dict[str, Any]:
    """The resolved config without `NON_SEMANTIC_KEYS` (dotted paths): what the run computes."""
    container = asdict(cfg)
    for key in NON_SEMANTIC_KEYS:
        *parents, leaf = key.split(".")
        section = container
        for parent in parents:
            section = section[parent]
        section.pop(leaf)
    return container


def config_hash(cfg: TrainConfig) -> str:
    """The experiment's identity: sha256 of `semantic_config`, so the same experiment logged elsewhere,
    checkpointed more often or resumed hashes the same."""
    return hashlib.sha256(json.dumps(semantic_config(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def changed_keys(before: TrainConfig, after: TrainConfig) -> list[str]:
    """The dotted keys whose value in `semantic_config` differs between two configs (or is in one only)."""

    def flat(value: Any, key: str = "") -> dict[str, Any]:
        if not isinstance(value, dict) or not value:
            return {key: value}
        return {dotted: item for name, child in value.items() for dotted, item in flat(child, f"{key}.{name}" if key else name).items()}

    old, new = flat(semantic_config(before)), flat(semantic_config(after))
    return sorted(key for key in old.keys() | new.keys() if old.get(key, KeyError) != new.get(key, KeyError))


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except Exception:  # noqa: BLE001 — a missing package is reported as None
            versions[name] = None
    return versions


def replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written `staging` dir onto `target` (so a crash never leaves it half-written)."""
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def save_adapter(
    method: Method, model: PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Stock PEFT format (adapter_config.json + adapter_model.safetensors) plus the tokenizer.

    `state_dict`: the adapter gathered from FSDP shards (`ctrlora.fsdp.gather_adapter_state`), which
    PEFT writes instead of reading the sharded model.
    """
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    if state_dict is None:
        method.save_adapter(model, staging)
    else:
        model.save_pretrained(staging, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    replace_dir(staging, out_dir)


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a metrics CSV; none when the file does not exist."""
    if not path.exists():
        return []
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    """Write a metrics CSV atomically (columns: the union of the rows' keys)."""
    columns = sorted({key for row in rows for key in row})
    with staged(path) as partial, open(partial, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def splice_rows(earlier: list[dict[str, str]], later: list[dict[str, str]], from_step: int) -> list[dict[str, str]]:
    """The earlier rows logged before `from_step`, then the later rows (which restart there)."""
    return [row for row in earlier if int(row["step"]) < from_step] + later


def set_aside_metrics(run_dir: Path) -> Path | None:
    """Before a resumed fit: move metrics.csv aside (Lightning's CSV logger would delete it).

    When an earlier resumed attempt was killed before its merge, its rows (which start at the step
    it resumed from) are spliced onto the history already set aside, so no attempt's rows are lost.
    """
    metrics, previous = run_dir / "metrics.csv", run_dir / "metrics.before-resume.csv"
    if metrics.exists() and previous.exists():
        later = read_rows(metrics)
        if later:
            first_step = min(int(row["step"]) for row in later)
            write_rows(previous, splice_rows(read_rows(previous), later, first_step))
        metrics.unlink()
    elif metrics.exists():
        os.replace(metrics, previous)
    return previous if previous.exists() else None


def merge_resumed_metrics(run_dir: Path, previous: Path, resumed_from_step: int) -> None:
    """metrics.csv = the earlier rows logged before the resumed checkpoint's step + the new rows."""
    metrics = run_dir / "metrics.csv"
    write_rows(metrics, splice_rows(read_rows(previous), read_rows(metrics), resumed_from_step))
    previous.unlink()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically: a reader sees the old file or the complete new one."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def build_results(
    cfg: TrainConfig, *, method: Method, model: PeftModel, stats: RunStats, trainer: L.Trainer,
    started_at: str, wall_s: float,
) -> dict[str, Any]:
    budget = {**method.describe(), "trainable_params": trainable_parameter_count(model)}
    train = {"steps": trainer.global_step, **stats.summary(), "loss_curve": "loss_curve.png"}
    summary = method.curvature_summary()
    if summary is not None:
        spent = summary.get("calibration_s", 0.0) + summary.get("refresh_s", 0.0)
        train["curvature"] = {**summary, "overhead_frac": round(spent / wall_s, 4) if wall_s > 0 else None}
    results: dict[str, Any] = {
        "run": {
            "method": cfg.method.name, "model": cfg.model.name, "data": cfg.data.name,
            "eval_suite": cfg.eval.suite, "seed": cfg.seed, "budget": budget,
            "config_hash": config_hash(cfg), "run_dir": str(cfg.run_dir),
            "started_at": started_at, "wall_s": round(wall_s, 3),
        },
        "meta": {
            "versions": package_versions(), "git_sha": git_sha(),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "world_size": trainer.world_size, "precision": str(trainer.precision),
        },
        "train": train,
    }
    allocation = method.allocation_summary()
    if allocation is not None:
        results["allocation"] = allocation
    return results


def write_allocation(method: Method, run_dir: Path) -> None:
    """`allocation.json` (atomically) and `rank_heatmap.png` of a method that allocates ranks, rank 0 only:
    after `prepare` and again at the end of training (re-allocations change the record)."""
    record = method.allocation_record()
    if record is None or not is_rank_zero():
        return
    write_text_atomic(run_dir / ALLOCATION_FILE, json.dumps(record, indent=2, default=_json_default) + "\n")
    ranks = {name: module["rank"] for name, module in record["modules"].items()}
    rank_heatmap(ranks, run_dir / HEATMAP_FILE, title=f"{record['method']}: LoRA rank per module")


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def summary_markdown(results: dict[str, Any]) -> str:
    run, train = results["run"], results["train"]
    budget = run["budget"]
    step = train["step_time_s"]["median"]
    lines = [
        f"# {run['method']} on {run['model']} ({run['data']}, seed {run['seed']})",
        "",
        "| item | value |",
        "|---|---|",
        f"| budget rank r̄ | {budget['rank'] if budget['rank'] is not None else '– (no adapter)'} |",
        f"| trainable / target params | {budget['trainable_params']:,} / {budget['target_params']:,} |",
        f"| steps | {train['steps']} |",
        f"| final loss | {train['final_loss']:.4f} |" if train["final_loss"] is not None else "| final loss | – |",
        f"| median step time | {step * 1e3:.1f} ms |" if step else "| median step time | – |",
        f"| tokens/s | {train['tokens_per_s']:.0f} |" if train["tokens_per_s"] else "| tokens/s | – |",
        f"| wall time | {run['wall_s']:.1f} s |",
    ]
    val = results.get("val") or {}
    lines += [
        f"| validation {metric} ({val['examples']} examples) | {value:.4f} |"
        for metric, value in val.items() if metric != "examples"
    ]
    evaluation = results.get("eval", {})
    base = evaluation.get("base", {})
    for task, metrics in task_rows(evaluation).items():
        for metric, value in metrics.items():
            base_value = base.get(task, {}).get(metric, {}).get("value")
            base_text = f" (base {base_value:.4f})" if base_value is not None else ""
            stderr = f" ± {value['stderr']:.4f}" if value.get("stderr") is not None else ""
            lines.append(f"| {task} {metric} | {value['value']:.4f}{stderr}{base_text} |")
    return "\n".join(lines) + "\n"


def logged_losses(run_dir: Path) -> tuple[list[int], list[float]]:
    """(step, train/loss) pairs from metrics.csv, whole history included after a resume."""
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = [row for row in csv.DictReader(file) if row.get("train/loss")]
    return [int(row["step"]) + 1 for row in rows], [float(row["train/loss"]) for row in rows]


def write_outputs(run_dir: Path, results: dict[str, Any]) -> None:
    """The loss curve and summary.md first, results.json last (its presence marks a finished run)."""
    loss_curve(*logged_losses(run_dir), run_dir / "loss_curve.png")
    (run_dir / "summary.md").write_text(summary_markdown(results))
    write_json(run_dir / "results.json", results)
