"""Data parallelism on CPU (gloo): 2-process DDP follows the 1-process loss curve of the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, SHORT_RUN, TWO_CPU_PROCESSES

from ctrlora.report import logged_losses

DDP = ["trainer=ddp", *TWO_CPU_PROCESSES]
COMMON = SHORT_RUN


def run_train(run_dir: Path, *overrides: str) -> dict:
    """`python train.py ...` in a subprocess, as a user (and Lightning's DDP launcher) runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "train.py", f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=600,
    )
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora"])
def test_ddp_matches_single_process_with_the_same_global_batch(tmp_path: Path, method: str) -> None:
    single = run_train(tmp_path / "single", f"method={method}", "data.batch_size=8", *COMMON)
    ddp = run_train(tmp_path / "ddp", f"method={method}", "data.batch_size=4", *DDP, *COMMON)
    assert (single["meta"]["world_size"], ddp["meta"]["world_size"]) == (1, 2)
    steps_single, losses_single = logged_losses(tmp_path / "single")
    steps_ddp, losses_ddp = logged_losses(tmp_path / "ddp")
    assert steps_single == steps_ddp == list(range(1, 9))
    assert losses_ddp == pytest.approx(losses_single, rel=1e-5)
    assert losses_single[-1] < losses_single[0]
    # one run dir, with the same outputs as one process (Hydra's per-process logs aside)
    def outputs(run_dir: Path) -> list[str]:
        return sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".") and p.suffix != ".log")

    assert outputs(tmp_path / "ddp") == outputs(tmp_path / "single")
