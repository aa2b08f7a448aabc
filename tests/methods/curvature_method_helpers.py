"""Shared pieces of the curvature-method tests: configs, tiny fp64 models, dense oracles, runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from conftest import FAST, compose_config
from omegaconf import OmegaConf
from transformers import LlamaConfig, LlamaForCausalLM

from ctrlora.config import TrainConfig
from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.run import RunParts, assemble

SMALL_CALIBRATION = ["calibration.num_samples=32", "calibration.batch_size=8"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def train_config(tmp_path: Path, method: str, *extra: str) -> TrainConfig:
    composed = compose_config([f"method={method}", f"run_dir={tmp_path}", "optim.lr=5e-3", *FAST, *SMALL_CALIBRATION, *extra])
    return OmegaConf.to_object(composed)


def build_run(tmp_path: Path, method: str, *extra: str) -> RunParts:
    return assemble(train_config(tmp_path, method, *extra), tmp_path)


def tiny_fp64_llama(seed: int = 0, hidden_size: int = 12, intermediate_size: int = 20) -> LlamaForCausalLM:
    """A 2-layer Llama in fp64 with unequal projection shapes (GQA: k/v are narrower than q)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, pad_token_id=0, attn_implementation="sdpa",
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config).double().eval()


def full_label_batches(seed: int = 0, count: int = 3, batch: int = 3, length: int = 9) -> list[dict[str, torch.Tensor]]:
    """Random token batches in which every position is supervised (no padding, no prompt)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        ids = torch.randint(1, 40, (batch, length), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def target_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in PROJECTIONS]


def dense_curvature(model, batches, names, cfg: CurvatureConfig, want_grad: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """Damped dense ``S_a``, ``S_g`` (docs/METHODS.md §3: ``S + γ tr(S)/d I``) and raw G of every target."""
    result = estimate_curvature(model, batches, names, cfg, want_grad=want_grad, progress=False)
    dense = {}
    for name in names:
        a, g = result[name].a.dense(), result[name].g.dense()
        dense[name] = {
            "a": a + cfg.damping * torch.trace(a) / a.shape[0] * torch.eye(a.shape[0], dtype=a.dtype),
            "g": g + cfg.damping * torch.trace(g) / g.shape[0] * torch.eye(g.shape[0], dtype=g.dtype),
            "grad": result[name].grad,
        }
    return dense


def matrix_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values**power) @ vectors.T


def normalised(matrix: torch.Tensor) -> torch.Tensor:
    return matrix / (torch.trace(matrix) / matrix.shape[0])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def reload_in_plain_peft(tmp_path: Path, adapter: Path, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits of `adapter` on its base, computed in a subprocess that never imports ctrlora."""
    from test_run import PLAIN_PEFT

    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "plain_peft.py"
    script.write_text(PLAIN_PEFT)
    subprocess.run(
        [sys.executable, str(script), str(adapter), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path,
    )
    return torch.load(tmp_path / "out.pt")


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    return out
