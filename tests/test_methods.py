"""Every baseline trains on tiny-llama with falling loss, and each does what its paper/PEFT says."""

from __future__ import annotations

import math
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, compose_config
from omegaconf import OmegaConf
from peft import PeftModel
from transformers import AutoModelForCausalLM

from ctrlora import report
from ctrlora.config import validate_config
from ctrlora.errors import ConfigError
from ctrlora.methods.base import build_method
from ctrlora.run import RunParts, assemble


def build(tmp_path: Path, method: str, *extra: str) -> RunParts:
    composed = compose_config([f"method={method}", f"run_dir={tmp_path}", "optim.lr=5e-3", *FAST, *extra])
    return assemble(OmegaConf.to_object(composed), tmp_path)


def fixed_batch(run: RunParts) -> dict[str, torch.Tensor]:
    return next(iter(run.datamodule.calibration_dataloader()))


def token_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over supervised positions, from the logits alone."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


@torch.no_grad()
def eval_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    loss = float(token_loss(model, batch))
    model.train(was_training)
    return loss


@pytest.mark.parametrize(
    ("method", "extra"),
    [("lora", ()), ("lora", ("method.rslora=true",)), ("dora", ()), ("pissa", ()), ("loraplus", ()),
     ("adalora", ("optim.lr=5e-2",)), ("qlora", ())],  # AdaLoRA: E starts at 0 and A, B at N(0, 0.02²)
    ids=["lora", "rslora", "dora", "pissa", "loraplus", "adalora", "qlora"],
)
def test_method_trains_20_steps_with_falling_loss(tmp_path: Path, method: str, extra: tuple[str, ...]) -> None:
    run = build(tmp_path, method, *extra)
    batch = fixed_batch(run)
    before = eval_loss(run.model, batch)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 20
    after = eval_loss(run.model, batch)
    assert after < before - 0.05, f"{method}: loss {before:.4f} -> {after:.4f}"


def test_adalora_ranks_shrink_to_target_and_regulariser_is_in_the_loss(tmp_path: Path) -> None:
    run = build(tmp_path, "adalora")
    config = run.model.peft_config["default"]
    assert (config.init_r, config.target_r, config.total_step) == (12, 8, 20)  # ceil(1.5·8), r̄, steps
    energies = {name: p for name, p in run.model.named_parameters() if "lora_E" in name}
    assert sum(int(e.numel()) for e in energies.values()) == 12 * len(energies)

    batch = fixed_batch(run)
    regulariser = sum(
        torch.linalg.matrix_norm((p @ p.T if "lora_A" in name else p.T @ p) - torch.eye(p.shape[0] if "lora_A" in name else p.shape[1]))
        for name, p in run.model.named_parameters() if "lora_A" in name or "lora_B" in name
    ) / sum(1 for name, _ in run.model.named_parameters() if "lora_A" in name or "lora_B" in name)
    with torch.no_grad():
        model_loss = run.model(**batch).loss
        assert float(model_loss - token_loss(run.model, batch)) == pytest.approx(0.5 * float(regulariser), rel=1e-4)
        assert float(regulariser) > 0

    run.trainer.fit(run.module, datamodule=run.datamodule)
    kept = sum(int((e != 0).sum()) for e in energies.values())
    assert kept == config.target_r * len(energies)


def test_loraplus_puts_b_at_16x_the_learning_rate_of_a(tmp_path: Path) -> None:
    run = build(tmp_path, "loraplus")
    groups = run.module.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in run.model.named_parameters()}
    lr_a = {g["initial_lr"] for g in groups for p in g["params"] if "lora_A" in names[id(p)]}
    lr_b = {g["initial_lr"] for g in groups for p in g["params"] if "lora_B" in names[id(p)]}
    assert lr_a == {5e-3} and lr_b == {16 * 5e-3}


def test_qlora_targets_are_4bit_bitsandbytes_layers(tmp_path: Path) -> None:
    run = build(tmp_path, "qlora")
    targets = [m for n, m in run.model.named_modules() if n.endswith(("q_proj", "down_proj")) and hasattr(m, "base_layer")]
    assert len(targets) == 4
    for module in targets:
        assert isinstance(module.base_layer, bnb.nn.Linear4bit)
        assert module.base_layer.weight.quant_state.quant_type == "nf4"
    assert run.method.describe()["backbone_params"] == 107_328  # counted at logical size, as unquantised


def test_pissa_export_applies_to_the_original_base(tmp_path: Path) -> None:
    run = build(tmp_path, "pissa")
    run.trainer.fit(run.module, datamodule=run.datamodule)
    batch = fixed_batch(run)
    run.model.eval()
    with torch.no_grad():
        trained = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    report.save_adapter(run.method, run.model, run.tokenizer, tmp_path / "adapter")
    base_path = run.model.peft_config["default"].base_model_name_or_path
    original = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    exported = PeftModel.from_pretrained(original, tmp_path / "adapter").eval()
    with torch.no_grad():
        reproduced = exported(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(reproduced, trained, atol=1e-4)
    assert not math.isclose(float(trained.abs().sum()), 0.0)


def test_adalora_refuses_the_lora_switches_it_cannot_apply(tmp_path: Path) -> None:
    for switch in ("method.rslora=true", "method.use_dora=true", "method.init=gaussian", "method.loraplus_ratio=16"):
        with pytest.raises(ConfigError, match=f"method=adalora does not take {switch.split('=')[0]}="):
            validate_config(compose_config([f"run_dir={tmp_path}", "method=adalora", switch]))  # before weights load
    build_method(OmegaConf.to_object(compose_config([f"run_dir={tmp_path}", "method=adalora"])), total_steps=10, run_dir=tmp_path)
