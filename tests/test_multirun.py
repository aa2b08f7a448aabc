"""Sweeps: `-m` through `hydra/launcher=local` and submitit's local executor gives one run dir per run;
a multirun job never re-launches the sweep for its ranks; `hydra/launcher=slurm` and the paper-grid
preset compose into the SLURM array and the 192 runs they promise."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from conftest import ROOT, compose_config, with_test_defaults
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from ctrlora.config import TrainerConfig, validate_config
from ctrlora.errors import ConfigError
from ctrlora.process_ranks import adopt_submitit_ranks, process_rank
from ctrlora.trainers import build_trainer

SWEEP = [
    "seed=0,1",
    "eval=none",
    "trainer.max_steps=2",
    "trainer.checkpoint_every_n_steps=2",
    "trainer.progress_bar=false",
    "calibration.num_samples=32",
]


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "submitit_local"])
def test_multirun_writes_one_run_dir_per_run(tmp_path: Path, launcher: str) -> None:
    sweep_dir = tmp_path / "sweep"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "train.py",
        "-m",
        f"hydra/launcher={launcher}",
        f"hydra.sweep.dir={sweep_dir}",
        *with_test_defaults(SWEEP),
    ]
    subprocess.run(
        command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600
    )
    runs = sorted(path.parent for path in sweep_dir.rglob("results.json"))
    assert len(runs) == 2
    assert {json.loads((run / "results.json").read_text())["run"]["seed"] for run in runs} == {0, 1}
    for run in runs:
        assert OmegaConf.load(run / "config.yaml").run_dir == str(run)
        assert (run / ".hydra" / "overrides.yaml").exists()
    # <sweep>/<model>/<method>/<data>/<overrides>: runs of different methods never share a dir
    assert {run.relative_to(sweep_dir).parts[:3] for run in runs} == {("tiny-llama", "ctrlora", "fortune_topics")}
    bookkeeping = {"multirun.yaml", ".submitit"}
    assert {path.name for path in sweep_dir.iterdir()} - bookkeeping == {"tiny-llama"}


@pytest.fixture
def multirun_job() -> None:
    """Hydra's state inside a multirun job."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=with_test_defaults(["run_dir=x"]), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    yield
    HydraConfig.instance().cfg = None


DDP_ON_CPU = TrainerConfig(
    strategy="ddp", accelerator="cpu", devices=2, process_group_backend="gloo", progress_bar=False
)
SUBMITIT_TASK = {
    "SUBMITIT_EXECUTOR": "local",
    "SUBMITIT_LOCAL_JOB_ID": "4242",
    "SUBMITIT_LOCAL_NTASKS": "2",
    "SUBMITIT_LOCAL_JOB_NUM_NODES": "1",
    "SUBMITIT_LOCAL_NODEID": "0",
    "SUBMITIT_LOCAL_GLOBALID": "1",
    "SUBMITIT_LOCAL_LOCALID": "1",
}
EXPORTED = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def test_multirun_job_never_relaunches_the_sweep_for_its_ranks(
    tmp_path: Path, multirun_job: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="hydra/launcher=local"):  # Lightning would re-run the whole sweep
        build_trainer(DDP_ON_CPU, [], [], tmp_path)

    for name in EXPORTED:  # recorded as absent, so the test leaves no trace
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # the Trainer below sets it to 1
    for name, value in SUBMITIT_TASK.items():
        monkeypatch.setenv(name, value)
    adopt_submitit_ranks()  # the ranks submitit started become torch.distributed's
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")
    assert process_rank() == 1
    trainer = build_trainer(DDP_ON_CPU, [], [], tmp_path)
    assert trainer.strategy.cluster_environment.creates_processes_externally


def compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=with_test_defaults(overrides), return_hydra_config=True)


def test_slurm_launcher_submits_one_array_task_per_run_and_resumes_requeued_jobs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = compose_with_hydra(
        [
            "run_dir=x",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.gpus_per_node=4",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    HydraConfig.instance().set_config(cfg)
    try:
        launcher = instantiate(cfg.hydra.launcher)
        launcher.config = cfg
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "srun").write_text("#!/bin/sh\n")  # submitit checks it is on a SLURM host
        (tmp_path / "bin" / "srun").chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
        submitted = {}

        def map_array(executor: submitit.AutoExecutor, function: object, *arguments: list) -> list:
            submitted.update(executor=executor, function=function, jobs=list(zip(*arguments, strict=True)))
            return []

        monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
        launcher.launch([["seed=0"], ["seed=1"], ["seed=2"]], initial_job_idx=0)
    finally:
        HydraConfig.instance().cfg = None

    assert [job[0] for job in submitted["jobs"]] == [["seed=0"], ["seed=1"], ["seed=2"]]
    slurm = submitted["executor"]._executor
    script = slurm._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    for line in (
        "--partition=gpu",
        "--gpus-per-node=4",
        "--ntasks-per-node=4",
        "--time=1440",
        "--signal=USR2@300",
    ):
        assert f"#SBATCH {line}" in script, line
    assert slurm.max_num_timeout == 3 and slurm.parameters["array_parallelism"] == 32

    # a job signalled at its time limit is requeued as the same run with resume=true
    requeued = launcher.checkpoint(["seed=1", "resume=false"], "hydra.sweep.dir", 1, "job1", {})
    assert requeued.args[0] == ["seed=1", "resume=true"]


PAPER_GRID = {"model": 4, "method": 8, "seed": 3, "budget.ratio": 2}


def experiment(name: str) -> str:
    """`experiment=<name>` once conf/train.yaml's defaults hold an `experiment` slot, `+experiment=` before."""
    defaults = OmegaConf.load(ROOT / "conf" / "train.yaml").defaults
    slot = any(
        "experiment" in str(key) for entry in defaults if isinstance(entry, DictConfig) for key in entry
    )
    return f"{'' if slot else '+'}experiment={name}"


def test_paper_table1_preset_composes_into_the_192_run_grid() -> None:
    cfg = compose_with_hydra(["run_dir=x", experiment("paper_table1"), "hydra/launcher=slurm"])
    params = {key: str(value) for key, value in cfg.hydra.sweeper.params.items()}
    assert {key: len(value.split(",")) for key, value in params.items()} == PAPER_GRID
    for group in ("model", "method"):  # every name in the grid is a config of its group
        for name in params[group].split(","):
            assert (ROOT / "conf" / group / f"{name}.yaml").exists(), f"{group}={name}"
    overrides = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in params.items()])
    (jobs,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    assert len(jobs) == math.prod(PAPER_GRID.values()) == 192
    assert len({tuple(sorted(job)) for job in jobs}) == 192
    assert "${model.name}/${method.name}/" in OmegaConf.to_container(cfg.hydra.sweep)["subdir"]

    job = compose_config(["run_dir=x", experiment("paper_table1"), *jobs[-1]])  # one run of the grid
    validate_config(job)
    assert (job.model.name, job.method.name, job.seed, job.budget.ratio) == (
        "mistral-7b",
        "ctrlora",
        2,
        0.003,
    )
    assert (job.trainer.name, job.eval.suite, job.logger.name, job.budget.rank) == (
        "gpu",
        "paper",
        "wandb",
        None,
    )
