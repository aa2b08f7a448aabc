"""Trust-region penalty against the dense Kronecker metric, its gradients and the λ schedules."""

from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from ctrlora.peft_layout import lora_weights
from ctrlora.trust_region import (
    LambdaSchedule,
    ModuleMetric,
    TrustRegionPenalty,
    kronecker_penalty,
)


class DenseFactor:
    """A dense SPD matrix behind the factor interface; records the shapes it is applied to."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix
        self.applied_to: list[tuple[int, ...]] = []

    def apply(self, X: torch.Tensor) -> torch.Tensor:
        self.applied_to.append(tuple(X.shape))
        return self.matrix.to(X.dtype) @ X


def random_spd(dim: int, generator: torch.Generator) -> torch.Tensor:
    root = torch.randn(dim, dim + 3, generator=generator, dtype=torch.float64)
    return root @ root.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)


def dense_penalty(delta: torch.Tensor, s_g: torch.Tensor, s_a: torch.Tensor) -> torch.Tensor:
    return torch.trace(delta.T @ s_g @ delta @ s_a)


def random_problem(m: int, n: int, r: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, generator=generator, dtype=torch.float64)
    A = torch.randn(r, n, generator=generator, dtype=torch.float64)
    return B, A, random_spd(m, generator), random_spd(n, generator)


@pytest.mark.parametrize(("m", "n", "r", "seed"), [(7, 5, 3, 0), (4, 9, 1, 1), (12, 12, 6, 2)])
def test_penalty_equals_dense_kronecker_metric(m, n, r, seed):
    B, A, s_g, s_a = random_problem(m, n, r, seed)
    g_factor, a_factor = DenseFactor(s_g), DenseFactor(s_a)
    scaling = 0.37
    penalty = kronecker_penalty(B, A, scaling, g_factor, a_factor)
    expected = dense_penalty(scaling * B @ A, s_g, s_a)
    assert penalty.dtype == torch.float64
    torch.testing.assert_close(penalty, expected, rtol=1e-12, atol=0.0)
    assert g_factor.applied_to == [(m, r)] and a_factor.applied_to == [(n, r)]  # never m×n


def test_penalty_gradients_match_finite_differences():
    B, A, s_g, s_a = random_problem(6, 5, 2, 3)
    B.requires_grad_(True)
    A.requires_grad_(True)
    factors = DenseFactor(s_g), DenseFactor(s_a)
    assert torch.autograd.gradcheck(lambda b, a: kronecker_penalty(b, a, 0.5, *factors), (B, A))
    factors = DenseFactor(s_g), DenseFactor(s_a)
    kronecker_penalty(B, A, 0.5, *factors).backward()
    assert factors[0].applied_to == [(6, 2)] and factors[1].applied_to == [(5, 2)]  # backward reuses them
    # d/dB s² tr(Bᵀ S_g B · A S_a Aᵀ) = 2 s² S_g B (A S_a Aᵀ); symmetric for A
    with torch.no_grad():
        torch.testing.assert_close(B.grad, 2 * 0.25 * s_g @ B @ (A @ s_a @ A.T))
        torch.testing.assert_close(A.grad, 2 * 0.25 * (B.T @ s_g @ B) @ A @ s_a)


def test_low_precision_adapters_are_upcast():
    B, A, s_g, s_a = random_problem(5, 4, 2, 4)
    penalty = kronecker_penalty(B.bfloat16(), A.bfloat16(), 1.0, DenseFactor(s_g), DenseFactor(s_a))
    assert penalty.dtype == torch.float32
    expected = dense_penalty(B.bfloat16().double() @ A.bfloat16().double(), s_g, s_a)
    torch.testing.assert_close(penalty.double(), expected, rtol=1e-5, atol=0.0)


def test_trust_region_penalty_sums_modules_and_updates():
    first, second = random_problem(6, 4, 2, 5), random_problem(3, 7, 3, 6)
    metrics = {
        "q": ModuleMetric(DenseFactor(first[2]), DenseFactor(first[3]), 0.5),
        "v": ModuleMetric(DenseFactor(second[2]), DenseFactor(second[3]), 2.0),
    }
    penalty = TrustRegionPenalty(metrics)
    adapters = {"q": first[:2], "v": second[:2]}
    expected = 0.5 * (
        dense_penalty(0.5 * first[0] @ first[1], first[2], first[3])
        + dense_penalty(2.0 * second[0] @ second[1], second[2], second[3])
    )
    torch.testing.assert_close(penalty(adapters), expected, rtol=1e-12, atol=0.0)
    identity = DenseFactor(torch.eye(3, dtype=torch.float64)), DenseFactor(torch.eye(7, dtype=torch.float64))
    penalty.update("v", ModuleMetric(*identity, 2.0))
    refreshed = 0.5 * (
        dense_penalty(0.5 * first[0] @ first[1], first[2], first[3])
        + 4.0 * (second[0] @ second[1]).square().sum()
    )
    torch.testing.assert_close(penalty(adapters), refreshed, rtol=1e-12, atol=0.0)
    with pytest.raises(KeyError, match="'q'"):
        penalty({"v": second[:2]})
    with pytest.raises(KeyError, match="'o'"):
        penalty.update("o", ModuleMetric(*identity, 1.0))


def test_peft_layout_maps_to_the_delta_weight():
    """(lora_B, lora_A) and PEFT's scaling reproduce PEFT's own delta weight in the metric."""
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).double()
    base_shapes = {
        name: module.weight.shape for name, module in base.named_modules() if hasattr(module, "weight")
    }
    model = get_peft_model(base, LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj", "down_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    weights = lora_weights(model)
    assert sorted(weights) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]
    generator = torch.Generator().manual_seed(7)
    metrics, expected = {}, 0.0
    for name, (B, A) in weights.items():
        m, n = base_shapes[name]
        assert B.shape == (m, 3) and A.shape == (3, n) and B.requires_grad
        layer = model.get_submodule(f"base_model.model.{name}")
        s_g, s_a = random_spd(m, generator), random_spd(n, generator)
        metrics[name] = ModuleMetric(DenseFactor(s_g), DenseFactor(s_a), layer.scaling["default"])
        expected = expected + 0.5 * dense_penalty(layer.get_delta_weight("default"), s_g, s_a)
    torch.testing.assert_close(TrustRegionPenalty(metrics)(weights), expected.detach(), rtol=1e-12, atol=0.0)


@pytest.mark.parametrize(("kind", "at_half"), [("cosine", 0.05), ("linear", 0.05), ("constant", 0.1)])
def test_schedules_hit_exact_values(kind, at_half):
    schedule = LambdaSchedule(kind, 0.1, 200)
    assert schedule(0) == 0.1
    assert schedule(100) == pytest.approx(at_half, rel=1e-15)
    assert schedule(200) == (0.1 if kind == "constant" else 0.0)
    assert schedule(-5) == schedule(0) and schedule(10_000) == schedule(200)


def test_cosine_schedule_follows_its_formula():
    schedule = LambdaSchedule("cosine", 0.2, 90)
    assert schedule(30) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert LambdaSchedule("linear", 0.2, 90)(30) == pytest.approx(0.2 * 2 / 3)


def test_schedule_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"'exp'.*cosine.*linear.*constant"):
        LambdaSchedule("exp", 0.1, 10)
    with pytest.raises(ValueError, match="total_steps"):
        LambdaSchedule("cosine", 0.1, 0)
    with pytest.raises(ValueError, match="lambda0"):
        LambdaSchedule("linear", -0.1, 10)
