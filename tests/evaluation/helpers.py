"""Helpers of the evaluation tests: composed configs, a random LoRA on the tiny Llama, and an
independent log-likelihood oracle for multiple-choice scoring."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import ROOT, compose_config
from omegaconf import OmegaConf
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctrlora.config import TrainConfig

FIXTURE_MIRRORS = ROOT / "tests" / "fixtures" / "mirrors"


def train_config(overrides: list[str], tmp_path: Path) -> TrainConfig:
    """conf/train.yaml composed with `overrides`, as a typed object."""
    return OmegaConf.to_object(compose_config([f"run_dir={tmp_path / 'run'}", *overrides]))


def random_lora(model: PreTrainedModel, seed: int = 0) -> PeftModel:
    """A LoRA whose B is non-zero, so the adapted model differs from the backbone."""
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(model, config)


@torch.no_grad()
def choice_loglikelihoods(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, context: str, choices: list[str]
) -> list[float]:
    """log p(" " + choice | context) summed over the choice's tokens, computed directly.

    lm-eval's recipe: encode context + continuation as one string (BOS prepended by the
    tokenizer), the continuation tokens are those after the context's own encoding.
    """
    scores = []
    context_ids = tokenizer(context)["input_ids"]
    for choice in choices:
        ids = tokenizer(context + " " + choice)["input_ids"]
        logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        continuation = range(len(context_ids), len(ids))
        scores.append(sum(float(logits[position - 1, ids[position]]) for position in continuation))
    return scores
