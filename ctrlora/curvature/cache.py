"""On-disk cache of curvature estimates, keyed by (caller's key, estimator settings).

The caller's key names what the estimate was computed from (backbone id, data id, calibration
seed and size, ...); it must identify the weights, so only estimates of fixed weights (the frozen
backbone) should be cached, never a mid-training refresh. The settings are those that change the
numbers (`estimator_settings`); the file is ``<cache_dir>/curvature-<sha256 prefix>.pt`` holding
`CurvatureResult.state_dict()` (plain tensors: it loads with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.hutchinson import GGN_PROBES
from ctrlora.curvature.result import CurvatureResult
from ctrlora.curvature.sketch import SKETCH_WHITENING


def estimator_settings(
    cfg: CurvatureConfig, *, targets: Sequence[str], want_grad: bool, sketch_rank: int | None
) -> dict[str, Any]:
    """The settings an estimate depends on (and only those, so unrelated changes still hit the cache)."""
    settings: dict[str, Any] = {
        "kind": cfg.kind,
        "targets": list(targets),
        "seed": cfg.seed,
        "want_grad": want_grad,
    }
    if cfg.kind == "kfac":
        settings["fisher"] = cfg.fisher
        if cfg.fisher == "mc":
            settings["mc_samples"] = cfg.mc_samples
    if cfg.kind == "hutchinson":
        settings.update(probes=cfg.probes, matrix=cfg.matrix)
        if cfg.matrix == "ggn":
            settings["ggn_probes"] = GGN_PROBES  # where the probes live (other draws, other estimates)
    else:
        settings.update(
            dense_max_dim=cfg.dense_max_dim, factor_rank=cfg.factor_rank, max_factor_gb=cfg.max_factor_gb
        )
    if want_grad:
        settings["grad_mode"] = cfg.grad_mode
        if cfg.grad_mode == "sketch":  # the sketch is of the gradient whitened by the damped factors
            settings.update(
                sketch_rank=sketch_rank,
                sketch_oversampling=cfg.sketch_oversampling,
                sketch_power_iters=cfg.sketch_power_iters,
                damping=cfg.damping,
                pi_damping=cfg.pi_damping,
                whitening=SKETCH_WHITENING,  # the square roots its basis was whitened with
            )
    return settings


def cache_file(cache_dir: str | os.PathLike, key: Mapping[str, Any], settings: Mapping[str, Any]) -> Path:
    """Where the estimate for (`key`, `settings`) lives."""
    blob = json.dumps({"key": dict(key), "settings": dict(settings)}, sort_keys=True, default=str)
    return Path(cache_dir) / f"curvature-{hashlib.sha256(blob.encode()).hexdigest()[:24]}.pt"


def load_cached(path: Path, map_location: torch.device | str | None = None) -> CurvatureResult:
    """Read a cached estimate; its report says ``cached=True``."""
    result = CurvatureResult.from_state_dict(torch.load(path, map_location=map_location, weights_only=True))
    result.report.cached = True
    return result


def save_cached(path: Path, result: CurvatureResult) -> None:
    """Write atomically (a temp file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(result.state_dict(), partial)
    os.replace(partial, path)
