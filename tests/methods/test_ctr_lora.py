"""CTR-LoRA's mathematics through the method: utilities, allocation, the penalty, grow and shrink."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ctrlora.allocation import allocate_ranks, allocation_params
from ctrlora.curvature.factors import DenseFactor
from ctrlora.curvature.spectra import randomized_svd
from ctrlora.errors import ConfigError
from ctrlora.methods.adapter_resize import grown_factors, replace_adapter, shrunk_factors
from ctrlora.methods.base import build_method
from ctrlora.peft_layout import lora_layers

from .curvature_method_helpers import (
    dense_curvature,
    full_label_batches,
    logits,
    matrix_power,
    normalised,
    relative_error,
    target_names,
    tiny_fp64_llama,
    train_config,
)


def prepared(tmp_path: Path, *extra: str, dtype: torch.dtype = torch.float64):
    """A CTR-LoRA method prepared on the tiny fp64 Llama (adapters cast to `dtype` for exact checks)."""
    cfg = train_config(tmp_path, "ctrlora", "budget.rank=2", *extra)
    method = build_method(cfg, total_steps=20, run_dir=tmp_path)
    model = tiny_fp64_llama() if dtype == torch.float64 else tiny_fp64_llama().float()
    peft_model = method.prepare(model, full_label_batches())
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.to(dtype)
    return cfg, method, peft_model


@pytest.mark.parametrize("kind", ["kfac", "hutchinson"])
def test_utilities_are_half_squared_singular_values_and_the_greedy_spends_the_budget(tmp_path: Path, kind) -> None:
    cfg, method, peft_model = prepared(tmp_path, f"curvature={kind}", "curvature.probes=4")
    model, batches = tiny_fp64_llama(), full_label_batches()
    utilities = {}
    for name, dense in dense_curvature(model, batches, target_names(model), cfg.curvature).items():
        whitened = matrix_power(dense["g"], -0.5) @ dense["grad"] @ matrix_power(dense["a"], -0.5)
        sigma = torch.linalg.svdvals(whitened)[: method.r_max]
        utilities[name] = (0.5 * sigma**2).tolist()
        assert method.utilities[name] == pytest.approx(utilities[name], rel=1e-8), name

    costs = method.costs
    expected = allocate_ranks(utilities, costs, method.budget.allowed_params, 0, method.r_max, "greedy")
    assert method.ranks == expected and method.r_max == 8  # max(r̄, min(64, 4 r̄)) with r̄ = 2
    assert allocation_params(method.ranks, costs) <= method.budget.allowed_params == 2 * sum(costs.values())
    adapted = {name for name, rank in method.ranks.items() if rank > 0}
    assert set(lora_layers(peft_model)) == adapted
    assert set(peft_model.peft_config["default"].target_modules) == adapted


def dense_penalty(cfg, peft_model, anchors=None, metric: str = "fisher") -> torch.Tensor:
    """``½ Σ_l vec(ΔW)ᵀ (S_g ⊗ S_a) vec(ΔW)`` with ``ΔW = s(BA − B⁰A⁰)``, the Kronecker product built
    densely from the damped factors: raw (``fisher``: a causal LM's T/N is 1) or at unit mean eigenvalue."""
    model = tiny_fp64_llama()
    layers = lora_layers(peft_model)
    dense = dense_curvature(model, full_label_batches(), list(layers), cfg.curvature, want_grad=False)
    total = torch.zeros((), dtype=torch.float64)
    for name, layer in layers.items():
        B, A = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
        delta = layer.scaling["default"] * B @ A
        if anchors is not None:
            delta = delta - anchors[name]
        s_g, s_a = dense[name]["g"], dense[name]["a"]
        if metric == "normalized":
            s_g, s_a = normalised(s_g), normalised(s_a)
        vec = delta.reshape(-1)  # row-major: vec(ΔW)ᵀ (S_g ⊗ S_a) vec(ΔW) = tr(ΔWᵀ S_g ΔW S_a)
        total = total + 0.5 * vec @ torch.kron(s_g, s_a) @ vec
    return total


def perturb_adapters(peft_model, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


@pytest.mark.parametrize("metric", ["fisher", "normalized"])
def test_penalty_equals_the_dense_kronecker_metric_and_its_gradient_matches_finite_differences(
    tmp_path: Path, metric: str
) -> None:
    cfg, method, peft_model = prepared(tmp_path, "method.ctr.lambda0=0.25", f"method.ctr.metric={metric}")
    perturb_adapters(peft_model)
    extra = method.extra_loss(peft_model, step=0)
    assert method.step_metrics()["lambda"] == 0.25
    assert float(extra) == pytest.approx(0.25 * float(dense_penalty(cfg, peft_model, metric=metric)), rel=1e-6)

    params = [p for p in peft_model.parameters() if p.requires_grad]
    gradients = torch.autograd.grad(extra, params)
    generator = torch.Generator().manual_seed(2)
    direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
    epsilon = 1e-6

    def shifted(sign: float) -> float:
        with torch.no_grad():
            for param, step in zip(params, direction, strict=True):
                param.add_(sign * epsilon * step)
            value = float(method.extra_loss(peft_model, step=0))
            for param, step in zip(params, direction, strict=True):
                param.sub_(sign * epsilon * step)
        return value

    finite_difference = (shifted(1.0) - shifted(-1.0)) / (2 * epsilon)
    analytic = sum(float((g * d).sum()) for g, d in zip(gradients, direction, strict=True))
    assert finite_difference == pytest.approx(analytic, rel=1e-6)


def test_pissa_composition_penalises_the_displacement_from_the_pretrained_weight(tmp_path: Path) -> None:
    cfg, method, peft_model = prepared(tmp_path, "method.ctr.compose=pissa", dtype=torch.float32)
    anchors = {
        name: (layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).double().detach()
        for name, layer in lora_layers(peft_model).items()
    }
    assert max(float(a.abs().max()) for a in anchors.values()) > 0.1  # PiSSA starts at W's principal part
    undisplaced = 0.1 * float(dense_penalty(cfg, peft_model))  # what the penalty of s·BA alone would be
    assert abs(float(method.extra_loss(peft_model, step=0))) < 1e-6 * undisplaced
    perturb_adapters(peft_model)
    expected = 0.1 * float(dense_penalty(cfg, peft_model, anchors))
    assert float(method.extra_loss(peft_model, step=0)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("scaling", ["constant", "standard"])
def test_growing_an_adapter_leaves_the_outputs_unchanged(tmp_path: Path, scaling: str) -> None:
    _, method, peft_model = prepared(tmp_path, "method.ctr.allocation=uniform", f"method.scaling={scaling}")
    perturb_adapters(peft_model)
    batch = full_label_batches()[0]
    before = logits(peft_model, batch)
    name = "model.layers.0.self_attn.q_proj"
    layer = lora_layers(peft_model)[name]
    old_A = layer.lora_A["default"].weight.detach().clone()
    alpha = method.alpha_for(5)
    replace_adapter(layer, name, peft_model.peft_config["default"], *grown_factors(layer, 5, alpha), alpha)

    assert torch.allclose(logits(peft_model, batch), before, rtol=0, atol=1e-12)
    B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
    assert A.shape == (5, 12) and B.shape == (12, 5) and layer.r["default"] == 5
    assert torch.equal(A[:2], old_A) and A[2:].abs().min() > 0 and torch.equal(B[:, 2:], torch.zeros(12, 3, dtype=B.dtype))
    assert peft_model.peft_config["default"].rank_pattern[name] == 5
    assert layer.scaling["default"] == pytest.approx(method.scaling_for(5))


def test_shrinking_keeps_the_best_approximation_in_the_curvature_metric(tmp_path: Path) -> None:
    cfg, method, peft_model = prepared(tmp_path, "method.ctr.allocation=uniform", "method.scaling=standard")
    name = "model.layers.1.mlp.up_proj"
    layer = lora_layers(peft_model)[name]
    alpha = method.alpha_for(4)
    replace_adapter(layer, name, peft_model.peft_config["default"], *grown_factors(layer, 4, alpha), alpha)
    perturb_adapters(peft_model)
    B, A = layer.lora_B["default"].weight.detach(), layer.lora_A["default"].weight.detach()
    delta = layer.scaling["default"] * B @ A

    model = tiny_fp64_llama()
    dense = dense_curvature(model, full_label_batches(), [name], cfg.curvature, want_grad=False)[name]
    g_half, a_half = matrix_power(dense["g"], 0.5), matrix_power(dense["a"], 0.5)
    U, S, Vh = torch.linalg.svd(g_half @ delta @ a_half)
    expected = torch.linalg.solve(g_half, U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]) @ torch.linalg.inv(a_half)

    new_alpha = method.alpha_for(2)
    shrunk_b, shrunk_a = shrunk_factors(layer, 2, new_alpha, DenseFactor(dense["a"]), DenseFactor(dense["g"]))
    assert relative_error(new_alpha / 2 * shrunk_b @ shrunk_a, expected) < 1e-9
    gram_b, gram_a = shrunk_b.T @ shrunk_b, shrunk_a @ shrunk_a.T
    assert relative_error(gram_b, gram_a) < 1e-9  # balanced


def test_reallocation_moves_rank_within_the_budget_and_resets_only_changed_moments(tmp_path: Path) -> None:
    cfg, method, peft_model = prepared(tmp_path, "method.ctr.reallocate=true", "method.ctr.hysteresis=0")
    perturb_adapters(peft_model, scale=0.5)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    method.extra_loss(peft_model, step=0).backward()
    optimizer.step()
    assert all(len(optimizer.state[p]) > 0 for p in params)
    before = dict(method.ranks)

    refreshed = method.estimate(
        peft_model.get_base_model(), full_label_batches(), list(method.layers), method.curvature_settings(),
        want_grad=True, label="refresh",
    )
    changes = method.refresher.reallocate_ranks(refreshed, optimizer, step=5)
    assert changes, "this case is meant to move rank units"
    assert allocation_params(method.ranks, method.costs) <= method.budget.allowed_params
    assert {name for name, rank in method.ranks.items() if rank > 0} == {n for n, r in before.items() if r > 0}
    for name, layer in method.layers.items():
        B, A = layer.lora_B["default"].weight, layer.lora_A["default"].weight
        assert A.shape[0] == B.shape[1] == method.ranks[name] == peft_model.peft_config["default"].rank_pattern[name]
        assert (len(optimizer.state[A]) == 0) == (name in changes), name
    optimizer.zero_grad()
    method.extra_loss(peft_model, step=1).backward()
    optimizer.step()  # the resized parameters train on
    assert method.refresher.history[-1]["utility_after"] >= method.refresher.history[-1]["utility_before"]


@pytest.mark.parametrize(
    ("method", "override", "message"),
    [
        ("ctrlora", "method.ctr.lambda_schedule=cosin", "method.ctr.lambda_schedule='cosin' is not valid; choose one of"),
        ("ctrlora", "method.ctr.compose=adalora", "method.ctr.compose='adalora' is not valid"),
        ("ctrlora", "curvature=activation", "use curvature=kfac or curvature=hutchinson"),
        ("ctrlora", "method.rslora=true", "use method.scaling=rslora"),
        ("ctrlora", "method.scaling=sqrt", "method.scaling='sqrt' is not valid"),
        ("cg_lora", "method.cg.eta=big", "method.cg.eta='big' must be 'auto' or a positive number"),
        ("cg_lora", "method.cg.allocate=proportional", "method.cg.allocate='proportional' is not valid"),
        ("sensitivity_lora", "method.sensitivity.r_min=0", "method.sensitivity.r_min=0 must be >= 1"),
    ],
)
def test_bad_settings_fail_naming_the_key_and_the_valid_choices(tmp_path: Path, method, override, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):  # a method's own keys: when the config is built
        build_method(train_config(tmp_path, method, override), total_steps=20, run_dir=tmp_path)


def test_the_estimate_cache_tells_a_held_out_split_from_the_whole_calibration_set(tmp_path: Path) -> None:
    cache = f"curvature.cache_dir={tmp_path / 'cache'}"
    batches = full_label_batches()
    reports = []
    for method, extra in [("ctrlora", []), ("ctrlora", []), ("cg_lora", [])]:
        cfg = train_config(tmp_path / str(len(reports)), method, "budget.rank=2", cache, *extra)
        built = build_method(cfg, total_steps=20, run_dir=tmp_path / str(len(reports)))
        built.prepare(tiny_fp64_llama(), batches)
        reports.append(built.curvature_reports[0])
    assert [report["cached"] for report in reports] == [False, True, False]  # CG estimates on 2 of the 3 batches
    assert reports[2]["tokens"] == 2 / 3 * reports[0]["tokens"]


def test_a_checkpoint_whose_ranks_no_refresh_explains_is_refused(tmp_path: Path) -> None:
    _, method, _ = prepared(tmp_path)
    state = method.state_dict()
    name = next(iter(method.layers))
    state["ranks"][name] += 1
    with pytest.raises(ConfigError, match="differ from this run's step-0 allocation"):
        method.load_state_dict(state)


def rebatched(batches: list[dict[str, torch.Tensor]], size: int, repeat: int = 1) -> list[dict[str, torch.Tensor]]:
    """The same sequences (each `repeat` times) in batches of `size`."""
    stacked = {key: torch.cat([batch[key] for batch in batches] * repeat) for key in batches[0]}
    count = next(iter(stacked.values())).shape[0]
    return [{key: value[start : start + size] for key, value in stacked.items()} for start in range(0, count, size)]


def test_the_fisher_penalty_is_in_loss_units_whatever_the_batching_and_token_count(tmp_path: Path) -> None:
    """The factors are per-token means of per-token statistics: neither the calibration batch size nor
    repeating every sequence (twice the tokens) changes the metric, so λ keeps its meaning."""
    values = []
    for index, batches in enumerate([full_label_batches(), rebatched(full_label_batches(), 9), rebatched(full_label_batches(), 2, 2)]):
        cfg = train_config(tmp_path / str(index), "ctrlora", "budget.rank=2", "method.ctr.allocation=uniform")
        method = build_method(cfg, total_steps=20, run_dir=tmp_path / str(index))
        peft_model = method.prepare(tiny_fp64_llama(), batches)
        for param in peft_model.parameters():
            if param.requires_grad:
                param.data = param.data.double()
        perturb_adapters(peft_model)
        values.append(float(method.extra_loss(peft_model, step=0)))
        assert method.trust.loss_scale == 1.0  # a causal LM trains on the mean token loss itself
    assert values[1] == pytest.approx(values[0], rel=1e-10)
    assert values[2] == pytest.approx(values[0], rel=1e-10)


def test_utilities_come_from_an_exact_svd_where_a_randomized_one_is_off(tmp_path: Path) -> None:
    """docs/METHODS.md §6.1: exact SVD of the whitened gradient for m, n ≤ 4096. The targets here are wider than
    r_max + oversampling (8 + 10), where the randomized SVD would be used otherwise."""
    widths = {"hidden_size": 48, "intermediate_size": 64}
    cfg = train_config(tmp_path, "ctrlora", "budget.rank=2", "method.ctr.power_iters=0")
    method = build_method(cfg, total_steps=20, run_dir=tmp_path)
    model, batches = tiny_fp64_llama(**widths), full_label_batches()
    method.prepare(model, batches)
    worst_randomized = 0.0
    for name, dense in dense_curvature(tiny_fp64_llama(**widths), batches, target_names(model), cfg.curvature).items():
        whitened = matrix_power(dense["g"], -0.5) @ dense["grad"] @ matrix_power(dense["a"], -0.5)
        assert min(whitened.shape) > method.r_max + 10, name
        sigma = torch.linalg.svdvals(whitened)[: method.r_max]
        assert method.utilities[name] == pytest.approx((0.5 * sigma**2).tolist(), rel=1e-9), name
        approximate = randomized_svd(whitened, method.r_max, oversampling=10, power_iters=0)[1]
        worst_randomized = max(worst_randomized, relative_error(approximate, sigma))
    assert worst_randomized > 1e-3  # what the exact SVD is for
