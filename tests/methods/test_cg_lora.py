"""CG-LoRA: the closed-form initial step, balanced factors, the quadratic model, shift and export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.func import functional_call
from transformers import AutoModelForCausalLM

from ctrlora import report
from ctrlora.methods.base import build_method
from ctrlora.methods.cg_lora import mean_token_loss
from ctrlora.peft_layout import lora_layers

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


def closed_form_steps(cfg, rank: int, eta: float, batches=None, **widths: int) -> tuple[dict[str, torch.Tensor], float]:
    """``ΔW₀ = η S_g^{-1/2} [T]_r S_a^{-1/2}``, ``T = −S_g^{-1/2} G S_a^{-1/2}`` densely, and the
    quadratic model's change ``(−η + η²/2) Σ σ²`` summed over the targets (`widths`: of the model)."""
    model, batches = tiny_fp64_llama(**widths), batches or full_label_batches()
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
    """docs/METHODS.md §5: exact top-r SVD for m, n ≤ 4096. Here every target is wider than the 2 + 10 columns of
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


def dense_quadratic_model(model, batches, directions: dict[str, torch.Tensor]) -> tuple[float, float]:
    """``(∇L̄ᵀd, dᵀ GGN d)`` of the mean token loss with the dense Jacobian J of the logits in the stacked
    target weights and the dense Gauss–Newton matrix ``GGN = (1/T) Σ_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t``."""
    names = list(directions)
    weights = [model.get_submodule(name).weight.detach() for name in names]
    flat = torch.cat([weight.reshape(-1) for weight in weights])
    direction = torch.cat([directions[name].reshape(-1) for name in names])

    def counted_logits(values: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, weight in zip(names, weights, strict=True):
            params[f"{name}.weight"] = values[offset : offset + weight.numel()].view_as(weight)
            offset += weight.numel()
        rows = []
        for batch in batches:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            rows.append(functional_call(model, params, (), inputs).logits[:, :-1].reshape(-1, 40))
        return torch.cat(rows)

    jacobian = torch.autograd.functional.jacobian(counted_logits, flat, vectorize=True)  # tokens × vocab × params
    probs = counted_logits(flat).softmax(-1)
    labels = torch.cat([batch["labels"][:, 1:].reshape(-1) for batch in batches])
    residual = probs - torch.nn.functional.one_hot(labels, 40).double()
    tokens = labels.numel()
    gradient = torch.einsum("tv,tvp->p", residual, jacobian) / tokens
    ggn = torch.zeros(flat.numel(), flat.numel(), dtype=torch.float64)
    for row, jac in zip(probs, jacobian, strict=True):
        ggn += jac.T @ (torch.diag(row) - torch.outer(row, row)) @ jac
    return float(gradient @ direction), float(direction @ (ggn / tokens) @ direction)


def test_eta_star_minimises_the_exact_quadratic_model_along_the_joint_direction(tmp_path: Path) -> None:
    cfg = train_config(tmp_path, "cg_lora", "budget.rank=2")
    method = build_method(cfg, total_steps=20, run_dir=tmp_path)
    batches = full_label_batches(count=3)
    peft_model = method.prepare(tiny_fp64_llama(), batches)
    report.write_allocation(method, tmp_path)  # allocation.json, as a run writes it after prepare
    assert method.curvature_reports[0]["tokens"] == 2 * 3 * 8  # the estimate saw the first two batches only

    directions, _ = closed_form_steps(cfg, rank=2, eta=1.0, batches=batches[:2])
    slope, curvature = dense_quadratic_model(tiny_fp64_llama(), batches[:2], directions)
    record = json.loads((tmp_path / "allocation.json").read_text())
    assert record["eta_model"]["slope"] == pytest.approx(slope, rel=1e-8)
    assert record["eta_model"]["curvature"] == pytest.approx(curvature, rel=1e-8)
    assert record["eta_model"]["eta_star"] == pytest.approx(-slope / curvature, rel=1e-8)
    assert record["eta"] == method.eta == record["eta_model"]["eta_star"] and record["init"] == "curvature step"

    before = mean_token_loss(tiny_fp64_llama(), batches[:2])
    assert mean_token_loss(peft_model, batches[:2]) < before  # the first step lowers the calibration loss
    assert mean_token_loss(peft_model, batches[2:]) == pytest.approx(record["eta_search"][repr(method.eta)], rel=1e-10)
    for name, layer in lora_layers(peft_model).items():
        weight = layer.base_layer.weight
        update = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        assert record["modules"][name]["update_to_weight"] == pytest.approx(float(update.norm() / weight.norm()), rel=1e-6)


def test_when_every_step_raises_the_held_out_loss_the_adapters_keep_loras_init(tmp_path: Path, caplog) -> None:
    cfg = train_config(tmp_path, "cg_lora", "budget.rank=2", "method.cg.eta_scale=1e4")  # every candidate overshoots
    method = build_method(cfg, total_steps=20, run_dir=tmp_path)
    batches = full_label_batches(count=3)
    held_out = batches[2]  # labelled with the pretrained model's own predictions: any large step hurts them
    held_out["labels"] = torch.cat([held_out["labels"][:, :1], logits(tiny_fp64_llama(), held_out).argmax(-1)[:, :-1]], 1)
    peft_model = method.prepare(tiny_fp64_llama(), batches)
    report.write_allocation(method, tmp_path)  # allocation.json, as a run writes it after prepare
    record = json.loads((tmp_path / "allocation.json").read_text())
    search = record["eta_search"]
    assert len(search) == 4 and all(loss > search["0"] for eta, loss in search.items() if eta != "0")
    assert method.eta == record["eta"] == 0 and record["init"].startswith("lora")
    assert "keep LoRA's init" in caplog.text
    for layer in lora_layers(peft_model).values():
        assert not layer.lora_B["default"].weight.any()  # B = 0: the pretrained function
        A = layer.lora_A["default"].weight
        bound = 1 / A.shape[1] ** 0.5  # PEFT's kaiming_uniform(a=√5) init of A
        assert A.abs().max() <= bound and A.abs().max() > 0.5 * bound


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
