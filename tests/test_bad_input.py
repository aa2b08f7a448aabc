"""Bad input is refused before any weights load and before the run writes anything: one line naming the
key and the remedy, exit code 2, no traceback (HYDRA_FULL_ERROR=1 shows it); the folder Hydra made
for the run holds only its bookkeeping and failed.json saying why."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, with_test_defaults

from ctrlora.config import check_environment
from ctrlora.errors import FAILED_FILE, ConfigError


def run_train(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", *with_test_defaults(list(overrides))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_bad_values_exit_2_with_one_line_before_any_run_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty_weights"
    empty.mkdir()
    cases = {
        "optim.lr=-1e-3": "optim.lr=-0.001 must be > 0",
        f"model.path={empty}": "holds no config.json",
        "trainer=ddp": "needs a GPU and none is visible" if not torch.cuda.is_available() else None,
        "model=llama2-7b": "has no local copy: not in the Hugging Face cache, and offline=true",
    }
    for override, message in cases.items():
        if message is None:
            continue
        run_dir = tmp_path / override.split("=")[0].replace(".", "_")
        result = run_train(override, f"hydra.run.dir={run_dir}")
        assert result.returncode == 2, (override, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if "ConfigError" in line]
        assert len(errors) == 1 and message in errors[0], (override, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, override
        assert {path.name for path in run_dir.iterdir()} <= {".hydra", "train.log", FAILED_FILE}, override
        assert message in (run_dir / FAILED_FILE).read_text()
    traced = run_train("optim.lr=-1e-3", f"hydra.run.dir={tmp_path / 'traced'}", env={"HYDRA_FULL_ERROR": "1"})
    assert traced.returncode != 0 and "Traceback" in traced.stderr


def test_devices_beyond_the_cores_and_a_missing_quantization_package_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    too_many = compose_config(["trainer.devices=4096"])
    with pytest.raises(ConfigError, match="trainer.devices=4096 CPU processes"):
        check_environment(too_many)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r'pip install "bitsandbytes>=0.50.2,<0.51" torch==2.13.0'):
        check_environment(compose_config(["method=qlora"]))
    check_environment(compose_config(["method=lora"]))  # what does not need it still passes
