"""scripts/curvature_along_update.py on a run dir a real CTR-LoRA run wrote."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import FAST, ROOT, compose_config

from ctrlora.run import train


def load_script():
    spec = importlib.util.spec_from_file_location("curvature_along_update", ROOT / "scripts" / "curvature_along_update.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measures_the_exact_and_kfac_curvature_along_the_trained_update(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    train(compose_config([f"run_dir={run_dir}", *FAST, "optim.lr=5e-3", "calibration.num_samples=16"]))
    assert load_script().main([str(run_dir)]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["tokens_per_loss_term"] == 1.0  # a causal LM trains on the mean token loss
    assert measured["slope"] < 0  # the trained update lowers the calibration loss to first order
    assert measured["exact_ggn"] > 0 and measured["kfac"] > 0
    assert measured["exact_over_kfac"] == pytest.approx(measured["exact_ggn"] / measured["kfac"], rel=1e-9)
    rows = [row for row in csv.DictReader((run_dir / "metrics.csv").open()) if row.get("method/penalty")]
    assert measured["penalty_logged"] == float(rows[-1]["method/penalty"])
