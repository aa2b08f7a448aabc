"""Offline, sandboxed test environment; helpers to compose configs and run training in-process."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SANDBOX = Path(tempfile.mkdtemp(prefix="ctrlora-tests-"))
for _key, _value in {
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false", "HF_HOME": str(_SANDBOX / "hf"), "WANDB_DIR": str(_SANDBOX / "wandb"),
    "MPLCONFIGDIR": str(_SANDBOX / "mpl"), "CTRLORA_CACHE": str(_SANDBOX / "ctrlora"),
    "OMP_NUM_THREADS": "1",  # the subprocesses too: pytest's workers share the cores (make test: -n 2)
}.items():
    os.environ[_key] = _value

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from ctrlora.config import register_configs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # tiny models: one thread is faster than two contending
register_configs()

# two CPU processes over gloo (DDP and FSDP tests), and the short deterministic run they compare
TWO_CPU_PROCESSES = [
    "trainer.accelerator=cpu", "trainer.devices=2", "trainer.process_group_backend=gloo", "trainer.precision=32-true",
]
SHORT_RUN = [
    "eval=none", "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=4", "trainer.progress_bar=false",
    "method.dropout=0.0", "optim.lr=5e-3", "calibration.num_samples=64",
]
FAST = ["trainer.progress_bar=false", "trainer.max_steps=20", "trainer.checkpoint_every_n_steps=10", "eval=none"]


# The tests' backbone: the random tiny Llama (train.yaml's default is the real MiniLM encoder) at the
# learning rate the tests were written for; added unless the test sets the key or an experiment preset.
TINY_DEFAULTS = {"model": "tiny-llama", "optim.lr": "2e-4"}


def with_test_defaults(overrides: list[str]) -> list[str]:
    """`overrides` preceded by TINY_DEFAULTS' entries for the keys it leaves unset."""
    keys = {item.split("=", 1)[0].lstrip("+~") for item in overrides}
    if "experiment" in keys:
        return list(overrides)
    return [f"{key}={value}" for key, value in TINY_DEFAULTS.items() if key not in keys] + list(overrides)


def compose_config(overrides: list[str]) -> DictConfig:
    """Compose conf/train.yaml as `python train.py <overrides>` would (on the tests' backbone)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=with_test_defaults(overrides))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # bundled data paths are relative to the repository root
