"""The bench's evaluation line: our evaluation of the bundled local task against lm-eval's own CLI.

Both score the same LoRA adapter on the bench model, the same generated task YAMLs, the same limit
and batch size: ours through `evaluation.suite.evaluate_model` (lm-eval's HFLM on the model in
memory, no base row), the CLI as a user runs it (``python -m lm_eval run --model hf --model_args
pretrained=<backbone> peft=<adapter>``, process start and model load included, with as many torch
threads as ours). The line reports both wall times and both scores, which must agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from ctrlora.backbones import load_backbone, load_tokenizer, resolve_source
from ctrlora.config import TrainConfig
from ctrlora.evaluation.suite import evaluate_model


def time_evaluation(train_config: Callable[[list[str]], TrainConfig], limit: int, workdir: Path) -> dict[str, Any]:
    """Wall seconds and accuracy of both evaluations of `limit` documents per task (see the module docstring)."""
    cfg = train_config(["eval=local", f"eval.limit={limit}", "eval.base_row=false"])
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(cfg.model, accelerator=cfg.trainer.accelerator)
    config = LoraConfig(r=8, target_modules=list(cfg.model.target_modules), init_lora_weights=False)  # B ≠ 0
    model = get_peft_model(backbone, config).eval()
    adapter = workdir / "evaluation_adapter"
    model.save_pretrained(adapter)
    start = time.perf_counter()
    ours = evaluate_model(model, load_tokenizer(cfg.model), cfg.eval, base_model_key="bench", cache_root=workdir)
    ours_s = time.perf_counter() - start
    tasks = list(cfg.eval.tasks)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    model_args = [f"pretrained={resolve_source(cfg.model)}", f"peft={adapter}", f"dtype={dtype}"]
    if cfg.eval.max_length is not None:
        model_args.append(f"max_length={cfg.eval.max_length}")
    command = [
        sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", *model_args,
        "--tasks", *tasks, "--include_path", ours["versions"]["task_dir"], "--limit", str(limit),
        "--batch_size", str(cfg.eval.batch_size), "--device", "cuda" if cfg.trainer.accelerator == "gpu" else "cpu",
        "--output_path", str(workdir / "lm_eval_cli"),
    ]
    start = time.perf_counter()
    threads = {"OMP_NUM_THREADS": str(torch.get_num_threads()), "TOKENIZERS_PARALLELISM": "false"}  # as ours
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **threads})
    if done.returncode != 0:
        raise RuntimeError(f"lm-eval's CLI failed ({done.returncode}): {done.stderr[-2000:]}")
    cli_s = time.perf_counter() - start
    results = json.loads(next((workdir / "lm_eval_cli").rglob("results_*.json")).read_text())["results"]
    return {
        "limit": limit,
        "tasks": tasks,
        "ours_s": ours_s,
        "lm_eval_cli_s": cli_s,
        "ours_vs_cli": ours_s / cli_s,
        "accuracy": {task: {"ours": ours[task]["acc"]["value"], "lm_eval_cli": results[task]["acc,none"]} for task in tasks},
    }
