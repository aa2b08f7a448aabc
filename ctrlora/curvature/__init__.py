"""Curvature estimators (docs/METHODS.md §3): activation moments, K-FAC factors, Hutchinson diagonals.

Public names are imported lazily, so `ctrlora.curvature.config` (used by the Hydra schema) stays
cheap to import.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "CurvatureConfig": "config",
    "ESTIMATORS": "estimate",
    "estimate_curvature": "estimate",
    "Factor": "factors",
    "DenseFactor": "factors",
    "LowRankFactor": "factors",
    "DiagonalFactor": "factors",
    "damped_pair": "factors",
    "find_targets": "hooks",
    "kronecker_fit": "hutchinson",
    "StoragePlan": "memory",
    "memory_report": "memory",
    "plan_storage": "memory",
    "CurvatureReport": "result",
    "CurvatureResult": "result",
    "ModuleCurvature": "result",
    "whitened_gradient_svd": "spectra",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
