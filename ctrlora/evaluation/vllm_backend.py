"""``eval.backend=vllm``: the suite through lm-eval's vLLM model, on the base weights plus the saved adapter.

vLLM batches generation far better than HFLM (GSM8K's 256-token answers dominate the paper grid's
evaluation), but it serves a LoRA adapter of one rank and one alpha: its loader reads PEFT's ``r``
and ``lora_alpha``, not the per-module ``rank_pattern``/``alpha_pattern`` the curvature methods
write. So the saved adapter is rewritten at one rank R = max_l r_l, exactly: module l's
``(B_l, A_l)`` at scale ``s_l`` (``α_l / r_l``, or ``α_l / √r_l`` with rsLoRA) becomes
``(s_l [B_l 0], [A_l; 0])`` at scale 1 (``lora_alpha = R``), the same ``ΔW_l = s_l B_l A_l``. vLLM
takes only LoRA: DoRA, AdaLoRA and trained heads (``modules_to_save``) are refused before training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftType
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from ctrlora.errors import ConfigError
from ctrlora.evaluation.config import EvalConfig

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted max_lora_rank values
ADAPTER_WEIGHTS = "adapter_model.safetensors"
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def check_vllm_backend(
    *, method: str, use_dora: bool, quantize_4bit: bool, task: str, accelerator: str, has_source: bool, heads: list[str]
) -> None:
    """Refuse, before training, what ``eval.backend=vllm`` cannot evaluate; name the key and the way out."""
    problems = []
    if find_spec("vllm") is None:
        problems.append("the vllm package is not installed (pip install vllm, with torch==2.13.0 pinned)")
    if accelerator not in ("gpu", "cuda", "auto"):
        problems.append(f"trainer.accelerator={accelerator}: vLLM runs on GPUs")
    if task != "causal_lm" or heads:
        problems.append(f"model.task={task}, model.modules_to_save={heads}: vLLM evaluates causal LMs with LoRA only")
    if method in ("adalora", "head_only", "full_ft") or use_dora:
        problems.append(f"method={method} (use_dora={use_dora}): vLLM serves LoRA adapters only")
    if quantize_4bit:
        problems.append("method.quantize_4bit=true: the adapter was trained on 4-bit weights, vLLM would load bf16 ones")
    if not has_source:
        problems.append("the backbone has no local path or hub id for vLLM to load (model.path / model.hub_id)")
    if problems:
        raise ConfigError("eval.backend=vllm: " + "; ".join(problems) + ". Use eval.backend=hf.")


def module_scale(config: LoraConfig, module: str, rank: int) -> float:
    """PEFT's scale of `module` at `rank`: ``α_l / r_l`` (``α_l / √r_l`` with rsLoRA), α_l from ``alpha_pattern``."""
    alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), module), config.lora_alpha)
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)


def uniform_rank_adapter(adapter_dir: Path, out_dir: Path) -> int:
    """Write `adapter_dir`'s adapter at one rank and scale 1 into `out_dir` (module docstring); returns R."""
    config = LoraConfig.from_pretrained(str(adapter_dir))
    if config.peft_type != PeftType.LORA or config.use_dora:
        raise ConfigError(f"{adapter_dir} is not a plain LoRA adapter (peft_type={config.peft_type}, use_dora="
                          f"{config.use_dora}): eval.backend=vllm serves LoRA only")
    tensors = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    modules = [key[: -len(A_SUFFIX)] for key in tensors if key.endswith(A_SUFFIX)]
    rank = max(tensors[module + A_SUFFIX].shape[0] for module in modules)
    rewritten: dict[str, torch.Tensor] = {}
    for module in modules:
        A, B = tensors.pop(module + A_SUFFIX), tensors.pop(module + B_SUFFIX)
        scale = module_scale(config, module.removeprefix("base_model.model."), A.shape[0])
        rewritten[module + A_SUFFIX] = torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])])
        rewritten[module + B_SUFFIX] = torch.cat([scale * B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1)
    if tensors:
        raise ConfigError(f"{adapter_dir} holds more than LoRA matrices ({sorted(tensors)[:3]}...): vLLM cannot load it")
    uniform = replace(config, r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    uniform.save_pretrained(str(out_dir))
    save_file({key: value.contiguous() for key, value in rewritten.items()}, str(out_dir / ADAPTER_WEIGHTS))
    return rank


def vllm_model_args(cfg: EvalConfig, pretrained: str, adapter_dir: Path | None, rank: int | None) -> dict[str, Any]:
    """Arguments of lm-eval's `VLLM`: the base weights, the adapter (None: the base row) at a served rank,
    batch size ``auto``, the suite's context window, then ``eval.vllm_args`` (e.g. gpu_memory_utilization)."""
    args: dict[str, Any] = {"pretrained": pretrained, "batch_size": "auto", "max_length": cfg.max_length}
    if cfg.seed is not None:
        args["seed"] = cfg.seed
    if adapter_dir is not None:
        served = next((value for value in VLLM_LORA_RANKS if value >= rank), None)
        if served is None:
            raise ConfigError(f"the adapter's rank {rank} is above vLLM's largest LoRA rank {VLLM_LORA_RANKS[-1]}")
        args.update(lora_local_path=str(adapter_dir), max_lora_rank=served)
    return {**args, **cfg.vllm_args}


def vllm_factory(args: dict[str, Any]) -> Callable[[int | str], Any]:
    """One lm-eval `VLLM` built on first use and shared by every task group (vLLM sizes its own batches)."""
    built: list[Any] = []

    def lm(_batch_size: int | str) -> Any:
        if not built:
            from lm_eval.models.vllm_causallms import VLLM  # imports vllm

            built.append(VLLM(**args))
        return built[0]

    return lm


def without_adapter(models: Callable[[int | str], Any]) -> Callable[[int | str], Any]:
    """The same engine answering without the adapter (the base row): lm-eval's VLLM passes its
    ``lora_request`` with every request, None for the base weights alone."""

    def lm(batch_size: int | str) -> Any:
        engine = models(batch_size)
        engine.lora_request = None
        return engine

    return lm
