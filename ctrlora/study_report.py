"""What a study selected and what it cost, from the files its runs wrote (``scripts/study.py STUDY --report``).

Per (variant, task), in the study file's order: the settings the search chose (the selected trial's
overrides that neither the study's experiment, tasks, variants nor overrides set), the validation score
that chose them, the trial count, and the run time of its tuning trials and of its seed runs: the sum of
``run.wall_s`` over their ``results.json`` (a run resumed from a checkpoint counts its earlier processes
up to that checkpoint; time lost after it does not count). With ``jobs`` runs at a time, the study needs
about Σ run time / ``jobs`` of the machine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ctrlora.errors import ConfigError
from ctrlora.study import Study, fixed_overrides, override_key


def tuned_settings(study: Study, overrides: list[str]) -> list[str]:
    """The selected overrides that the search set (``optim.lr=0.00236`` -> ``lr 0.0024``), in their order."""
    fixed = {"experiment", *map(override_key, fixed_overrides(study))}
    chosen = [item.split("=", 1) for item in overrides if override_key(item) not in fixed]
    return [f"{key.rsplit('.', 1)[-1]} {short_value(value)}" for key, value in chosen]


def short_value(value: str) -> str:
    """A number to two significant digits; anything else (a categorical choice) as it is."""
    try:
        return f"{float(value):.2g}"
    except ValueError:
        return value


def run_hours(folder: Path) -> tuple[int, float]:
    """How many runs under `folder` wrote results.json, and the sum of their ``run.wall_s`` in hours."""
    walls = [json.loads(path.read_text())["run"]["wall_s"] for path in folder.rglob("results.json")]
    return len(walls), sum(walls) / 3600


def study_report(study: Study, root: Path, jobs: int = 2) -> str:
    """The selections and run times of the study under `root` / ``study.out`` as markdown (see the module)."""
    out = root / study.out
    try:
        summary: dict[str, Any] = json.loads((out / "study.json").read_text())
    except FileNotFoundError:
        raise ConfigError(f"{out / 'study.json'} does not exist: the study has not run yet (scripts/study.py STUDY)") from None
    records = {(pair["task"], pair["variant"]): pair for pair in summary["pairs"]}
    lines = ["| row | task | selected | validation | trials | tuning (h) | seed runs (count, h) |", "|---|---|---|---|---|---|---|"]
    total_runs, total_hours, finished = 0, 0.0, 0
    for variant in study.variants:
        for task in study.tasks:
            record = records.get((task, variant))
            if record is None or "val" not in record:
                continue
            finished += 1
            tune_runs, tune_hours = run_hours(out / "tune" / task / variant)
            seed_runs, seed_hours = run_hours(out / "seeds" / task / variant)
            total_runs, total_hours = total_runs + tune_runs + seed_runs, total_hours + tune_hours + seed_hours
            lines.append(f"| {variant} | {task} | {', '.join(tuned_settings(study, record['overrides'])) or '–'} |"
                         f" {record['val']:.3f} | {record['trials']} | {tune_hours:.2f} | {seed_runs}, {seed_hours:.2f} |")
    invocations = summary.get("invocations", [])
    lines += ["", f"{finished} of {len(study.variants) * len(study.tasks)} (variant, task) pairs selected; {total_runs} runs,"
              f" {total_hours:.1f} h of run time in all, about {total_hours / jobs:.1f} h at {jobs} runs at a time;"
              f" {len(invocations)} invocations of the study, {sum(i['wall_h'] for i in invocations):.1f} h of wall time"
              " up to each one's last finished pair."]
    return "\n".join(lines) + "\n"
