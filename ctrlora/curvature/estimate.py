"""Entry point: `estimate_curvature` runs the estimator named by ``cfg.kind`` over calibration batches.

Estimators are registered by kind in `ESTIMATORS`; each takes one group of targets and makes one
pass over the batches. This module adds what they share: target resolution, the storage plan and
its layer groups (`memory.plan_storage`), the calibration mode of the model (eval, frozen,
restored afterwards), the optional gradient-sketch passes, timing, peak memory and the cache.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ctrlora.curvature.activation import estimate_activation
from ctrlora.curvature.cache import cache_file, estimator_settings, load_cached, save_cached
from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.hooks import calibration_mode, resolve_targets
from ctrlora.curvature.hutchinson import estimate_hutchinson
from ctrlora.curvature.kfac import estimate_kfac
from ctrlora.curvature.memory import plan_storage, resolve_grad_mode, target_shapes
from ctrlora.curvature.objectives import Objective, objective_for
from ctrlora.curvature.passes import sketch_whitened_gradients
from ctrlora.curvature.result import CurvatureReport, CurvatureResult
from ctrlora.curvature.runtime import (
    PeakMemory,
    accumulation_dtype,
    all_reduce_count,
    input_device,
    module_device,
    rank,
    world_size,
)

Estimator = Callable[..., dict]
ESTIMATORS: dict[str, Estimator] = {
    "activation": estimate_activation,
    "kfac": estimate_kfac,
    "hutchinson": estimate_hutchinson,
}


def estimate_curvature(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    targets: list[str],
    cfg: CurvatureConfig,
    *,
    want_grad: bool = False,
    sketch_rank: int | None = None,
    progress: bool = True,
    objective: Objective | None = None,
    cache_key: dict[str, Any] | None = None,
) -> CurvatureResult:
    """Estimate the curvature of the `targets` of `model` on calibration `batches` (docs/METHODS.md §3).

    Args:
        model: a HF model or a `peft.PeftModel` (estimates are at its current weights, adapters
            included); its train/eval modes and requires_grad flags are restored afterwards.
        batches: dicts with ``input_ids``, ``attention_mask`` and ``labels`` (see
            `ctrlora.curvature.objectives` for exactly which tokens count). Several passes (layer
            groups under ``cfg.max_factor_gb``, the gradient sketch) need a re-iterable such as a
            list or a DataLoader. Under DDP each rank passes its own shard; sums are all-reduced.
        targets: fully-qualified names of `nn.Linear` modules (or PEFT LoRA wrappers of them).
        cfg: the estimator settings; ``cfg.kind`` picks the estimator.
        want_grad: also return the gradient of the mean token loss, dense (``grad_mode: dense``)
            or as a sketch of its whitened form (``grad_mode: sketch``, needs `sketch_rank`);
            ``auto`` is dense while every target's dense gradient fits in ``dense_grad_max_gb``.
        sketch_rank: the largest rank a consumer will read from the sketch (e.g. r_max).
        progress: show a rich progress bar over the batches (rank 0).
        objective: how batches become losses; inferred from the first batch when None.
        cache_key: what the estimate is computed from (backbone, data, calibration seed/size);
            with ``cfg.cache_dir`` set, a matching earlier estimate is loaded instead.

    Returns:
        `CurvatureResult`: target name -> raw `ModuleCurvature`, and a `CurvatureReport` with the
        estimation time, peak memory, token count and settings.
    """
    if cfg.kind not in ESTIMATORS:
        raise ValueError(f"curvature.kind={cfg.kind!r} is not valid; choose one of {sorted(ESTIMATORS)}")
    if want_grad and cfg.kind == "activation":
        raise ValueError(
            "curvature.kind='activation' is forward only and has no gradient; use kfac or hutchinson"
        )
    modules = resolve_targets(model, targets)
    dtype = accumulation_dtype(modules.values())
    element_bytes = torch.finfo(dtype).bits // 8
    shapes = target_shapes(model, targets)
    cfg = resolve_grad_mode(cfg, shapes, element_bytes)
    sketching = want_grad and cfg.grad_mode == "sketch"
    if sketching and (sketch_rank is None or sketch_rank < 1):
        raise ValueError(
            "curvature.grad_mode='sketch' needs sketch_rank ≥ 1 (the largest rank you will read)"
        )
    settings = estimator_settings(cfg, targets=targets, want_grad=want_grad, sketch_rank=sketch_rank)

    cache_path = None
    if cfg.cache_dir is not None and cache_key is not None:
        cache_path = cache_file(cfg.cache_dir, cache_key, settings)
        hits = all_reduce_count(int(cache_path.exists()), input_device(model))
        if hits == world_size():
            return _on_module_devices(load_cached(cache_path, map_location="cpu"), modules)

    plan = plan_storage(shapes, cfg, element_bytes=element_bytes, want_grad=want_grad)
    passes = len(plan.groups) + (2 + 2 * cfg.sketch_power_iters) * sketching
    batches, first = _peek(batches, passes)
    objective = objective or objective_for(first)
    memory = PeakMemory(module_device(next(iter(modules.values()))))
    start = time.perf_counter()
    with (
        memory.measure(),
        calibration_mode(
            model,
            keep_checkpointing=cfg.keep_checkpointing and cfg.kind != "hutchinson",
            input_grads=cfg.kind != "activation",
        ),
    ):
        curvatures = {}
        for index, group in enumerate(plan.groups):
            description = f"curvature {cfg.kind}" + (
                f" {index + 1}/{len(plan.groups)}" if len(plan.groups) > 1 else ""
            )
            curvatures.update(
                ESTIMATORS[cfg.kind](
                    model,
                    batches,
                    {name: modules[name] for name in group},
                    cfg,
                    plan,
                    objective,
                    want_dense_grad=want_grad and not sketching,
                    description=description,
                    progress=progress,
                )
            )
        if sketching:
            sketch_whitened_gradients(
                model,
                batches,
                modules,
                curvatures,
                objective,
                rank=sketch_rank,
                oversampling=cfg.sketch_oversampling,
                power_iters=cfg.sketch_power_iters,
                damping=cfg.damping,
                pi_split=cfg.pi_damping,
                seed=cfg.seed,
                progress=progress,
            )
    report = CurvatureReport(
        kind=cfg.kind,
        estimate_s=time.perf_counter() - start,
        peak_memory_bytes=memory.peak_bytes,
        peak_memory_source=memory.source,
        tokens=next(iter(curvatures.values())).tokens,
        passes=passes,
        settings=settings,
        storage={key: value for key, value in plan.to_dict().items() if key != "modules"},
    )
    result = CurvatureResult({name: curvatures[name] for name in targets}, report)
    if cache_path is not None and rank() == 0:
        save_cached(cache_path, result)
    return result


def _peek(batches: Iterable[dict[str, Any]], passes: int) -> tuple[Iterable[dict[str, Any]], dict[str, Any]]:
    """The first batch, and batches that still yield it; several passes need a re-iterable."""
    iterator = iter(batches)
    if iterator is not batches:
        return batches, next(iterator)
    if passes > 1:
        raise TypeError(
            f"this estimate makes {passes} passes over the calibration batches: pass a list or a DataLoader, "
            "not a one-shot iterator"
        )
    first = next(iterator)
    return itertools.chain([first], iterator), first


def _on_module_devices(result: CurvatureResult, modules: dict[str, nn.Module]) -> CurvatureResult:
    """Move a loaded result next to each target's weight (a shared ``a`` stays shared)."""
    moved: dict[int, Any] = {}
    for name, curvature in result.modules.items():
        device = module_device(modules[name])
        a = curvature.a
        result.modules[name] = curvature.to(device)
        if a is not None:
            result.modules[name].a = moved.setdefault(id(a), result.modules[name].a)
    return result
