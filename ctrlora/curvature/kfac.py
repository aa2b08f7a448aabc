"""`kfac` estimator (docs/METHODS.md §3): Kronecker factors with tokens as examples (K-FAC "expand").

Over the P statistics positions p (every non-padding position) and the T counted tokens of the
calibration set:

    S_a = (1/P) Σ_p x_p x_pᵀ              (d_in x d_in)
    S_g = (1/T) Σ_p g_p g_pᵀ              (d_out x d_out)
    G   = (1/T) Σ_p g_p x_pᵀ              (d_out x d_in, when asked)

with ``g_p = ∂L/∂y_p`` for the SUM ``L`` of the per-token losses, so its scale does not depend on
the batch size. The Fisher of the mean token loss is ``(1/T) Σ_p (g_p g_pᵀ) ⊗ (x_p x_pᵀ)`` under
K-FAC's per-position independence; replacing the sum of products by P times the product of the
position means gives ``S_g ⊗ S_a`` with the scales above (with P = T when every position is
supervised, as in docs/METHODS.md §3). ``S_g ⊗ S_a`` approximates that Fisher:
``ΔL ≈ ⟨G, ΔW⟩ + ½ tr(ΔWᵀ S_g ΔW S_a)``. ``fisher: empirical`` takes g_t from the true labels;
``fisher: mc`` from ``mc_samples`` label sets drawn from the model (seeded), averaging
``S_g`` over the draws, which makes ``E[S_g]`` the (type-2) Fisher factor. ``G`` always uses the true
labels and is the exact gradient of the mean loss. All three sum over every position, since a
position whose own label is ignored (a prompt token) still passes gradient to later tokens through
attention (padding positions carry none): counting only supervised tokens in S_a and S_g, as
docs/METHODS.md §3 literally reads, leaves the directions of prompt inputs out of S_a while G holds them,
and the whitened gradient S_g^{-1/2} G S_a^{-1/2} blows up along them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from ctrlora.curvature.activation import input_factors
from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.factors import stored_factor
from ctrlora.curvature.hooks import TargetRecorder
from ctrlora.curvature.memory import StoragePlan
from ctrlora.curvature.objectives import Objective
from ctrlora.curvature.passes import CrossProductSums, OuterProductSums, run_pass
from ctrlora.curvature.result import ModuleCurvature
from ctrlora.curvature.runtime import accumulation_dtype


def estimate_kfac(
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
    """S_a, S_g (and dense G) of every target in `modules` from one pass."""
    dtype = accumulation_dtype(modules.values())
    input_sums, grad_sums, gradient_sums = OuterProductSums(dtype), OuterProductSums(dtype), CrossProductSums(dtype)
    fisher_job = "labels" if cfg.fisher == "empirical" else "sampled"

    def on_output_grad(name: str, grad: Tensor, inputs: Tensor | None, job: str) -> None:
        if job == fisher_job:
            grad_sums.add(name, recorder.token_rows(name, grad))
        if job == "labels" and want_dense_grad:
            gradient_sums.add(
                name, grad.reshape(-1, grad.shape[-1]), inputs.reshape(-1, inputs.shape[-1])
            )

    recorder = TargetRecorder(
        modules, on_input=input_sums.add, on_output_grad=on_output_grad, stash_inputs=want_dense_grad
    )
    if cfg.fisher == "empirical":
        jobs = ["labels"]
    else:
        jobs = ["sampled"] * cfg.mc_samples + (["labels"] if want_dense_grad else [])
    try:
        tokens, positions = run_pass(
            model,
            batches,
            recorder,
            objective,
            jobs=jobs,
            seed=cfg.seed,
            description=description,
            progress=progress,
        )
    finally:
        # on_output_grad refers to the recorder, which refers to it and to every sum: left in place, that
        # cycle would keep the factors alive after the caller drops them, until a garbage collection
        recorder.on_output_grad = None
    a_factors = input_factors(input_sums.means(positions), recorder, plan)
    draws = 1 if cfg.fisher == "empirical" else cfg.mc_samples
    g_moments = grad_sums.means(tokens * draws)
    for name in modules:
        if name not in g_moments:
            raise RuntimeError(f"no output gradient reached target {name!r}: is its output used by the loss?")
    gradients = gradient_sums.means(tokens) if want_dense_grad else {}
    return {
        name: ModuleCurvature(
            a=a_factors[name],
            g=stored_factor(g_moments[name], plan.module(name).g.rank),
            grad=gradients.get(name),
            tokens=tokens,
        )
        for name in modules
    }
