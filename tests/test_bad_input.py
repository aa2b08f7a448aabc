"""Bad input is refused before any weights load and before the run writes anything: one line naming the
key and the remedy, exit code 2, no traceback (HYDRA_FULL_ERROR=1 shows it); the folder Hydra made
for the run holds only its bookkeeping and failed.json saying why."""

from __future__ import annotations

import errno
import importlib.util
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_config, with_test_defaults
from hydra.errors import ConfigCompositionException

from ctrlora.config import TrainConfig, method_schema, validate_config
from ctrlora.environment import check_environment
from ctrlora.errors import FAILED_FILE, ConfigError, DataError, RunDirError
from ctrlora.override_keys import unknown_override_keys
from ctrlora.storage import storage_error, storage_problem

FIXTURE_MIRRORS = ROOT / "tests" / "fixtures" / "mirrors"
METHOD_GROUP = {"method": method_schema}


def run_train(*overrides: str, env: dict[str, str] | None = None, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """train.py in a subprocess; `max_file_bytes`: no file it writes may grow past this (RLIMIT_FSIZE)."""
    command = [sys.executable, "train.py", *with_test_defaults(list(overrides))]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    limit = None if max_file_bytes is None else lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes,) * 2)
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, preexec_fn=limit)


@pytest.mark.slow
def test_bad_values_exit_2_with_one_line_before_any_run_dir(tmp_path: Path) -> None:
    empty = tmp_path / "empty_weights"
    empty.mkdir()
    pirate = tmp_path / "test_with_a_new_label.jsonl"  # the local eval task's test file: a label not in its choices
    pirate.write_text('{"text": "Ahoy.", "label": "pirates"}\n')
    cases = {
        "optim.lr=-1e-3": "optim.lr=-0.001 must be > 0",
        f"model.path={empty}": "holds no config.json",
        "trainer=ddp": "needs a GPU and none is visible" if not torch.cuda.is_available() else None,
        "model=llama2-7b": "has no local copy: not in the Hugging Face cache, and offline=true",
        "eval=paper": "reads Rowan/hellaswag, allenai/ai2_arc, allenai/winogrande, aps/super_glue, cais/mmlu",
        f"eval.tasks.fortune_topics.local.test={pirate}": "line 1: label='pirates' is not one of the choices",
    }
    cases = {override: message for override, message in cases.items() if message is not None}
    run_dirs = {override: tmp_path / override.split("=")[0].replace(".", "_") for override in cases}
    runs = [(override, f"hydra.run.dir={run_dir}") for override, run_dir in run_dirs.items()]
    runs += [("optim.lrr=1e-3", f"hydra.run.dir={tmp_path / 'misspelt'}")]  # refused before Hydra
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # independent processes, each mostly imports
        traced = pool.submit(run_train, "optim.lr=-1e-3", f"hydra.run.dir={tmp_path / 'traced'}", env={"HYDRA_FULL_ERROR": "1"})
        results = dict(zip([override for override, _ in runs], pool.map(lambda args: run_train(*args), runs), strict=True))
    for override, message in cases.items():
        run_dir, result = run_dirs[override], results[override]
        assert result.returncode == 2, (override, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith(("ConfigError", "DataError"))]
        assert len(errors) == 1 and message in errors[0], (override, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, override
        assert {path.name for path in run_dir.iterdir()} <= {".hydra", "train.log", FAILED_FILE}, override
        assert message in (run_dir / FAILED_FILE).read_text()
    misspelt = results["optim.lrr=1e-3"]
    assert misspelt.returncode == 2 and not (tmp_path / "misspelt").exists()
    assert misspelt.stderr.strip() == "ConfigError: unknown config key 'optim.lrr'; valid keys here: betas, lr, warmup_ratio, weight_decay"
    assert traced.result().returncode != 0 and "Traceback" in traced.result().stderr


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


def test_the_eval_suites_data_is_checked_before_training(tmp_path: Path) -> None:
    """Offline without mirrors, the paper suite's hub datasets are not cached (HF_HOME is a fresh temp
    dir): refused, naming each; with the mirrors it passes. A local task's test file with a label
    outside the choices is refused at its file and line."""
    with pytest.raises(ConfigError, match=r"eval=paper reads Rowan/hellaswag, allenai/ai2_arc, .*openai/gsm8k.*eval\.data_dir="):
        check_environment(compose_config(["eval=paper"]))
    check_environment(compose_config(["eval=paper", f"eval.data_dir={FIXTURE_MIRRORS}"]))
    check_environment(compose_config(["eval=paper", "offline=false"]))  # the hub may serve them
    rows = (ROOT / "data" / "fortune_topics" / "test.jsonl").read_text().splitlines()[:3]
    test_file = tmp_path / "test.jsonl"
    test_file.write_text("\n".join([*rows, '{"text": "Ahoy.", "label": "pirates"}']) + "\n")
    with pytest.raises(DataError, match=r"test\.jsonl line 4: label='pirates' is not one of the choices .*\(eval\.tasks\.fortune_topics\.local\.choices;"):
        check_environment(compose_config(["eval=local", f"eval.tasks.fortune_topics.local.test={test_file}"]))


@pytest.mark.slow
def test_an_unwritable_run_dir_or_a_full_disk_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    """A run dir under a file, or in a folder that takes no files, is refused before Hydra makes it; a
    disk that fills mid-run (here: a file-size limit under a checkpoint's size) stops the run with one
    line naming the file, the run dir marked failed."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    unwritable = {a_file / "run": "a_file is a file, not a folder"}
    if storage_problem(Path("/sys/ctrlora-run")) is not None:  # /sys takes no files, even as root
        unwritable[Path("/sys/ctrlora-run")] = "/sys takes no new files"
    for folder, message in unwritable.items():
        result = run_train(f"hydra.run.dir={folder}")
        assert result.returncode == 2 and not folder.exists(), result.stderr[-2000:]
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"RunDirError: cannot write the run dir {folder}: ") and message in line, line
    assert "MiB free, under the 4194304 MiB a run needs" in (storage_problem(tmp_path, min_free=2**42) or "")
    assert storage_problem(tmp_path / "new" / "run") is None

    run_dir = tmp_path / "full"
    full = run_train("method=lora", "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=2", "eval=none",
                     f"hydra.run.dir={run_dir}", max_file_bytes=64 * 2**10)
    assert full.returncode == 2, full.stderr[-2000:]
    last = full.stderr.strip().splitlines()[-1]
    assert "Traceback" not in full.stderr and last.startswith(f"RunDirError: cannot write {run_dir}"), last
    assert "File too large" in last and f"resume=true run_dir={run_dir}" in last
    assert "File too large" in (run_dir / FAILED_FILE).read_text()
    assert storage_error(FileNotFoundError(errno.ENOENT, "No such file"), run_dir) is None  # not a disk error
    wrapped = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert isinstance(storage_error(wrapped, run_dir), RunDirError)  # safetensors' Rust I/O error


def test_a_misspelt_key_on_the_command_line_names_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"'method\.ctr\.lambda00'; valid keys here: allocation, compose, freeze_at"):
        unknown_override_keys(["-m", "method=ctrlora", "method.ctr.lambda00=1,2"], TrainConfig, METHOD_GROUP)
    with pytest.raises(ConfigError, match=r"'model\.nam'; valid keys here: arch, "):
        unknown_override_keys(["model.nam=x"], TrainConfig, METHOD_GROUP)
    unknown_override_keys([  # group choices, additions, deletions, free mappings and hydra.* pass
        "method=lora", "optim.lr=1e-3", "+optim.extra=1", "~eval.limit", "eval.tasks.mine.num_fewshot=0",
        "hydra.run.dir=x", "hydra/sweeper=optuna",
    ], TrainConfig, METHOD_GROUP)


def test_a_method_has_only_its_own_keys_and_a_bad_choice_fails_before_anything_loads() -> None:
    """method=lora has no `ctr` section: setting one fails at composition (Hydra) and, named with the
    valid keys, before Hydra runs (train.py's check). A bad choice of a method's own key fails in
    validate_config, before any weights load."""
    with pytest.raises(ConfigCompositionException, match=r"method\.ctr\.lambda0"):
        compose_config(["method=lora", "method.ctr.lambda0=0.5"])
    with pytest.raises(ConfigError, match=r"'method\.ctr\.lambda0'; valid keys in method: alpha, dropout, init"):
        unknown_override_keys(["method=lora", "method.ctr.lambda0=0.5"], TrainConfig, METHOD_GROUP)
    unknown_override_keys(["method=ctrlora", "method.ctr.lambda0=0.5"], TrainConfig, METHOD_GROUP)
    with pytest.raises(ConfigError, match=r"method\.ctr\.compose='dorra' is not valid; choose one of \['none', 'loraplus'"):
        validate_config(compose_config(["method=ctrlora", "method.ctr.compose=dorra"]))
    with pytest.raises(ConfigError, match=r"method\.cg\.score='rw' is not valid"):
        validate_config(compose_config(["method=cg_lora", "method.cg.score=rw"]))
    with pytest.raises(ConfigError, match=r"method\.ctr\.metric_rank=0 must be >= 1 \(or null"):
        validate_config(compose_config(["method=ctrlora", "method.ctr.metric_rank=0"]))
