"""eval.backend=vllm: the uniform-rank adapter vLLM serves, its engine's arguments, and the refusals before training.

vLLM itself needs a GPU (and is not installed here): tests/test_gpu.py runs the suite through it where it is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from ctrlora.backbones import load_backbone
from ctrlora.environment import check_environment
from ctrlora.errors import ConfigError
from ctrlora.evaluation.vllm_backend import uniform_rank_adapter, vllm_model_args
from evaluation.helpers import train_config

TOKENS = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 21]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_the_uniform_rank_adapter_reproduces_per_module_ranks_and_alphas(tiny, tmp_path: Path, rslora: bool) -> None:
    cfg, _, backbone = tiny
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, use_rslora=rslora,
        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 7},
        alpha_pattern={"model.layers.0.self_attn.q_proj": 3.0, "model.layers.1.self_attn.v_proj": 20.0},
    )
    adapted = get_peft_model(backbone, config)
    expected = logits(adapted)
    adapted.save_pretrained(tmp_path / "adapter")

    assert uniform_rank_adapter(tmp_path / "adapter", tmp_path / "adapter_vllm") == 7
    written = json.loads((tmp_path / "adapter_vllm" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["rank_pattern"], written["alpha_pattern"]) == (7, 7, {}, {})
    assert not written["use_rslora"]
    tensors = load_file(tmp_path / "adapter_vllm" / "adapter_model.safetensors")
    ranks = {value.shape[0] if key.endswith("lora_A.weight") else value.shape[1] for key, value in tensors.items()}
    assert ranks == {7} and len(tensors) == 2 * 2 * 3  # A and B of 3 projections in 2 layers
    reloaded = PeftModel.from_pretrained(load_backbone(cfg.model), tmp_path / "adapter_vllm")
    assert torch.allclose(logits(reloaded), expected, atol=1e-5)
    assert not torch.allclose(logits(load_backbone(cfg.model)), expected, atol=1e-3)  # the adapter matters


def test_the_engine_gets_the_base_weights_the_adapter_at_a_served_rank_and_the_extra_arguments(tmp_path: Path) -> None:
    cfg = train_config(["eval=local", "eval.backend=vllm", "eval.seed=3", "+eval.vllm_args.gpu_memory_utilization=0.7"],
                       tmp_path).eval
    args = vllm_model_args(cfg, "/weights/llama", tmp_path / "adapter_vllm", rank=20)
    assert args == {
        "pretrained": "/weights/llama", "batch_size": "auto", "max_length": cfg.max_length, "seed": 3,
        "lora_local_path": str(tmp_path / "adapter_vllm"), "max_lora_rank": 32, "gpu_memory_utilization": 0.7,
    }
    assert "lora_local_path" not in vllm_model_args(cfg, "/weights/llama", None, None)  # the base row
    with pytest.raises(ConfigError, match="rank 600 is above vLLM's largest LoRA rank 512"):
        vllm_model_args(cfg, "/weights/llama", tmp_path, rank=600)


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ([], "the vllm package is not installed"),
        (["model=minilm-l6", "eval=local"], "vLLM evaluates causal LMs with LoRA only"),
        (["method=ctrlora", "method.ctr.compose=dora"], r"method=ctrlora \(use_dora=True\): vLLM serves LoRA adapters only"),
        (["method=adalora"], "vLLM serves LoRA adapters only"),
        (["method=qlora"], "trained on 4-bit weights"),
    ],
)
def test_vllm_refuses_before_training_what_it_cannot_evaluate(tmp_path: Path, overrides: list[str], problem: str) -> None:
    composed = compose_config(["eval=local", "eval.backend=vllm", *overrides])
    with pytest.raises(ConfigError, match=f"eval.backend=vllm: .*{problem}.*Use eval.backend=hf"):
        check_environment(composed)


def test_an_unknown_backend_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval\.backend='vlm' is not valid; choose one of \['hf', 'vllm'\]"):
        train_config(["eval.backend=vlm"], tmp_path)
