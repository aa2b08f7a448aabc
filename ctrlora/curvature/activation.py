"""`activation` estimator (docs/METHODS.md §3): input second moments ``S_a = (1/P) Σ_p x_p x_pᵀ``, forward only.

The sum runs over the objective's statistics positions (every non-padding position; see
`ctrlora.curvature.objectives`): the layer's reconstruction error matters wherever it is applied.

This is Sensitivity-LoRA's Hessian proxy: the layer-wise reconstruction Hessian of ``W``, shared by
all rows, so ``h_ij = [S_a]_jj``. The passes run under ``torch.no_grad``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.factors import Factor, stored_factor
from ctrlora.curvature.hooks import TargetRecorder
from ctrlora.curvature.memory import StoragePlan
from ctrlora.curvature.objectives import Objective
from ctrlora.curvature.passes import OuterProductSums, run_pass
from ctrlora.curvature.result import ModuleCurvature
from ctrlora.curvature.runtime import accumulation_dtype


def input_factors(
    moments: dict[str, Tensor], recorder: TargetRecorder, plan: StoragePlan
) -> dict[str, Factor]:
    """Store each target's S_a as planned; targets that shared an input share one Factor object."""
    factors: dict[str, Factor] = {}
    for name in recorder.modules:
        if name not in recorder.input_alias:
            raise RuntimeError(f"target {name!r} was never called during the calibration pass")
    for name, alias in recorder.input_alias.items():
        if alias is None:
            factors[name] = stored_factor(moments[name], plan.module(name).a.rank)
    for name, alias in recorder.input_alias.items():
        if alias is not None:
            factors[name] = factors[alias]
    return factors


def estimate_activation(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    modules: dict[str, nn.Module],
    cfg: CurvatureConfig,
    plan: StoragePlan,
    objective: Objective,
    *,
    want_dense_grad: bool,
    description: str,
    progress: bool,
) -> dict[str, ModuleCurvature]:
    """S_a of every target in `modules` from one forward-only pass."""
    if want_dense_grad:
        raise ValueError(
            "curvature.kind='activation' is forward only and has no gradient; use kfac or hutchinson"
        )
    sums = OuterProductSums(accumulation_dtype(modules.values()))
    recorder = TargetRecorder(modules, on_input=sums.add)
    tokens, positions = run_pass(
        model,
        batches,
        recorder,
        objective,
        jobs=[],
        seed=cfg.seed,
        description=description,
        progress=progress,
    )
    factors = input_factors(sums.means(positions), recorder, plan)
    return {name: ModuleCurvature(a=factors[name], tokens=tokens) for name in modules}
