"""Settings of the curvature estimators (docs/METHODS.md §3); the `curvature=` config group."""

from __future__ import annotations

from dataclasses import dataclass

from ctrlora.errors import ConfigError, check_choice

KINDS = ("kfac", "hutchinson", "activation")
FISHER_TYPES = ("empirical", "mc")
HUTCHINSON_MATRICES = ("hessian", "ggn")
GRAD_MODES = ("auto", "dense", "sketch")


def _check_positive(key: str, value: float | int, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"curvature.{key} must be {'≥' if allow_zero else '>'} 0, got {value}")


@dataclass
class CurvatureConfig:
    kind: str = "kfac"  # kfac | hutchinson | activation
    fisher: str = "empirical"  # kfac: empirical (true labels) | mc (labels sampled from the model)
    mc_samples: int = 1
    probes: int = 16  # hutchinson: Rademacher probes per calibration batch
    matrix: str = "hessian"  # hutchinson: hessian | ggn
    damping: float = 1e-3  # S <- S + damping * (tr S / dim) * I
    pi_damping: bool = False  # Martens & Grosse pi-corrected split for Kronecker pairs
    dense_max_dim: int = 4096  # wider factors are stored as top-k eigenpairs + isotropic rest
    factor_rank: int = 256
    grad_mode: str = "auto"  # auto | dense | sketch (randomized range sketch of the whitened gradient)
    dense_grad_max_gb: float = 4.0  # auto: dense while the targets' dense gradients fit in this (1e9 bytes)
    sketch_oversampling: int = 10  # sketch: extra range columns beyond the requested rank
    sketch_power_iters: int = 0  # sketch: power iterations (two more calibration passes each)
    max_factor_gb: float | None = None  # memory cap (1e9 bytes): truncation and layer groups chosen to fit
    keep_checkpointing: bool = True  # keep a model's activation checkpointing engaged in calibration passes
    cache_dir: str | None = None  # on-disk cache of estimates; null disables
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("curvature.kind", self.kind, KINDS)
        check_choice("curvature.fisher", self.fisher, FISHER_TYPES)
        check_choice("curvature.matrix", self.matrix, HUTCHINSON_MATRICES)
        check_choice("curvature.grad_mode", self.grad_mode, GRAD_MODES)
        _check_positive("mc_samples", self.mc_samples)
        _check_positive("probes", self.probes)
        _check_positive("damping", self.damping, allow_zero=True)
        _check_positive("dense_max_dim", self.dense_max_dim, allow_zero=True)
        _check_positive("factor_rank", self.factor_rank)
        _check_positive("sketch_oversampling", self.sketch_oversampling, allow_zero=True)
        _check_positive("sketch_power_iters", self.sketch_power_iters, allow_zero=True)
        _check_positive("dense_grad_max_gb", self.dense_grad_max_gb, allow_zero=True)
        if self.max_factor_gb is not None:
            _check_positive("max_factor_gb", self.max_factor_gb)
