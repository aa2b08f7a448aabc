"""`run_bench`: every method, the bare loop and the estimators in one process, then the outputs."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import torch
from hydra import compose
from omegaconf import OmegaConf
from rich.console import Console
from rich.markdown import Markdown

from ctrlora import report
from ctrlora.bench.config import REFERENCE_METHOD, BenchSettings
from ctrlora.bench.estimators import time_estimators
from ctrlora.bench.evaluation import time_evaluation
from ctrlora.bench.probes import MemoryProbe
from ctrlora.bench.runs import bare_lora_steps, load_average, measure_method
from ctrlora.bench.summary import markdown, summarise
from ctrlora.config import TrainConfig, validate_config

console = Console()


def compose_train(overrides: list[str]) -> TrainConfig:
    """`conf/train.yaml` composed and validated as `python train.py <overrides>` would (Hydra must be
    initialised on conf/, as `ctrlora.bench.main` does)."""
    composed = compose("train", overrides=overrides)
    validate_config(composed)
    return OmegaConf.to_object(composed)


def method_defaults(method: str, settings: BenchSettings) -> dict[str, int]:
    """What the method's runs use without the bench's overrides: calibration size and refresh cadence."""
    composed = compose("train", overrides=[f"method={method}", *settings.train_overrides])
    return {
        "calibration_samples": int(composed.calibration.num_samples),
        "refresh_every": int(composed.method.ctr.refresh_every) if "ctr" in composed.method else 0,  # 0: none
    }


def device_name(accelerator: str) -> str:
    """The GPU's name, or the CPU's model name."""
    if accelerator == "gpu":
        return torch.cuda.get_device_name(0)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        return f"CPU: {names[0]} ({len(names)} cores)" if names else platform.machine()
    except OSError:
        return f"CPU: {platform.processor() or platform.machine()}"


def measurement_order(methods: list[str]) -> list[str]:
    """LoRA first (right after the bare loop it is compared with), then CTR-LoRA (the comparison the
    acceptance targets are about, as close in time as possible on a noisy machine), then the rest."""
    first = [name for name in (REFERENCE_METHOD, "ctrlora") if name in methods]
    return first + [name for name in methods if name not in first]


def run_bench(settings: BenchSettings) -> dict[str, Any]:
    """Measure the bare LoRA loop (which also takes the process's one-time costs, so they fall on no
    method), every method of `settings.methods` in `measurement_order`, then the estimators; write
    `results.json` and `results.md` into `settings.output_dir`; return the summary."""
    settings.validate()
    accelerator = settings.accelerator
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if settings.threads is not None and accelerator == "cpu":
        torch.set_num_threads(settings.threads)
    device = torch.device("cuda", 0) if accelerator == "gpu" else torch.device("cpu")
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    start, load_start = time.perf_counter(), load_average()
    order = measurement_order(settings.methods)
    defaults = {name: method_defaults(name, settings) for name in settings.methods}  # composed first: a bad config fails now
    with TemporaryDirectory(prefix="ctrlora-bench-") as workdir, MemoryProbe(device) as probe:
        def run_config(method: str, run_name: str | None = None) -> Callable[[list[str]], TrainConfig]:
            base = settings.train_overrides_for(method, accelerator, f"{workdir}/{run_name or method}")
            return lambda extra: compose_train([*base, *extra])

        console.print("[bold]bench[/] the LoRA steps in a bare PyTorch + PEFT loop")
        bare = bare_lora_steps(
            run_config(REFERENCE_METHOD, "bare")([]), settings.warmup, settings.steps, probe
        )
        methods = {}
        for index, name in enumerate(order, 1):
            console.print(f"[bold]bench[/] {index}/{len(order)}: method={name}")
            methods[name] = measure_method(run_config(name)([]), settings.warmup, settings.steps, probe)
        console.print(f"[bold]bench[/] estimators: {', '.join(settings.estimators)}")
        estimators = time_estimators(
            run_config(REFERENCE_METHOD, "estimators"), settings.estimators, settings.estimator_batches, probe
        )
        evaluation = None
        if settings.eval_limit:
            console.print(f"[bold]bench[/] evaluation: the local task ({settings.eval_limit} documents), ours vs lm-eval's CLI")
            evaluation = time_evaluation(run_config(REFERENCE_METHOD, "evaluation"), settings.eval_limit, Path(workdir))
    methods = {name: methods[name] for name in settings.methods}
    for measured in methods.values():
        measured["results"]["run"].pop("run_dir", None)  # a temporary dir, gone by now
    summary = summarise(
        methods, bare, estimators, defaults, settings.train_length, list(settings.fraction_samples)
    )
    budget = methods[REFERENCE_METHOD]["results"]["run"]["budget"]
    summary = {
        "settings": {
            **{key: value for key, value in asdict(settings).items() if key != "output_dir"},  # where this file is
            "model_group": settings.model_group, "refresh_step": settings.refresh_step,
            "accelerator": accelerator,
        },
        "environment": {
            "device": device_name(accelerator), "torch_threads": torch.get_num_threads(),
            "backbone_params": budget["backbone_params"], "budget_rank": budget["rank"],
            "versions": report.package_versions(), "git_sha": report.git_sha(), "started_at": started_at,
            "wall_s": time.perf_counter() - start, "load_average": [load_start, load_average()],
        },
        "defaults": defaults,
        **summary,
        "evaluation": evaluation,
    }
    write_outputs(Path(settings.output_dir), summary)
    return summary


def write_outputs(out_dir: Path, summary: dict[str, Any]) -> None:
    """`results.json` (everything) and `results.md` (the tables), which are also printed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(out_dir / "results.json", summary)
    text = markdown(summary)
    (out_dir / "results.md").write_text(text)
    console.print(Markdown(text))
    console.print(f"[bold]bench[/] wrote {out_dir / 'results.json'} and {out_dir / 'results.md'}")
