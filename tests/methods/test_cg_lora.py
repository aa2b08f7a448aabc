"""CG-LoRA: the closed-form initial step, balanced factors, the quadratic model, shift and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from ctrlora import report
from ctrlora.methods.allocating import lora_layers
from ctrlora.methods.base import build_method
from ctrlora.methods.cg_lora import mean_token_loss

from .curvature_method_helpers import (
    build_run,
    dense_curvature,
    full_label_batches,
    logits,
    matrix_power,
    relative_error,
    reload_in_plain_peft,
    target_names,
    tiny_fp64_llama,
    train_config,
)


def closed_form_steps(cfg, rank: int, eta: float, **widths: int) -> tuple[dict[str, torch.Tensor], float]:
    """``ΔW₀ = η S_g^{-1/2} [T]_r S_a^{-1/2}``, ``T = −S_g^{-1/2} G S_a^{-1/2}`` densely, and the
    quadratic model's change ``(−η + η²/2) Σ σ²`` summed over the targets (`widths`: of the model)."""
    model, batches = tiny_fp64_llama(**widths), full_label_batches()
    steps, squared = {}, 0.0
    for name, dense in dense_curvature(model, batches, target_names(model), cfg.curvature).items():
        g_root, a_root = matrix_power(dense["g"], -0.5), matrix_power(dense["a"], -0.5)
        U, S, Vh = torch.linalg.svd(-g_root @ dense["grad"] @ a_root)
        steps[name] = eta * g_root @ U[:, :rank] @ torch.diag(S[:rank]) @ Vh[:rank] @ a_root
        squared += float((S[:rank] ** 2).sum())
    return steps, (-eta + 0.5 * eta**2) * squared


def test_initial_update_is_the_closed_form_with_balanced_factors(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, "cg_lora", "budget.rank=2", "method.cg.eta=0.5")
    peft_model = build_method(cfg, total_steps=20, run_dir=tmp_path).prepare(tiny_fp64_llama(), full_label_batches())
    expected, _ = closed_form_steps(cfg, rank=2, eta=0.5)
    layers = lora_layers(peft_model)
    assert set(layers) == set(expected) and len(layers) == 14
    for name, layer in layers.items():
        B, A = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
        assert relative_error(layer.scaling["default"] * B @ A, expected[name]) < 1e-5, name
        gram_b, gram_a = B.T @ B, A @ A.T
        assert relative_error(gram_b, gram_a) < 1e-5, name  # balanced: BᵀB = AAᵀ ...
        assert relative_error(gram_b, torch.diag(gram_b.diagonal())) < 1e-5, name  # ... and diagonal


def test_the_svd_is_exact_where_a_randomized_one_would_not_be(tmp_path: Path) -> None:
    """METHODS §5: exact top-r SVD for m, n ≤ 4096. Here every target is wider than the 2 + 10 columns of
    the randomized SVD that CTR-LoRA's allocation uses, and the update still matches the closed form."""
    widths = {"hidden_size": 32, "intermediate_size": 48}  # k/v: 16 × 32
    cfg = train_config(tmp_path, "cg_lora", "budget.rank=2", "method.cg.eta=1")
    peft_model = build_method(cfg, total_steps=20, run_dir=tmp_path).prepare(
        tiny_fp64_llama(**widths), full_label_batches()
    )
    expected, _ = closed_form_steps(cfg, rank=2, eta=1.0, **widths)
    for name, layer in lora_layers(peft_model).items():
        assert min(expected[name].shape) > 2 + 10, name
        B, A = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
        assert relative_error(layer.scaling["default"] * B @ A, expected[name]) < 1e-5, name


def test_first_step_change_in_loss_follows_the_quadratic_model(tmp_path: Path) -> None:
    eta = 1e-3
    cfg = train_config(tmp_path, "cg_lora", "budget.rank=2", f"method.cg.eta={eta}")
    batches = full_label_batches()
    before = mean_token_loss(tiny_fp64_llama(), batches)
    peft_model = build_method(cfg, total_steps=20, run_dir=tmp_path).prepare(tiny_fp64_llama(), batches)
    change = mean_token_loss(peft_model, batches) - before
    _, predicted = closed_form_steps(cfg, rank=2, eta=eta)
    assert change < 0 and predicted < 0
    assert change / predicted == pytest.approx(1.0, rel=1e-2)


def test_eta_search_keeps_the_best_eta_on_the_held_out_batch(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, "cg_lora", "budget.rank=2", "method.cg.eta_grid=[1e-4,1e-3,1e-2]")
    method = build_method(cfg, total_steps=20, run_dir=tmp_path)
    batches = full_label_batches(count=3)
    peft_model = method.prepare(tiny_fp64_llama(), batches)
    record = json.loads((tmp_path / "allocation.json").read_text())
    search = {float(eta): loss for eta, loss in record["eta_search"].items() if eta != "0"}
    assert record["eta"] == min(search, key=search.get) == method.eta
    assert mean_token_loss(peft_model, batches[2:]) == pytest.approx(search[method.eta], rel=1e-6)
    assert method.curvature_reports[0]["tokens"] == 2 * 3 * 8  # the estimate saw the first two batches only


FULL_TEXT = ["data.prompt_template=''", "data.completion_template='{text} Topic: {label}'"]  # every token supervised


def test_shift_keeps_the_initial_function_and_the_export_reproduces_the_trained_model(tmp_path: Path) -> None:
    # η fixed small: s·B₀A₀ is subtracted from W in fp32, so a large step would cancel W's digits
    run = build_run(tmp_path, "cg_lora", "method.cg.shift=true", "method.cg.allocate=greedy", "method.cg.eta=1e-3", *FULL_TEXT)
    batch = next(iter(run.datamodule.calibration_dataloader()))
    base_path = run.model.peft_config["default"].base_model_name_or_path
    original = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    assert torch.allclose(logits(run.model, batch), logits(original, batch), atol=1e-4)
    assert len(set(run.method.ranks.values())) > 1  # greedy: unequal ranks
    assert any(layer.lora_B["default"].weight.abs().sum() > 0 for layer in lora_layers(run.model).values())

    before = mean_token_loss(run.model, [batch])
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert mean_token_loss(run.model, [batch]) < before - 0.05

    report.save_adapter(run.method, run.model, run.tokenizer, tmp_path / "adapter")
    trained = logits(run.model, batch)
    reloaded = reload_in_plain_peft(tmp_path, tmp_path / "adapter", batch)
    assert torch.allclose(reloaded, trained, atol=1e-4)
    assert not torch.allclose(reloaded, logits(original, batch), atol=1e-3)
