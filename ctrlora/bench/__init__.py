"""`make bench` (docs/EVALUATION.md §3): every method at one budget on the same model and batches, in one process.

For each method: the median step time after warm-up, tokens/s, peak memory and, for the
curvature-aware methods, the curvature work (initial estimate + refreshes) as a fraction of a
`bench.train_length`-step run; the framework's overhead (the LoRA steps through Lightning vs. a bare
PyTorch + PEFT loop); and each curvature estimator's time per calibration batch in LoRA steps.
Settings: `conf/bench.yaml`; outputs: `<bench.output_dir>/results.json` and `results.md`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ctrlora.bench.config import register_bench_config
from ctrlora.config import register_configs

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def main(overrides: list[str]) -> dict[str, Any]:
    """Compose conf/bench.yaml with `overrides` (Hydra syntax: `bench.model=llama2-7b`) and run the bench."""
    from ctrlora.bench.suite import run_bench

    register_configs()
    register_bench_config()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        settings = OmegaConf.to_object(compose("bench", overrides=overrides)).bench
        return run_bench(settings)
