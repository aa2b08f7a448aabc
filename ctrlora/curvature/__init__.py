"""Curvature estimators (METHODS §3): activation moments, K-FAC factors, Hutchinson diagonals."""

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import ESTIMATORS, estimate_curvature
from ctrlora.curvature.factors import DenseFactor, DiagonalFactor, Factor, LowRankFactor, damped_pair
from ctrlora.curvature.hooks import find_targets
from ctrlora.curvature.hutchinson import kronecker_fit
from ctrlora.curvature.memory import StoragePlan, memory_report, plan_storage
from ctrlora.curvature.result import CurvatureReport, CurvatureResult, ModuleCurvature
from ctrlora.curvature.spectra import whitened_gradient_svd

__all__ = [
    "ESTIMATORS",
    "CurvatureConfig",
    "CurvatureReport",
    "CurvatureResult",
    "DenseFactor",
    "DiagonalFactor",
    "Factor",
    "LowRankFactor",
    "ModuleCurvature",
    "StoragePlan",
    "damped_pair",
    "estimate_curvature",
    "find_targets",
    "kronecker_fit",
    "memory_report",
    "plan_storage",
    "whitened_gradient_svd",
]
