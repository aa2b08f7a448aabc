"""Pick each method's best trial of a tuning sweep by its validation score (docs/EVALUATION.md §4.1).

A trial is a finished run dir under the sweep dir: its ``results.json`` (the ``val`` section), its
``config.yaml`` (which ``eval.val_metric`` was optimised, for which task) and Hydra's
``.hydra/overrides.yaml`` (the command-line overrides that made it). Trials are grouped by
(model, method, data); the best has the highest validation metric (the lowest for a loss), the
earliest trial winning a tie. Test scores are never read.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from ctrlora.evaluation.config import objective_metric

SEED_RUN_EXCLUDED = ("seed", "hydra.", "run_dir", "resume", "overwrite")  # set by the seed runs themselves


@dataclass(frozen=True)
class Trial:
    """One finished trial of a sweep."""

    run_dir: Path
    started_at: str  # ISO time: the earlier trial wins a tie
    group: tuple[str, str, str]  # (model, method, data)
    metric: str  # the validation metric it was scored by
    value: float
    overrides: list[str]

    @property
    def lower_is_better(self) -> bool:
        return self.metric == "loss"


def load_trial(results_path: Path) -> Trial | None:
    """The trial of a run dir; None when it has no validation score (no split, or not finished)."""
    run_dir = results_path.parent
    results = json.loads(results_path.read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    metric = objective_metric(config["eval"]["val_metric"], config["model"]["task"])
    val = results.get("val") or {}
    if metric not in val:
        return None
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
    run = results["run"]
    group = (run["model"], run["method"], run["data"])
    return Trial(run_dir, run["started_at"], group, metric, float(val[metric]), list(overrides))


def best_trials(sweep_dir: Path) -> dict[tuple[str, str, str], tuple[Trial, int]]:
    """(model, method, data) -> (its best trial, how many trials it had)."""
    groups: dict[tuple[str, str, str], list[Trial]] = {}
    trials = [load_trial(path) for path in Path(sweep_dir).rglob("results.json")]
    for trial in sorted((t for t in trials if t is not None), key=lambda t: (t.started_at, str(t.run_dir))):
        groups.setdefault(trial.group, []).append(trial)
    return {
        group: (min(trials, key=lambda t: t.value if t.lower_is_better else -t.value), len(trials))
        for group, trials in groups.items()
    }


def seed_run_overrides(trial: Trial) -> list[str]:
    """The trial's overrides without those the seed runs set themselves (seed, run dirs, hydra.*)."""
    return [item for item in trial.overrides if not item.lstrip("+~").startswith(SEED_RUN_EXCLUDED)]


def seed_run_command(trial: Trial, seeds: list[int], sweep_dir: str) -> str:
    """``python train.py -m <the trial's overrides> seed=<seeds> hydra.sweep.dir=<sweep_dir>``."""
    words = ["python", "train.py", "-m", *seed_run_overrides(trial), f"seed={','.join(map(str, seeds))}",
             f"hydra.sweep.dir={sweep_dir}"]
    return " ".join(shlex.quote(word) for word in words)
