"""Factor storage plans from configs alone, and estimation in layer groups under a memory cap."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.curvature.factors import DenseFactor, LowRankFactor
from ctrlora.curvature.memory import GB, main, memory_report, plan_storage, resolve_grad_mode, target_shapes

from .helpers import assert_close, lm_batches, targets_of, tiny_llama

LLAMA2_7B = dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
LLAMA31_8B = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)


def llama_config(shape: dict[str, int]) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
    )


def projection_shapes(shape: dict[str, int]) -> list[tuple[int, int]]:
    """(d_in, d_out) of q, k, v, o, gate, up, down in one decoder layer."""
    hidden, inter = shape["hidden"], shape["intermediate"]
    kv = shape["kv_heads"] * hidden // shape["heads"]
    return [
        (hidden, hidden),
        (hidden, kv),
        (hidden, kv),
        (hidden, hidden),
        (hidden, inter),
        (hidden, inter),
        (inter, hidden),
    ]


def factor_bytes(shape: dict[str, int], stored) -> int:
    dims = [dim for pair in projection_shapes(shape) for dim in pair]
    return 4 * shape["layers"] * sum(stored(dim) for dim in dims)


@pytest.mark.parametrize("shape", [LLAMA2_7B, LLAMA31_8B], ids=["llama2-7b", "llama3.1-8b"])
def test_factor_memory_of_the_seven_projections_dense_and_under_the_storage_settings(shape):
    plan = memory_report(llama_config(shape), CurvatureConfig())
    assert len(plan.modules) == 7 * shape["layers"]
    assert plan.dense_factor_bytes() == factor_bytes(shape, lambda dim: dim * dim)
    assert plan.factor_bytes() == factor_bytes(
        shape, lambda dim: dim * dim if dim <= 4096 else dim * 256 + 257
    )
    down = plan.module("model.layers.0.mlp.down_proj")
    assert down.a.describe() == f"rank 256/{shape['intermediate']}" and down.g.describe() == "dense 4096"


def test_dense_totals_are_the_design_estimates():
    assert memory_report(
        llama_config(LLAMA2_7B), CurvatureConfig()
    ).dense_factor_bytes() / GB == pytest.approx(70.15, abs=0.01)
    assert memory_report(
        llama_config(LLAMA31_8B), CurvatureConfig()
    ).dense_factor_bytes() / GB == pytest.approx(98.52, abs=0.01)


@pytest.mark.parametrize("shape", [LLAMA2_7B, LLAMA31_8B], ids=["llama2-7b", "llama3.1-8b"])
def test_a_memory_cap_chooses_the_largest_rank_that_fits(shape):
    cfg = CurvatureConfig(max_factor_gb=4)
    plan = memory_report(llama_config(shape), cfg)
    rank = plan.factor_rank
    assert plan.factor_bytes() <= 4 * GB
    wider = plan_storage(
        {m.name: (m.d_in, m.d_out) for m in plan.modules},
        CurvatureConfig(dense_max_dim=0, factor_rank=rank + 1),
    )
    assert wider.factor_bytes() > 4 * GB
    for module in plan.modules:
        for factor in (module.a, module.g):
            assert (factor.storage, factor.rank) == (
                ("dense", None) if factor.dim <= rank else ("low_rank", rank)
            )
    rows = plan.to_dict()["modules"]
    assert rows[0]["a"] == f"rank {rank}/4096" and plan.to_dict()["factor_gb"] <= 4
    assert f"factor_rank={rank}" in plan.format()


def test_a_cap_the_settings_fit_in_keeps_the_settings():
    plan = memory_report(llama_config(LLAMA2_7B), CurvatureConfig(max_factor_gb=30))
    assert (plan.factor_rank, plan.dense_max_dim) == (256, 4096)
    with pytest.raises(ValueError, match="too small"):
        memory_report(llama_config(LLAMA2_7B), CurvatureConfig(max_factor_gb=0.005))


def test_report_accepts_an_arch_mapping_and_the_cli_prints_it(capsys):
    arch = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    }
    plan = memory_report(arch, CurvatureConfig())
    shape = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2)
    assert plan.dense_factor_bytes() == factor_bytes(shape, lambda dim: dim * dim) == 4 * 2 * 88064
    main(
        [
            "--hidden",
            "64",
            "--intermediate",
            "128",
            "--layers",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--vocab",
            "100",
        ]
    )
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "factors: 0.00 GB stored" in printed


def test_estimation_in_layer_groups_under_a_cap_matches_one_pass():
    model, batches = tiny_llama(), lm_batches()
    targets = targets_of(model)
    capped = CurvatureConfig(
        max_factor_gb=5000 * 8 / GB
    )  # 5000 fp64 numbers: several groups, truncated factors
    plan = plan_storage(target_shapes(model, targets), capped, element_bytes=8, want_grad=True)
    assert len(plan.groups) >= 3 and plan.factor_bytes() <= 5000 * 8
    result = estimate_curvature(model, batches, targets, capped, want_grad=True, progress=False)
    reference = estimate_curvature(model, batches, targets, CurvatureConfig(), want_grad=True, progress=False)
    assert result.report.passes == len(plan.groups)
    assert any(isinstance(result[name].g, LowRankFactor) for name in targets)
    for name in targets:
        module = plan.module(name)
        for side, factor_plan in (("a", module.a), ("g", module.g)):
            dense = DenseFactor(getattr(reference[name], side).dense())
            expected = dense if factor_plan.rank is None else dense.truncated(factor_plan.rank)
            assert type(getattr(result[name], side)) is type(expected)
            assert_close(getattr(result[name], side).dense(), expected.dense(), 1e-10)
        assert_close(result[name].grad, reference[name].grad, 1e-12)


def test_grad_mode_auto_keeps_g_dense_while_it_fits_and_sketches_above():
    shapes = {"a": (1000, 2000), "b": (500, 1000)}  # 2.5M elements: 10 MB in fp32, 20 MB in fp64
    auto = CurvatureConfig(dense_grad_max_gb=0.015)
    assert resolve_grad_mode(auto, shapes, element_bytes=4).grad_mode == "dense"
    assert resolve_grad_mode(auto, shapes, element_bytes=8).grad_mode == "sketch"
    assert resolve_grad_mode(CurvatureConfig(grad_mode="dense", dense_grad_max_gb=0), shapes).grad_mode == "dense"
    dense, sketched = (plan_storage(shapes, auto, element_bytes=size, want_grad=True) for size in (4, 8))
    assert dense.extra_bytes() == 4 * 2_500_000 and not dense.sketch  # G is stored
    assert sketched.extra_bytes() == 0 and sketched.sketch


@pytest.mark.parametrize("shape", [LLAMA2_7B, LLAMA31_8B], ids=["llama2-7b", "llama3.1-8b"])
def test_the_estimation_peak_is_the_factors_plus_the_largest_group_and_a_7b_gradient_is_sketched(shape):
    uncapped = memory_report(llama_config(shape), CurvatureConfig(), want_grad=True)
    assert uncapped.sketch and uncapped.extra_bytes() == 0  # ~26 GB of dense G is over dense_grad_max_gb
    accumulators = 4 * sum(module.working_numel for module in uncapped.modules)
    assert accumulators == uncapped.dense_factor_bytes()  # with G sketched: S_a and S_g of every target
    cholesky = 4 * sum(f.dim**2 for module in uncapped.modules for f in (module.a, module.g) if f.storage == "dense")
    assert 0 < cholesky < accumulators  # uncapped, the 4096-wide factors are dense: their sums are their storage
    assert uncapped.estimation_peak_bytes() == uncapped.factor_bytes() + accumulators - cholesky
    capped = memory_report(llama_config(shape), CurvatureConfig(max_factor_gb=8), want_grad=True)
    largest = max(sum(capped.module(name).working_numel for name in group) for group in capped.groups)
    assert 4 * largest <= 8 * GB and len(capped.groups) > 1
    # the sketch's passes whiten with the Cholesky factor of each damped dense factor; a low-rank one's damped
    # form shares its eigenvectors, and the cap truncates every factor of these models
    assert {f.storage for module in capped.modules for f in (module.a, module.g)} == {"low_rank"}
    assert capped.estimation_peak_bytes() == capped.factor_bytes() + 4 * largest


def test_a_dense_plan_holds_its_accumulators_once_and_matches_an_estimate(tmp_path):
    """All-dense factors and dense G (tiny-llama, K-FAC with G): the sums are divided in place, so the peak of
    the statistics is what is stored — the bytes the estimate's result holds, up to S_a shared by q/k/v and
    gate/up, which the plan counts per target."""
    model = tiny_llama()
    targets = targets_of(model)
    cfg = CurvatureConfig()
    plan = plan_storage(target_shapes(model, targets), cfg, element_bytes=8, want_grad=True)
    assert not plan.sketch and len(plan.groups) == 1
    assert plan.estimation_peak_bytes() == plan.factor_bytes() + plan.extra_bytes()
    result = estimate_curvature(model, lm_batches(), targets, cfg, want_grad=True, progress=False)
    held = {
        id(t): t.numel() * t.element_size()
        for curvature in result.modules.values()
        for t in [*curvature.a.tensors().values(), *curvature.g.tensors().values(), curvature.grad]
    }
    shared_inputs = sum(
        8 * plan.module(name).a.numel() for name in targets if name.endswith(("k_proj", "v_proj", "up_proj"))
    )
    assert sum(held.values()) == plan.estimation_peak_bytes() - shared_inputs


def test_the_cli_reads_a_model_presets_arch(capsys):
    main(["--model", "llama2-7b", "--want-grad", "--max-factor-gb", "8"])
    printed = capsys.readouterr().out
    plan = memory_report(llama_config(LLAMA2_7B), CurvatureConfig(max_factor_gb=8), want_grad=True)
    assert f"estimation peak (statistics, besides weights and activations): {plan.estimation_peak_bytes() / GB:.2f} GB" in printed
    assert "model.layers.31.mlp.down_proj" in printed


def test_the_cli_plans_a_tiny_builder_preset_and_names_the_valid_presets(capsys):
    main(["--model", "bench-small", "--want-grad"])
    printed = capsys.readouterr().out
    assert "model.layers.9.mlp.down_proj" in printed and "passes: 1" in printed
    main(["--model", "minilm-l6"])  # an encoder: its own target names and task
    assert "bert.encoder.layer.5.output.dense" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--model", "llama9"])
    error = capsys.readouterr().err
    assert "no " in error and "llama9.yaml" in error and "valid: bench-small, " in error


def test_the_metric_at_a_rank_holds_d_times_k_numbers_for_each_factor_wider_than_k(capsys):
    plan = plan_storage({"x": (8, 6)}, CurvatureConfig())  # S_a 8×8, S_g 6×6, both dense
    assert plan.metric_bytes(None) == 2 * (64 + 36) == plan.metric_bytes(8)
    assert plan.metric_bytes(4) == 2 * ((8 * 4 + 5) + (6 * 4 + 5))
    assert plan.metric_bytes(7, element_bytes=4) == 4 * ((8 * 7 + 8) + 36)  # S_g is not wider than 7
    main(["--model", "llama2-7b", "--want-grad", "--metric-rank", "64"])
    printed = capsys.readouterr().out.splitlines()[-1]
    full = memory_report(llama_config(LLAMA2_7B), CurvatureConfig(), want_grad=True)
    assert f"{full.metric_bytes(None) / GB:.2f} GB as estimated, {full.metric_bytes(64) / GB:.2f} GB at ctr.metric_rank=64" in printed
