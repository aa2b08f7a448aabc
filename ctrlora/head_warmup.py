"""Training a freshly initialised head alone before calibration (``calibration.head_warmup_steps``).

An encoder turned into a classifier gets a random head. Every statistic a calibration-based method
reads at step 0 — the output gradients g_t in S_g, the gradient G whose whitened spectrum scores
the modules and sets CG-LoRA's first step — flows back through that head, so with a random head
they describe a random read-out. Warming the head up first (AdamW on the head's parameters only,
the encoder frozen and in eval mode, on the calibration batches in a cycle) gives the estimate a
head that reads the pretrained features. The run applies it to every method alike, so the
comparison stays fair: the head then carries on training with the adapters.

Default (``null``): 200 steps at lr 1e-3 for a model with a fresh head, none otherwise. Measured on
the NLU study (experiment=nlu_minilm, seed 0, 128 calibration examples): test accuracy with 0 / 50
/ 200 warm-up steps was 72.4 / 74.3 / 77.2% for CTR-LoRA, 71.9 / 72.7 / 75.5% for CG-LoRA, and
– / 74.7 / 77.4% for LoRA; 200 steps cost about 14 s on 2 CPU cores.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ctrlora.curvature.hooks import calibration_mode
from ctrlora.curvature.runtime import batch_to_device, input_device
from ctrlora.errors import ConfigError

log = logging.getLogger(__name__)
HEAD_WARMUP_STEPS = 200  # calibration.head_warmup_steps=null on a model with a fresh head (measured: module docstring)


def head_warmup_steps(configured: int | None, head_modules: list[str]) -> int:
    """``calibration.head_warmup_steps``, its null resolved: `HEAD_WARMUP_STEPS` with a fresh head, else 0."""
    if configured is not None:
        return configured
    return HEAD_WARMUP_STEPS if head_modules else 0


def head_parameters(model: nn.Module, head_modules: list[str]) -> list[nn.Parameter]:
    """The parameters of the modules whose name ends in one of `head_modules` (``model.modules_to_save``)."""
    params = [
        param
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in head_modules
        for param in module.parameters()
    ]
    if not params:
        raise ConfigError(
            f"calibration.head_warmup_steps needs a fresh head to train, but no module of the model is named"
            f" like model.modules_to_save={head_modules}"
        )
    return params


def _cycle(batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    while True:
        yield from batches


def warm_up_head(
    model: nn.Module, batches: Iterable[dict[str, Any]], head_modules: list[str], steps: int, lr: float
) -> dict[str, Any]:
    """`steps` AdamW steps (lr `lr`) on the head alone, over `batches` in a cycle; the model's loss.

    Every other parameter is frozen and every module in eval mode meanwhile (`calibration_mode`: dropout
    off, so the head learns the features the calibration passes will see); flags and modes are restored. Returns what
    ``results.json`` records: steps, lr, first and last loss, seconds.
    """
    head = head_parameters(model, head_modules)
    device, start, losses = input_device(model), time.perf_counter(), []
    with calibration_mode(model, keep_checkpointing=False, input_grads=False), torch.enable_grad():
        for param in head:  # calibration_mode froze everything; it restores every flag on exit
            param.requires_grad_(True)
        optimizer = torch.optim.AdamW(head, lr=lr, weight_decay=0.0)
        for _, batch in zip(range(steps), _cycle(batches), strict=False):
            loss = model(**batch_to_device(batch, device)).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    report = {
        "steps": steps, "lr": lr, "loss_first": losses[0], "loss_last": losses[-1],
        "seconds": round(time.perf_counter() - start, 3),
    }
    log.info("head warm-up: %d steps, loss %.4f -> %.4f (%.1f s)", steps, losses[0], losses[-1], report["seconds"])
    return report
