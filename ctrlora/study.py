"""A fair comparison from one study file (docs/EVALUATION.md §4.1): per task and variant, tune, select, seeds.

    python scripts/study.py experiments/nlu_minilm/study.yaml             # resumable; --jobs 2
    python scripts/aggregate.py experiments/nlu_minilm/runs/seeds --variants

The study file (YAML) names the output folder ``out``, the ``experiment`` preset, the ``tasks`` and
the ``variants`` (each a name -> a list of train.py overrides; a variant's name is its row label),
the trial budget ``trials`` and the ``seeds``; ``overrides`` go to every run, ``tune_overrides`` to the
tuning trials alone (``[eval=none]``: a trial scores the validation split only, not the test split).
For every (variant, task), variants in the file's
order and all of a variant's tasks before the next variant:

1. tune: ``train.py -m hydra/sweeper=optuna`` with ``trials`` seeded-TPE trials over the method's
   own search space (``method.search``), scored on the validation split, at seed ``tune_seed``;
   into ``OUT/tune/<task>/<variant>``;
2. select: its best trial on validation (ctrlora.evaluation.selection; test scores are never read),
   written to ``OUT/tune/<task>/<variant>/selected/``;
3. seeds: the best trial's overrides at every seed, into ``OUT/seeds/<task>/<variant>/seed=<s>``.

Every command runs with ``resume=true`` and the local launcher (one process per run), so running
the study again skips finished runs and continues a cut-off one from its checkpoint, and the seeded
TPE proposes the same trials again (the finished ones return their stored objective); a pair whose
record in study.json has no error, the study's trial count and seed runs that all wrote results.json
is not entered again. Raising ``trials`` continues every sweep where it stopped; where the larger
budget selects other settings, the old seed runs move to ``OUT/superseded/<task>/<variant>/`` and
the seeds run again. ``--jobs`` (variant, task) pairs run at once, each with ``OMP_NUM_THREADS`` =
cores / jobs. Each pair's output goes to ``OUT/logs/<task>-<variant>.log``; ``OUT/study.json`` records the selections and the wall
time of every step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from ctrlora.errors import ConfigError
from ctrlora.evaluation.selection import best_trials, seed_run_overrides

STUDY_KEYS = {"out", "experiment", "tasks", "variants", "trials", "seeds", "tune_seed", "overrides", "tune_overrides"}


@dataclass(frozen=True)
class Study:
    """A parsed study file."""

    out: Path
    experiment: str
    tasks: dict[str, list[str]]
    variants: dict[str, list[str]]
    trials: int
    seeds: list[int]
    tune_seed: int = 0
    overrides: list[str] = field(default_factory=list)  # for every run (e.g. trainer.progress_bar=false)
    tune_overrides: list[str] = field(default_factory=list)  # for the tuning trials only (e.g. eval=none)


def load_study(path: Path) -> Study:
    """Read and check a study file; unknown or missing keys name the file and the valid keys."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study file is a mapping with keys {sorted(STUDY_KEYS)}")
    unknown, missing = set(raw) - STUDY_KEYS, {"out", "experiment", "tasks", "variants", "trials", "seeds"} - set(raw)
    if unknown or missing:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)};"
                          f" valid keys: {sorted(STUDY_KEYS)}")
    study = Study(out=Path(raw["out"]), experiment=raw["experiment"], tasks=raw["tasks"], variants=raw["variants"],
                  trials=int(raw["trials"]), seeds=[int(s) for s in raw["seeds"]],
                  tune_seed=int(raw.get("tune_seed", 0)), overrides=list(raw.get("overrides", [])),
                  tune_overrides=list(raw.get("tune_overrides", [])))
    if shared := sorted({override_key(item) for item in study.tune_overrides} & {override_key(item) for item in fixed_overrides(study)}):
        raise ConfigError(f"{path}: tune_overrides set {shared}, which overrides, a task or a variant also set; the seed"
                          " runs drop every tune_overrides key, so a key must be in one place only")
    return study


def fixed_overrides(study: Study) -> list[str]:
    """What the study file sets for its runs besides the experiment: ``overrides``, then every task's and variant's."""
    return [*study.overrides, *(item for items in [*study.tasks.values(), *study.variants.values()] for item in items)]


def override_key(item: str) -> str:
    """The config key of a command-line override (``+eval=none`` -> ``eval``)."""
    return item.split("=", 1)[0].lstrip("+~")


def seed_overrides(study: Study, trial_overrides: list[str]) -> list[str]:
    """The selected trial's overrides for the seed runs: without what the seed runs set themselves and
    without the study's tuning-only keys (matched by key: the sweeper rewrites values, e.g. false -> False)."""
    tune_keys = {override_key(item) for item in study.tune_overrides}
    return [item for item in trial_overrides if override_key(item) not in tune_keys]


def tune_command(study: Study, task: str, variant: str) -> list[str]:
    """The seeded-TPE sweep of one (variant, task) on the validation split."""
    return [
        sys.executable, "train.py", "-m", "hydra/sweeper=optuna", "hydra/launcher=local",
        f"experiment={study.experiment}", *study.tasks[task], *study.variants[variant], *study.overrides,
        *study.tune_overrides, f"seed={study.tune_seed}", f"hydra.sweeper.n_trials={study.trials}",
        f"hydra.sweep.dir={study.out / 'tune' / task / variant}", "resume=true",
    ]


def seeds_command(study: Study, task: str, variant: str, selected: list[str]) -> list[str]:
    """The runs at the selected overrides, one per seed."""
    return [
        sys.executable, "train.py", "-m", "hydra/launcher=local", *selected,
        f"seed={','.join(map(str, study.seeds))}", f"hydra.sweep.dir={study.out / 'seeds' / task / variant}",
        'hydra.sweep.subdir="seed=${seed}"', "resume=true",
    ]


