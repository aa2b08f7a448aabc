"""Per-method tuning (docs/EVALUATION.md §4.1): `hydra/sweeper=optuna` runs a seeded Optuna sweep over the method's
own search space offline, and scripts/select_best.py picks the trial with the best validation score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, with_test_defaults
from hydra import compose, initialize_config_dir


def test_each_method_declares_its_search_space_and_the_trial_budget_is_shared() -> None:
    spaces, budgets = {}, set()
    for method in ("lora", "ctrlora", "cg_lora", "loraplus"):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose("train", overrides=with_test_defaults([f"method={method}", "hydra/sweeper=optuna"]), return_hydra_config=True)
        spaces[method] = dict(cfg.method.search)
        budgets.add(cfg.hydra.sweeper.n_trials)
        sweeper = cfg.hydra.sweeper
        assert sweeper._target_.endswith("MethodSearchSweeper") and sweeper.sampler._target_.endswith("TPESampler")
        assert sweeper.sampler.seed == 0 and sweeper.direction == "minimize"  # causal LM: loss
        assert sweeper.max_failure_rate == 1.0  # a diverged trial is recorded as failed, the search goes on
    assert spaces["lora"] == {"optim.lr": "tag(log, interval(1e-5, 1e-2))"}
    assert spaces["ctrlora"] == {**spaces["lora"], "method.ctr.lambda0": "tag(log, interval(1e-3, 100))"}
    assert spaces["cg_lora"] == {**spaces["lora"], "method.cg.eta_scale": "tag(log, interval(0.03, 30))"}
    assert spaces["loraplus"] == {**spaces["lora"], "method.loraplus_ratio": "tag(log, interval(1, 64))"}  # B's lr too
    assert budgets == {16}  # one budget for every method, large enough for the two-dimensional spaces


def test_the_search_composes_with_the_slurm_launcher() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        overrides = with_test_defaults(["method=ctrlora", "hydra/sweeper=optuna", "hydra/launcher=slurm"])
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("MethodSearchSweeper")
    assert cfg.hydra.launcher._target_.endswith("ResumingSlurmLauncher")  # requeued trials resume


@pytest.mark.slow
def test_a_three_trial_sweep_runs_offline_and_select_picks_the_best_validation_trial(tmp_path: Path) -> None:
    sweep = tmp_path / "tune"
    command = [
        sys.executable, "train.py", "-m", "hydra/sweeper=optuna", "hydra/launcher=local", "method=lora", "model=tiny-llama",
        "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", "trainer.max_steps=3", "eval=none",
        "trainer.progress_bar=false", "data.max_train_samples=200",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    trials = {
        path.parent: json.loads(path.read_text()) for path in sweep.rglob("results.json")
    }
    assert len(trials) == 3 and len({r["run"]["config_hash"] for r in trials.values()}) == 3  # three learning rates
    best_dir = min(trials, key=lambda run_dir: trials[run_dir]["val"]["loss"])
    optuna_best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())["best_value"]
    assert trials[best_dir]["val"]["loss"] == pytest.approx(optuna_best)  # the local launcher returned val

    select = [sys.executable, "scripts/select_best.py", str(sweep), "--seeds", "0,1,2"]  # as a user runs it
    printed = subprocess.run(select, cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=120).stdout
    assert "best of 3 trials" in printed and "seed=0,1,2" in printed
    selected = yaml.safe_load((sweep / "selected" / "tiny-llama-lora-fortune_topics.yaml").read_text())
    assert selected["run_dir"] == str(best_dir) and selected["metric"] == "loss" and selected["trials"] == 3
    best_lr = yaml.safe_load((best_dir / ".hydra" / "overrides.yaml").read_text())
    assert [item for item in best_lr if item.startswith("optim.lr=")][0] in selected["overrides"]
    assert not any(item.startswith(("seed", "hydra.")) for item in selected["overrides"])
