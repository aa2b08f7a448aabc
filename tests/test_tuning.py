"""Per-method tuning (EVALUATION §4.1): `hydra/sweeper=tpe` runs a seeded Optuna sweep over the method's
own search space offline, and scripts/select_best.py picks the trial with the best validation score."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from hydra import compose, initialize_config_dir


def test_each_method_declares_its_search_space_and_the_trial_budget_is_shared() -> None:
    spaces, budgets = {}, set()
    for method in ("lora", "ctrlora", "cg_lora"):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose("train", overrides=[f"method={method}", "hydra/sweeper=tpe"], return_hydra_config=True)
        spaces[method] = dict(cfg.method.search)
        budgets.add(cfg.hydra.sweeper.n_trials)
        assert cfg.hydra.sweeper.sampler.seed == 0 and cfg.hydra.sweeper.direction == "minimize"  # causal LM: loss
    assert spaces["lora"] == {"optim.lr": "tag(log, interval(1e-5, 1e-2))"}
    assert spaces["ctrlora"] == {**spaces["lora"], "method.ctr.lambda0": "tag(log, interval(1e-3, 100))"}
    assert spaces["cg_lora"] == {**spaces["lora"], "method.cg.eta_scale": "tag(log, interval(0.03, 30))"}
    assert len(budgets) == 1


@pytest.mark.slow
def test_a_three_trial_sweep_runs_offline_and_select_picks_the_best_validation_trial(tmp_path: Path) -> None:
    sweep = tmp_path / "tune"
    command = [
        sys.executable, "train.py", "-m", "hydra/sweeper=tpe", "hydra/launcher=local", "method=lora",
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

    spec = importlib.util.spec_from_file_location("select_script", ROOT / "scripts" / "select_best.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(sweep), "--seeds", "0,1,2"]) == 0
    selected = yaml.safe_load((sweep / "selected" / "tiny-llama-lora-fortune_topics.yaml").read_text())
    assert selected["run_dir"] == str(best_dir) and selected["metric"] == "loss" and selected["trials"] == 3
    best_lr = yaml.safe_load((best_dir / ".hydra" / "overrides.yaml").read_text())
    assert [item for item in best_lr if item.startswith("optim.lr=")][0] in selected["overrides"]
    assert not any(item.startswith(("seed", "hydra.")) for item in selected["overrides"])
