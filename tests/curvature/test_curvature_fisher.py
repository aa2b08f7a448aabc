"""K-FAC against exact Fisher / Gauss–Newton matrices: deep linear networks and the MC Fisher of an LM."""

from __future__ import annotations

import torch
from torch import nn

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.curvature.objectives import SquaredErrorObjective

from .helpers import assert_close, lm_batches, tiny_llama

WIDTHS = [4, 5, 3, 2]  # a 3-layer linear network 4 -> 5 -> 3 -> 2


def deep_linear_network() -> tuple[nn.Sequential, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    network = nn.Sequential(
        *(nn.Linear(a, b, bias=False) for a, b in zip(WIDTHS, WIDTHS[1:], strict=False))
    ).double()
    batches = [
        {
            "inputs": torch.randn(16, WIDTHS[0], dtype=torch.float64),
            "targets": torch.randn(16, WIDTHS[-1], dtype=torch.float64),
        }
        for _ in range(2)
    ]
    return network, batches


def exact_ggn(network: nn.Sequential, batches: list[dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """GGN of the mean loss ½‖f − y‖² w.r.t. the row-major vec of one weight: (1/N) Σ_n J_nᵀ J_n."""
    weight = dict(network.named_parameters())[f"{name}.weight"]
    inputs = torch.cat([batch["inputs"] for batch in batches])

    def outputs(w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(network, {f"{name}.weight": w}, (inputs,))

    jacobian = torch.func.jacrev(outputs)(weight.detach()).reshape(-1, weight.numel())
    return jacobian.T @ jacobian / len(inputs)


class UnitVectorTargets(SquaredErrorObjective):
    """Draw c returns targets f − e_c, so the output gradient is e_c: over d_out draws the sampled
    outer products sum to H_ℓ = I exactly (K-FAC's type-2 factor, without sampling noise)."""

    def __init__(self, dim: int) -> None:
        self.dim, self.draws = dim, 0

    def sample_targets(self, outputs, batch, generator):
        unit = torch.zeros(self.dim, dtype=outputs.dtype)
        unit[self.draws % self.dim] = 1.0
        self.draws += 1
        return outputs.detach() - unit


def test_kfac_equals_the_exact_ggn_of_a_deep_linear_network():
    network, batches = deep_linear_network()
    targets = ["0", "1", "2"]
    cfg = CurvatureConfig(kind="kfac", fisher="mc", mc_samples=WIDTHS[-1])
    result = estimate_curvature(
        network, batches, targets, cfg, objective=UnitVectorTargets(WIDTHS[-1]), progress=False
    )
    for name in targets:
        kfac = torch.kron(WIDTHS[-1] * result[name].g.dense(), result[name].a.dense())
        assert_close(kfac, exact_ggn(network, batches, name), 1e-10)


def test_gaussian_mc_fisher_matches_the_ggn_within_sampling_error():
    network, batches = deep_linear_network()
    cfg = CurvatureConfig(kind="kfac", fisher="mc", mc_samples=200, seed=1)
    result = estimate_curvature(network, batches, ["1"], cfg, progress=False)["1"]
    kfac = torch.kron(result.g.dense(), result.a.dense())
    error = (kfac - exact_ggn(network, batches, "1")).norm() / exact_ggn(network, batches, "1").norm()
    assert error < 0.05  # 6400 Gaussian draws: about 2% expected
    again = estimate_curvature(network, batches, ["1"], cfg, progress=False)["1"]
    other_seed = estimate_curvature(
        network, batches, ["1"], CurvatureConfig(fisher="mc", mc_samples=200, seed=2), progress=False
    )["1"]
    assert torch.equal(again.g.dense(), result.g.dense())
    assert not torch.allclose(other_seed.g.dense(), result.g.dense())


def expected_mc_output_factor(model, batch, target: str) -> torch.Tensor:
    """E[S_g] under labels drawn from the model: (1/T) Σ_t Σ_s J_stᵀ (diag p_s − p_s p_sᵀ) J_st over counted
    s, t of one sequence, with J_st = ∂logits_s / ∂y_t from torch.func.jacrev."""
    module = dict(model.named_modules())[target]
    rows, width = batch["input_ids"].shape
    mask = torch.zeros_like(batch["labels"], dtype=torch.bool)
    mask[:, :-1] = (batch["labels"][:, 1:] != -100) & batch["attention_mask"][:, :-1].bool()

    def logits_given(delta: torch.Tensor) -> torch.Tensor:
        handle = module.register_forward_hook(lambda _m, _a, output: output + delta)
        try:
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            handle.remove()

    delta = torch.zeros(rows, width, module.out_features, dtype=torch.float64)
    jacobian = torch.func.jacrev(logits_given)(delta).detach()
    probs = logits_given(delta).detach().softmax(-1)
    expected = torch.zeros(module.out_features, module.out_features, dtype=torch.float64)
    for b in range(rows):
        counted = mask[b].nonzero().flatten().tolist()
        for t in counted:
            for s in counted:
                block = jacobian[b, s, :, b, t, :]
                hessian = torch.diag(probs[b, s]) - torch.outer(probs[b, s], probs[b, s])
                expected += block.T @ hessian @ block
    return expected / int(mask.sum())


def test_mc_fisher_of_a_language_model_matches_its_expectation():
    model = tiny_llama()
    batch = lm_batches()[0]
    target = "model.layers.1.mlp.down_proj"
    expected = expected_mc_output_factor(model, batch, target)
    mc_cfg, empirical_cfg = CurvatureConfig(fisher="mc", mc_samples=256), CurvatureConfig(fisher="empirical")
    mc = estimate_curvature(model, [batch], [target], mc_cfg, want_grad=True, progress=False)
    empirical = estimate_curvature(model, [batch], [target], empirical_cfg, want_grad=True, progress=False)
    assert_close(mc[target].grad, empirical[target].grad, 1e-12)  # G always uses the true labels

    def error(result):
        return float((result[target].g.dense() - expected).norm() / expected.norm())

    assert error(mc) < 0.15  # about 0.08 expected at 256 draws
    assert error(empirical) > 0.5  # the test tells the two Fishers apart
