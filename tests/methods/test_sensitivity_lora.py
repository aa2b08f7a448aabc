"""Sensitivity-LoRA end to end on a synthetic model whose target inputs have a known covariance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel

from ctrlora import report
from ctrlora.methods.base import build_method
from ctrlora.methods.cg_lora import mean_token_loss

from .curvature_method_helpers import build_run, logits, reload_in_plain_peft, train_config

INPUT_VARIANCES = [5.0, 1.0, 3.0, 0.5, 2.0, 4.0, 0.25, 1.5]  # diag of S_x; off-diagonals are exactly 0
TARGETS = {  # name: (out_features m, in_features n, input scale c) — the target sees c·x[:n]
    "layers.0.q_proj": (3, 4, 1.0),
    "layers.0.up_proj": (6, 8, 0.5),
    "layers.1.q_proj": (2, 6, 2.0),
    "layers.1.up_proj": (5, 3, 1.5),
}


class SyntheticConfig(PretrainedConfig):
    model_type = "synthetic_sensitivity"


class SyntheticModel(PreTrainedModel, GenerationMixin):
    """Parallel linear targets fed scaled slices of the input: ``S_a^{(l)} = c_l² S_x[:n_l, :n_l]``."""

    config_class = SyntheticConfig

    def __init__(self, config: SyntheticConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleList(
            nn.ModuleDict({kind: nn.Linear(TARGETS[f"layers.{i}.{kind}"][1], TARGETS[f"layers.{i}.{kind}"][0])
                           for kind in ("q_proj", "up_proj")})
            for i in range(2)
        )

    def get_input_embeddings(self) -> None:
        return None  # the inputs are features, not token ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # PEFT's causal-LM wrapper names the input so
        outputs = []
        for name, (_, n, scale) in TARGETS.items():
            layer, kind = name.split(".")[1:]
            outputs.append(self.layers[int(layer)][kind](scale * input_ids[..., :n]))
        return torch.cat(outputs, dim=-1)


def calibration_batches() -> list[dict[str, torch.Tensor]]:
    """20 tokens X (4 sequences of 5) with ``XᵀX / 20 = diag(INPUT_VARIANCES)`` exactly."""
    generator = torch.Generator().manual_seed(0)
    tokens, dim = 20, len(INPUT_VARIANCES)
    orthonormal = torch.linalg.qr(torch.randn(tokens, dim, generator=generator, dtype=torch.float64)).Q
    inputs = math.sqrt(tokens) * orthonormal * torch.tensor(INPUT_VARIANCES, dtype=torch.float64).sqrt()
    outputs = sum(m for m, _, _ in TARGETS.values())
    return [{"inputs": inputs.reshape(4, 5, dim), "targets": torch.zeros(4, 5, outputs, dtype=torch.float64)}]


def hand_metrics(topk_frac: float = 0.5, alpha: float = 0.85) -> dict[str, tuple[float, float, int]]:
    """(S_g, S_topk, S_eff) from all m·n sensitivities 2·c²·v_j, materialised and sorted."""
    metrics = {}
    for name, (m, n, scale) in TARGETS.items():
        values = np.sort(np.repeat(2 * scale**2 * np.array(INPUT_VARIANCES[:n]), m))[::-1]
        k = math.ceil(topk_frac * values.size)
        shares = np.cumsum(values) / values.sum()
        metrics[name] = (values.sum(), values[:k].mean(), int(np.argmax(shares >= alpha - 1e-12)) + 1)
    return metrics


def dispersion(values: list[float]) -> float:
    return float(np.std(values) / np.mean(values) ** 2)


def test_ranks_and_metrics_equal_hand_computed_values_end_to_end(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, "sensitivity_lora", "budget.rank=4", "method.alpha=8")
    method = build_method(cfg, total_steps=20, run_dir=tmp_path)
    torch.manual_seed(0)
    model = SyntheticModel(SyntheticConfig()).double()
    peft_model = method.prepare(model, calibration_batches())
    report.write_allocation(method, tmp_path)  # allocation.json, as a run writes it after prepare

    hand = hand_metrics()
    s_global, s_topk, s_eff = ([metrics[i] for metrics in hand.values()] for i in range(3))
    beta1, beta2 = dispersion(s_topk), dispersion(s_eff)
    s_local = [beta1 * a + beta2 * b for a, b in zip(s_topk, s_eff, strict=True)]
    gamma1, gamma2 = dispersion(s_global), dispersion(s_local)
    theta = [gamma1 * g + gamma2 * local for g, local in zip(s_global, s_local, strict=True)]
    quotas = [t / sum(theta) * 16 for t in theta]  # r_total = r̄ |T| = 4 · 4
    assert all(1 < q < 16 for q in quotas), "the hand case is meant to need no clamping"
    ranks = [math.floor(q) for q in quotas]
    for i in sorted(range(4), key=lambda i: -(quotas[i] - ranks[i]))[: 16 - sum(ranks)]:
        ranks[i] += 1
    expected_ranks = dict(zip(TARGETS, ranks, strict=True))
    assert method.ranks == expected_ranks and sum(ranks) == 16
    assert len(set(ranks)) > 1, "the hand case is meant to give unequal ranks"

    record = json.loads((tmp_path / "allocation.json").read_text())
    for i, name in enumerate(TARGETS):
        module = record["modules"][name]
        assert module["s_global"] == pytest.approx(s_global[i], rel=1e-9)
        assert module["s_topk"] == pytest.approx(s_topk[i], rel=1e-9)
        assert module["s_eff"] == s_eff[i]
        assert module["theta"] == pytest.approx(theta[i], rel=1e-9)
        assert module["params"] == ranks[i] * (TARGETS[name][0] + TARGETS[name][1])
    assert record["coefficients"] == pytest.approx(
        {"beta1": beta1, "beta2": beta2, "gamma1": gamma1, "gamma2": gamma2}, rel=1e-9
    )
    assert record["budget"]["rank_total"] == record["rank_total_allowed"] == 16
    assert (tmp_path / "rank_heatmap.png").stat().st_size > 0

    config = peft_model.peft_config["default"]
    assert config.rank_pattern == expected_ranks
    assert config.alpha_pattern == {name: 8.0 * rank / 4 for name, rank in expected_ranks.items()}
    for name, module in peft_model.base_model.model.named_modules():
        if name in TARGETS:  # constant scaling: every module uses s = α / r̄ whatever its rank
            assert module.lora_A["default"].weight.shape[0] == expected_ranks[name]
            assert module.scaling["default"] == pytest.approx(8.0 / 4)


@pytest.mark.parametrize(("scaling", "expected"), [("rslora", lambda r: 8.0 / math.sqrt(r)), ("standard", lambda r: 8.0 / r)])
def test_scaling_rules_give_each_module_its_scale(tmp_path: Path, scaling, expected) -> None:
    cfg = train_config(tmp_path, "sensitivity_lora", "budget.rank=4", "method.alpha=8", f"method.scaling={scaling}")
    method = build_method(cfg, total_steps=20, run_dir=tmp_path)
    peft_model = method.prepare(SyntheticModel(SyntheticConfig()).double(), calibration_batches())
    for name, module in peft_model.base_model.model.named_modules():
        if name in TARGETS:
            assert module.scaling["default"] == pytest.approx(expected(method.ranks[name]))


def test_trains_on_tiny_llama_and_its_unequal_rank_adapter_loads_in_plain_peft(tmp_path: Path) -> None:
    run = build_run(tmp_path, "sensitivity_lora")
    assert run.method.needs_calibration and len(set(run.method.ranks.values())) > 1
    assert sum(run.method.ranks.values()) == 8 * 14
    batch = next(iter(run.datamodule.calibration_dataloader()))
    before = mean_token_loss(run.model, [batch])
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert mean_token_loss(run.model, [batch]) < before - 0.05

    report.save_adapter(run.method, run.model, run.tokenizer, tmp_path / "adapter")
    reloaded = reload_in_plain_peft(tmp_path, tmp_path / "adapter", batch)
    assert torch.allclose(reloaded, logits(run.model, batch), atol=1e-5)
    assert run.method.curvature_summary()["estimates"][0]["kind"] == "activation"
