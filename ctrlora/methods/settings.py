"""Settings of the curvature-aware methods (METHODS §4–6); nested under `method.` in the config.

Every choice the papers leave open is a key here, with the default written in METHODS.md, and
`allocation.json` records the values a run used.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SensitivitySettings:
    """Sensitivity-LoRA (METHODS §4)."""

    topk_frac: float = 0.5
    eff_alpha: float = 0.85
    r_min: int = 1
    r_max: int | None = None  # null: min(64, 4 r̄)


@dataclass
class CgSettings:
    """CG-LoRA (METHODS §5)."""

    eta: Any = "auto"  # "auto" (line search over eta_grid on a held-out calibration batch) or a number
    eta_grid: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3, 1.0])
    shift: bool = False  # true: subtract s·B₀A₀ from W; export converts back to the original base
    allocate: str = "uniform"  # uniform | greedy (CTR-LoRA's allocator)


@dataclass
class CtrSettings:
    """CTR-LoRA (METHODS §6)."""

    allocation: str = "greedy"  # greedy | uniform
    score: str = "per_param"  # per_param | raw
    r_min: int = 0
    r_max: int | None = None  # null: min(64, 4 r̄)
    oversampling: int = 10
    power_iters: int = 2
    init: str = "lora"  # lora (A random, B = 0) | curvature (un-whitened singular directions, scaled small)
    init_scale: float = 1e-3
    trust_region: bool = True
    lambda0: float = 0.1
    lambda_schedule: str = "cosine"  # cosine | linear | constant
    refresh_every: int = 500
    refresh_source: str = "calibration"  # calibration | training
    refresh_batches: int = 8
    reallocate: bool = False
    hysteresis: float = 0.10
    freeze_at: float = 0.75
    compose: str = "none"  # none | loraplus | dora | pissa
