"""The NLU study's pipeline (experiments/nlu_minilm): the preset's sweep on the real all-MiniLM-L6-v2
encoder for one seed and a handful of steps — a reference row, a curvature method and QLoRA (whose
trained head must stay unquantised) — then the aggregated table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir


def test_the_study_preset_sweeps_every_method_and_both_reference_rows_over_three_seeds() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["experiment=nlu_minilm"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    methods = params.method.split(",")
    assert set(methods) == {
        "head_only", "lora", "qlora", "adalora", "dora", "pissa", "loraplus", "sensitivity_lora", "cg_lora", "ctrlora",
    }  # full_ft is the second command (its own learning rate)
    assert params.seed == "0,1,2" and cfg.model.name == "minilm-l6" and cfg.hydra.sweep.dir == "experiments/nlu_minilm/runs"


def test_the_ctr_ablation_preset_sweeps_lambda0_and_schedules_into_one_folder_per_setting() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["experiment=nlu_minilm_ctr"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.method == "ctrlora" and params.seed == "0,1,2" and cfg.model.name == "minilm-l6"
    assert params["method.ctr.lambda0"] == "0.02,0.05,0.1,0.2" and params["method.ctr.lambda_schedule"] == "linear,cosine"
    assert cfg.optim.lr == 3e-3 and cfg.trainer.max_steps == 120  # the study's protocol, as nlu_minilm
    assert cfg.hydra.sweep.subdir == "allocation=greedy,trust_region=True,lambda0=0.1,cosine/seed=0"  # the settings


@pytest.mark.slow
def test_one_seed_of_the_study_runs_and_aggregates(tmp_path: Path) -> None:
    sweep = tmp_path / "runs"
    command = [
        sys.executable, "train.py", "-m", "experiment=nlu_minilm", "method=head_only,qlora,ctrlora", "seed=0",
        f"hydra.sweep.dir={sweep}", "trainer.max_steps=3", "trainer.progress_bar=false", "calibration.num_samples=16",
        "eval.limit=32",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert sorted(p.parent.parent.name for p in sweep.rglob("results.json")) == ["ctrlora", "head_only", "qlora"]

    aggregate = [sys.executable, "scripts/aggregate.py", str(sweep)]
    table = subprocess.run(aggregate, cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert "fortune_topics (accuracy)" in rows[0]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["head_only", "qlora", "ctrlora"]
    head_only = rows[1].split("|")
    assert head_only[2].strip() == "–" and head_only[3].strip() == "3,080"  # no budget; 384·8 + 8 head weights

    head_only_dir = sweep / "fortune_topics" / "head_only" / "seed=0"  # evaluate.py reloads the saved model
    recorded = json.loads((head_only_dir / "results.json").read_text())["eval"]["fortune_topics"]
    evaluate = [sys.executable, "evaluate.py", f"run_dir={head_only_dir}"]
    subprocess.run(evaluate, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    again = json.loads((head_only_dir / "results.json").read_text())["eval"]["fortune_topics"]
    assert again["accuracy"]["value"] == recorded["accuracy"]["value"]
