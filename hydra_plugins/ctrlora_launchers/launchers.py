"""ctrlora's Hydra launchers: `hydra/launcher=local` and `hydra/launcher=slurm`.

Hydra finds launchers only in the `hydra_plugins` namespace package, hence this module outside
`ctrlora/`. Configs: `conf/hydra/launcher/{local,slurm}.yaml`.

`LocalProcessLauncher` runs each job of a sweep as its own `python train.py <job overrides>
hydra.run.dir=<job dir>` process, one after another. A job is then exactly a single run: DDP/FSDP
start their rank processes as they do outside a sweep (Lightning re-runs `sys.argv`, which inside
Hydra's in-process basic launcher is the whole sweep again), a crash or a non-finite loss in one
job neither kills nor leaks memory into the next, and the sweep fails at the end if any job did.
The jobs share the W&B group `WANDB_RUN_GROUP` = the sweep dir's name (unless already set). A job's
return value — the validation metric `train.py` returns, a sweeper's objective — is read back from
its results.json.

`ResumingSlurmLauncher` is submitit's SLURM launcher (one array task per run) whose requeued jobs
resume: when SLURM signals a job near its time limit or on preemption, submitit requeues it with
the arguments `checkpoint()` returns, here the job's overrides plus `resume=true`, so the run
continues from its newest checkpoint instead of refusing to touch an unfinished run dir
(`hydra.launcher.max_num_timeout` bounds the number of requeues).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)


def quoted(value: str) -> str:
    """A Hydra override value in double quotes (paths hold `=` and `,`, which Hydra would parse)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def script_command() -> list[str]:
    """How this program was started: `python path/to/train.py` or `python -m package.module`."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None:
        return [sys.executable, "-m", spec.name]
    return [sys.executable, os.path.abspath(sys.argv[0])]


def job_command(overrides: Sequence[str], job_dir: Path) -> list[str]:
    """The single-run command of one sweep job, writing into `job_dir`."""
    return [*script_command(), *overrides, f"hydra.run.dir={quoted(str(job_dir))}"]


class LocalProcessLauncher(Launcher):
    """Run a sweep's jobs one after another, each as its own single-run process."""

    def __init__(self) -> None:
        super().__init__()
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "WANDB_RUN_GROUP": os.environ.get("WANDB_RUN_GROUP", sweep_dir.name)}
        log.info("Launching %d jobs locally, one process each", len(job_overrides))
        returns = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            returns.append(self.run_job(idx, list(overrides), env))
        return returns

    def run_job(self, idx: int, overrides: list[str], env: dict[str, str]) -> JobReturn:
        assert self.config is not None and self.hydra_context is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)  # resolves ${hydra:job.override_dirname}
        job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        log.info("\t#%d : %s -> %s", idx, " ".join(filter_overrides(overrides)), job_dir)
        code = subprocess.run(job_command(overrides, job_dir), env=env, check=False).returncode
        failure = (
            None if code == 0 else RuntimeError(f"job #{idx} ({' '.join(overrides)}) exited with {code}")
        )
        return JobReturn(
            overrides=overrides,
            cfg=sweep_config,
            hydra_cfg=sweep_config,
            working_dir=str(job_dir),
            task_name=str(sweep_config.hydra.job.name),
            status=JobStatus.COMPLETED if failure is None else JobStatus.FAILED,
            _return_value=failure if failure is not None else job_objective(job_dir, sweep_config),
        )


def job_objective(job_dir: Path, config: DictConfig) -> float | None:
    """What the job's `train.py` returned, read back from its results.json (a sweeper's objective)."""
    from ctrlora.evaluation.validation import objective_value

    results = job_dir / "results.json"
    if not results.exists():
        return None
    return objective_value(json.loads(results.read_text()), config.eval.val_metric, config.model.task)


def with_resume(overrides: Sequence[str]) -> list[str]:
    """The overrides with `resume=true` (any earlier resume override replaced)."""
    kept = [item for item in overrides if item.split("=", 1)[0].lstrip("+~") != "resume"]
    return [*kept, "resume=true"]


class ResumingSlurmLauncher(SlurmLauncher):
    """submitit's SLURM launcher; a requeued job (time limit, preemption) resumes its run."""

    def checkpoint(self, sweep_overrides: Sequence[str], *args: Any, **kwargs: Any) -> Any:
        return super().checkpoint(with_resume(sweep_overrides), *args, **kwargs)
