"""Data parallelism on CPU (gloo): 2-process DDP follows the 1-process loss curve of the same global batch.

For ctrlora a curvature refresh falls inside the run, and the calibration is split across the ranks
(each estimates on its shard, the sums are all-reduced): the token counts, the allocation and the
trust-region penalty are those of one process. Ranks that built different adapters stop before training.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHORT_RUN, TWO_CPU_PROCESSES, compose_config, with_test_defaults

from ctrlora.report import logged_losses
from ctrlora.run import adopt_rank_zero_adapters, train

DDP = ["trainer=ddp", *TWO_CPU_PROCESSES]
COMMON = SHORT_RUN
REFRESH_INSIDE_THE_RUN = ["method.ctr.refresh_every=4", "calibration.num_samples=16"]  # a refresh at step 4


def run_train(run_dir: Path, *overrides: str) -> dict:
    """`python train.py ...` in a subprocess, as a user (and Lightning's DDP launcher) runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "train.py", f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", *with_test_defaults(list(overrides))],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=600,
    )
    return json.loads((run_dir / "results.json").read_text())


def outputs(run_dir: Path) -> list[str]:
    """The files of a run dir (Hydra's bookkeeping and per-process logs aside)."""
    return sorted(p.name for p in run_dir.iterdir() if not p.name.startswith(".") and p.suffix != ".log")


def read_column(run_dir: Path, column: str) -> list[float]:
    """The logged values of one metrics.csv column, in step order."""
    with open(run_dir / "metrics.csv", newline="") as file:
        return [float(row[column]) for row in csv.DictReader(file) if row.get(column)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "extra"), [("lora", []), ("ctrlora", REFRESH_INSIDE_THE_RUN)], ids=["lora", "ctrlora"]
)
def test_ddp_matches_single_process_with_the_same_global_batch(
    tmp_path: Path, method: str, extra: list[str]
) -> None:
    overrides = [f"method={method}", *COMMON, *extra]
    single = train(compose_config([f"run_dir={tmp_path / 'single'}", "data.batch_size=8", *overrides]))
    ddp = run_train(tmp_path / "ddp", "data.batch_size=4", *DDP, *overrides)
    assert (single["meta"]["world_size"], ddp["meta"]["world_size"]) == (1, 2)
    steps_single, losses_single = logged_losses(tmp_path / "single")
    steps_ddp, losses_ddp = logged_losses(tmp_path / "ddp")
    assert steps_single == steps_ddp == list(range(1, 9))
    assert losses_ddp == pytest.approx(losses_single, rel=1e-5)
    assert losses_single[-1] < losses_single[0]
    assert ddp["train"]["tokens"] == single["train"]["tokens"]  # every rank's tokens, not rank 0's
    assert outputs(tmp_path / "ddp") == outputs(tmp_path / "single")  # one run dir, as one process writes
    if method == "ctrlora":
        assert ddp["allocation"]["ranks"] == single["allocation"]["ranks"]
        # the shards' statistics add up to the whole set's (a rank passing it all would double the count)
        single_estimates, ddp_estimates = (
            [(e["label"], e["tokens"]) for e in run["train"]["curvature"]["estimates"]]
            for run in (single, ddp)
        )
        tokens = single_estimates[0][1]
        assert ddp_estimates == single_estimates == [("initial", tokens), ("refresh", tokens)]
        penalties = [read_column(tmp_path / name, "method/penalty") for name in ("single", "ddp")]
        assert penalties[1] == pytest.approx(penalties[0], rel=1e-5) and max(penalties[0]) > 0



class RankOneOfTwo:
    """The strategy as rank 1 sees it when rank 0 built one more adapter (the collectives answered)."""

    global_rank, root_device = 1, torch.device("cpu")

    def broadcast(self, shapes: dict, src: int = 0) -> dict:
        return {**shapes, "extra.lora_A.default.weight": (4, 8)}

    def reduce(self, flag: torch.Tensor, reduce_op: str) -> torch.Tensor:
        return flag  # rank 0 agrees with itself: the sum is this rank's flag


def test_ranks_that_built_different_adapters_stop_before_training() -> None:
    model = torch.nn.Linear(8, 4)
    with pytest.raises(RuntimeError, match=r"1 rank\(s\) differ from rank 0 \(rank 1: \['extra.lora_A"):
        adopt_rank_zero_adapters(model, RankOneOfTwo())
