"""The GPU paths on tiny-llama: bf16 autocast, NF4 on CUDA, SDPA / flash attention, DDP and FSDP2 over NCCL.

Marked ``gpu`` and skipped without CUDA (the multi-GPU ones without two devices); the same paths run on
CPU in test_methods.py (NF4), test_distributed.py (gloo DDP) and test_fsdp.py (gloo FSDP2). Run them on
a GPU machine with ``pytest -m gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import SHORT_RUN, compose_config
from omegaconf import OmegaConf
from test_distributed import run_train

from ctrlora.backbones import load_backbone
from ctrlora.config import ModelConfig
from ctrlora.report import logged_losses
from ctrlora.run import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
ONE_GPU = ["trainer=gpu"]  # bf16-mixed; SHORT_RUN's steps
NCCL = ["trainer.devices=2", "trainer.process_group_backend=nccl"]


def tiny_llama(*overrides: str) -> ModelConfig:
    return OmegaConf.to_object(compose_config(["model=tiny-llama", *overrides])).model


def losses_fall(run_dir: Path) -> bool:
    _, losses = logged_losses(run_dir)
    return losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["lora", "ctrlora", "cg_lora"])
def test_bf16_autocast_trains_with_fp32_adapters(tmp_path: Path, method: str) -> None:
    results = train(compose_config([f"run_dir={tmp_path}", f"method={method}", *SHORT_RUN, *ONE_GPU]))
    assert results["meta"]["precision"] == "bf16-mixed" and results["meta"]["device"] != "cpu"
    assert losses_fall(tmp_path)
    assert results["train"]["peak_memory_bytes"] > 0


def test_nf4_weights_on_cuda_train_and_stay_4bit(tmp_path: Path) -> None:
    import bitsandbytes as bnb

    results = train(compose_config([f"run_dir={tmp_path}", "method=qlora", *SHORT_RUN, *ONE_GPU]))
    assert losses_fall(tmp_path) and results["run"]["budget"]["trainable_params"] > 0
    backbone = load_backbone(tiny_llama(), accelerator="gpu", quantize_4bit=True)
    layers = [module for module in backbone.modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.device.type == "cuda" for layer in layers)
    assert {layer.weight.quant_state.quant_type for layer in layers} == {"nf4"}


@pytest.mark.parametrize("implementation", ["sdpa", "flash_attention_2"])
def test_fused_attention_matches_eager_in_bf16(implementation: str) -> None:
    if implementation == "flash_attention_2":
        pytest.importorskip("flash_attn")
    config = tiny_llama("model.dtype=bfloat16")
    eager = load_backbone(config, accelerator="gpu")
    eager.set_attn_implementation("eager")
    fused = load_backbone(config, accelerator="gpu")
    fused.set_attn_implementation(implementation)
    tokens = torch.randint(3, 200, (2, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        expected, actual = (model(input_ids=tokens).logits.float() for model in (eager, fused))
    assert (actual - expected).abs().max() < 5e-2 * expected.abs().max()


@two_gpus
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("method", ["lora", "ctrlora"])
def test_two_gpus_over_nccl_follow_one_gpu(tmp_path: Path, strategy: str, method: str) -> None:
    overrides = [f"method={method}", *SHORT_RUN, "trainer.precision=32-true"]
    single = train(compose_config([f"run_dir={tmp_path / 'one'}", "data.batch_size=8", *overrides, *ONE_GPU]))
    both = run_train(tmp_path / "two", "data.batch_size=4", f"trainer={strategy}", *NCCL, *overrides)
    assert (single["meta"]["world_size"], both["meta"]["world_size"]) == (1, 2)
    _, one_losses = logged_losses(tmp_path / "one")
    _, two_losses = logged_losses(tmp_path / "two")
    assert two_losses == pytest.approx(one_losses, rel=1e-3)  # NCCL reductions in fp32: not bit-equal
    assert both["train"]["tokens"] == single["train"]["tokens"]


@pytest.mark.parametrize("method", ["lora", "ctrlora"])
def test_vllm_backend_scores_the_saved_adapter_like_hflm(tmp_path: Path, method: str) -> None:
    pytest.importorskip("vllm")
    wide = ["model.tiny.hidden_size=256", "model.tiny.intermediate_size=512"]  # head size 64: one vLLM serves
    common = [f"method={method}", *SHORT_RUN, *ONE_GPU, *wide, "eval=local", "eval.limit=32", "seed=0"]
    hf = train(compose_config([f"run_dir={tmp_path / 'hf'}", *common]))
    vllm = train(compose_config([f"run_dir={tmp_path / 'vllm'}", *common, "eval.backend=vllm"]))
    assert vllm["eval"]["versions"]["backend"] == "vllm"
    for task, metrics in hf["eval"].items():
        if task in ("base", "versions"):
            continue
        for metric, value in metrics.items():  # bf16 engines: the same choices up to near-ties
            assert vllm["eval"][task][metric]["value"] == pytest.approx(value["value"], abs=0.1), (task, metric)