def pair_finished(study: Study, record: dict[str, Any] | None) -> bool:
    """Whether an earlier invocation finished this pair: recorded without error after the study's
    whole trial budget (a raised ``trials`` continues the sweep), every seed run scored."""
    if record is None or "error" in record or record.get("trials") != study.trials:
        return False
    seeds_dir = study.out / "seeds" / record["task"] / record["variant"]
    return all((seeds_dir / f"seed={seed}" / "results.json").exists() for seed in study.seeds)


def set_aside_other_settings(study: Study, task: str, variant: str, selected: list[str]) -> Path | None:
    """Move the pair's seed runs made at settings other than `selected` (chosen by an earlier, smaller
    trial budget) to ``OUT/superseded/<task>/<variant>/<time>``, out of the table's way; that folder."""
    seeds_dir = study.out / "seeds" / task / variant
    ran = [yaml.safe_load(path.read_text()) for path in seeds_dir.glob("seed=*/.hydra/overrides.yaml")]
    own = ("seed=", "resume=")
    if all({item for item in overrides if not item.startswith(own)} == set(selected) for overrides in ran):
        return None
    target = study.out / "superseded" / task / variant / time.strftime("%Y%m%dT%H%M%S")
    target.parent.mkdir(parents=True, exist_ok=True)
    seeds_dir.rename(target)
    return target


def run_pair(study: Study, task: str, variant: str, env: dict[str, str], root: Path) -> dict[str, Any]:
    """Tune, select and run the seeds of one (variant, task); its record for study.json."""
    log_path = study.out / "logs" / f"{task}-{variant}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"task": task, "variant": variant}
    with log_path.open("a") as log:
        start = time.perf_counter()
        tuned = subprocess.run(tune_command(study, task, variant), cwd=root, env=env, stdout=log, stderr=log)
        record["tune_s"] = round(time.perf_counter() - start, 1)
        best = best_trials(study.out / "tune" / task / variant)
        if tuned.returncode != 0 or len(best) != 1:
            return {**record, "error": f"tuning exited with {tuned.returncode}, {len(best)} selectable groups; see {log_path}"}
        ((trial, count),) = best.values()
        selected = seed_overrides(study, seed_run_overrides(trial))
        record.update(best_run=str(trial.run_dir), trials=count, val_metric=trial.metric, val=trial.value, overrides=selected)
        if superseded := set_aside_other_settings(study, task, variant, selected):
            record["superseded"] = str(superseded)
        start = time.perf_counter()
        seeded = subprocess.run(seeds_command(study, task, variant, selected), cwd=root, env=env, stdout=log, stderr=log)
        record["seeds_s"] = round(time.perf_counter() - start, 1)
        if seeded.returncode != 0:
            record["error"] = f"seed runs exited with {seeded.returncode}; see {log_path}"
    return record


def kept_files(runs: Path, out: Path, root: Path) -> list[Path]:
    """The files under `runs` (relative to it) that git keeps once they lie under `out`, a path relative
    to the repository `root`: its ``.gitignore`` decides (``git check-ignore``)."""
    files = sorted(path.relative_to(runs) for path in runs.rglob("*") if path.is_file())
    listed = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=root, capture_output=True, text=True,
                            input="\n".join(str(out / path) for path in files))
    ignored = set(listed.stdout.splitlines())
    return [path for path in files if str(out / path) not in ignored]


def keep_from(source: Path, dest: Path, out: Path, root: Path) -> int:
    """Copy the `kept_files` of a study output `source` (e.g. the worktree a study runs in) to `dest`, with
    `source`'s absolute path in them (``run_dir``) written as `out`, so the files git keeps hold no
    machine's paths; how many were copied."""
    source = source.resolve()
    kept = kept_files(source, out, root)
    for path in kept:
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).write_text((source / path).read_text().replace(str(source), str(out)))
    return len(kept)


def run_study(study: Study, jobs: int, root: Path, console: Console) -> list[dict[str, Any]]:
    """Every (variant, task) pair, `jobs` at a time; writes OUT/study.json after each pair (the pairs'
    records, replacing those of an earlier invocation, and every invocation's wall time)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))}
    pairs = [(task, variant) for variant in study.variants for task in study.tasks]
    summary_path = study.out / "study.json"
    earlier = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    invocations = [*earlier.get("invocations", []), {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_h": 0.0}]
    by_pair = {(r["task"], r["variant"]): r for r in earlier.get("pairs", [])}
    records: list[dict[str, Any]] = []
    lock, start = threading.Lock(), time.perf_counter()

    def one(pair: tuple[str, str]) -> None:
        finished = pair_finished(study, by_pair.get(pair))
        record = by_pair[pair] if finished else run_pair(study, *pair, env=env, root=root)
        with lock:
            records.append(record)
            status = f"[red]{record['error']}[/red]" if "error" in record else f"validation {record['val']:.4f}"
            status += " (finished earlier)" if finished else ""
            console.print(f"[{len(records)}/{len(pairs)}] {pair[1]} on {pair[0]}: {status}"
                          f" ({(time.perf_counter() - start) / 3600:.2f} h so far)")
            by_pair[pair] = record
            invocations[-1]["wall_h"] = round((time.perf_counter() - start) / 3600, 3)
            summary = {"study": {**study.__dict__, "out": str(study.out)}, "pairs": list(by_pair.values()),
                       "invocations": invocations}
            summary_path.write_text(json.dumps(summary, indent=2) + "\n")

    study.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, pairs))
    return records
