"""Settings of the curvature-aware methods (docs/METHODS.md §4–6); nested under `method.` in the config.

Every choice the papers leave open is a key here, with the default written in METHODS.md, and
`allocation.json` records the values a run used. ``r_max: null`` means ``max(r̄, min(64, 4 r̄))``
(METHODS' ``min(64, 4 r̄)``, raised to r̄ so a budget above rank 64 stays feasible).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ctrlora.errors import ConfigError, check_choice

LAMBDA_SCHEDULES = ("cosine", "linear", "constant")
ALLOCATIONS = ("greedy", "uniform")
GREEDY_SCORES = ("per_param", "raw")
CTR_INITS = ("lora", "curvature")
REFRESH_SOURCES = ("calibration", "training")
COMPOSITIONS = ("none", "loraplus", "dora", "pissa")
TRUST_REGION_METRICS = ("fisher", "normalized")


def check_range(key: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    """Raise `ConfigError` unless ``low (<|<=) value <= high``."""
    if not (low < value <= high if low_open else low <= value <= high):
        bracket = "(" if low_open else "["
        raise ConfigError(f"method.{key}={value} must lie in {bracket}{low}, {high}]")


def check_rank_bounds(key: str, r_min: int, r_max: int | None) -> None:
    if r_min < 0 or (r_max is not None and r_max < max(r_min, 1)):
        raise ConfigError(f"method.{key}: need 0 <= r_min <= r_max and r_max >= 1, got r_min={r_min}, r_max={r_max}")


@dataclass
class SensitivitySettings:
    """Sensitivity-LoRA (docs/METHODS.md §4)."""

    topk_frac: float = 0.5  # k = ceil(topk_frac · N) sensitivities in the Top-k metric
    eff_alpha: float = 0.85  # effective rank: fewest sensitivities holding this share of the trace
    r_min: int = 1
    r_max: int | None = None  # null: max(r̄, min(64, 4 r̄))

    def validate(self) -> None:
        check_range("sensitivity.topk_frac", self.topk_frac, 0.0, 1.0, low_open=True)
        check_range("sensitivity.eff_alpha", self.eff_alpha, 0.0, 1.0, low_open=True)
        check_rank_bounds("sensitivity", self.r_min, self.r_max)
        if self.r_min < 1:
            raise ConfigError(f"method.sensitivity.r_min={self.r_min} must be >= 1 (every target keeps an adapter)")


@dataclass
class CgSettings:
    """CG-LoRA (docs/METHODS.md §5)."""

    eta: Any = "auto"  # "auto" (η* of the exact quadratic model, backtracked on held-out batches) or a number
    eta_scale: float = 1.0  # eta=auto: η* times this before the backtracking over {η, η/4, η/16, 0}
    eta_holdout_batches: int = 1  # eta=auto: last calibration batches kept out of the estimate, to check η
    shift: bool = False  # true: subtract s·B₀A₀ from W; export converts back to the original base
    allocate: str = "uniform"  # uniform | greedy (CTR-LoRA's allocator on ½σ² of the whitened gradient)
    r_min: int = 0  # greedy only
    r_max: int | None = None  # greedy only; null: max(r̄, min(64, 4 r̄))
    score: str = "per_param"  # greedy only: per_param | raw

    def validate(self) -> None:
        if self.eta != "auto":
            try:
                eta = float(self.eta)
            except (TypeError, ValueError):
                raise ConfigError(f"method.cg.eta={self.eta!r} must be 'auto' or a positive number") from None
            check_range("cg.eta", eta, 0.0, float("inf"), low_open=True)
        check_range("cg.eta_scale", self.eta_scale, 0.0, float("inf"), low_open=True)
        if self.eta_holdout_batches < 1:
            raise ConfigError(f"method.cg.eta_holdout_batches={self.eta_holdout_batches} must be >= 1")
        check_choice("method.cg.allocate", self.allocate, ("uniform", "greedy"))
        check_choice("method.cg.score", self.score, GREEDY_SCORES)
        check_rank_bounds("cg", self.r_min, self.r_max)


@dataclass
class CtrSettings:
    """CTR-LoRA (docs/METHODS.md §6)."""

    allocation: str = "greedy"  # greedy | uniform
    score: str = "per_param"  # per_param | raw
    r_min: int = 0
    r_max: int | None = None  # null: max(r̄, min(64, 4 r̄))
    oversampling: int = 10
    power_iters: int = 2
    init: str = "lora"  # lora (A random, B = 0) | curvature (un-whitened singular directions, scaled small)
    init_scale: float = 1e-3
    trust_region: bool = True
    metric: str = "fisher"  # fisher (damped raw factors: the penalty in loss units) | normalized (unit mean, ablation)
    metric_rank: int | None = None  # metric factors held as top-k eigenpairs + isotropic rest; null: as estimated
    lambda0: float = 0.1
    lambda_schedule: str = "cosine"  # cosine | linear | constant
    refresh_every: int = 500
    refresh_source: str = "calibration"  # calibration | training
    refresh_batches: int = 8
    reallocate: bool = False
    hysteresis: float = 0.10
    freeze_at: float = 0.75
    compose: str = "none"  # none | loraplus | dora | pissa

    def validate(self) -> None:
        check_choice("method.ctr.allocation", self.allocation, ALLOCATIONS)
        check_choice("method.ctr.score", self.score, GREEDY_SCORES)
        check_choice("method.ctr.init", self.init, CTR_INITS)
        check_choice("method.ctr.lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULES)
        check_choice("method.ctr.refresh_source", self.refresh_source, REFRESH_SOURCES)
        check_choice("method.ctr.compose", self.compose, COMPOSITIONS)
        check_choice("method.ctr.metric", self.metric, TRUST_REGION_METRICS)
        check_rank_bounds("ctr", self.r_min, self.r_max)
        check_range("ctr.lambda0", self.lambda0, 0.0, float("inf"))
        check_range("ctr.hysteresis", self.hysteresis, 0.0, float("inf"))
        check_range("ctr.freeze_at", self.freeze_at, 0.0, 1.0)
        check_range("ctr.init_scale", self.init_scale, 0.0, float("inf"), low_open=True)
        for key in ("refresh_every", "refresh_batches"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.ctr.{key}={getattr(self, key)} must be >= 1")
        if self.metric_rank is not None and self.metric_rank < 1:
            raise ConfigError(f"method.ctr.metric_rank={self.metric_rank} must be >= 1 (or null: the factors as estimated)")
        if self.oversampling < 0 or self.power_iters < 0:
            raise ConfigError(
                f"method.ctr.oversampling={self.oversampling} and power_iters={self.power_iters} must be >= 0"
            )
        if self.refresh_source == "training" and self.refresh_batches > self.refresh_every:
            raise ConfigError(
                f"method.ctr.refresh_batches={self.refresh_batches} must be <= method.ctr.refresh_every="
                f"{self.refresh_every} (the window of training steps before each refresh)"
            )
        if self.compose == "pissa" and self.init == "curvature":
            raise ConfigError("method.ctr.compose=pissa and method.ctr.init=curvature both set the initial adapter; pick one")
