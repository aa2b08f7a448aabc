"""Tiny models, calibration batches and comparisons for the curvature tests (fp64 where exactness matters)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

VOCAB = 50
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_config(**overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        attn_implementation="sdpa",  # eager attention takes its softmax in fp32: not exact in fp64
        initializer_range=0.3,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).to(dtype).eval()


def tiny_llama_classifier(seed: int = 0, num_labels: int = 3) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_llama_config(num_labels=num_labels)).double().eval()


def sequences(seed: int, lengths: list[int], prompt: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) pairs; the first `prompt` labels are -100 (a masked prompt)."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for length in lengths:
        ids = torch.randint(1, VOCAB, (length,), generator=generator)
        labels = ids.clone()
        labels[:prompt] = -100
        pairs.append((ids, labels))
    return pairs


def collate(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence (pad id 0, mask 0, label -100)."""
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.zeros(len(pairs), width, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    attention_mask = torch.zeros(len(pairs), width, dtype=torch.long)
    for row, (ids, label) in enumerate(pairs):
        input_ids[row, : len(ids)] = ids
        labels[row, : len(ids)] = label
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def lm_batches(
    seed: int = 0, lengths: tuple[tuple[int, ...], ...] = ((7, 5, 6), (4, 8))
) -> list[dict[str, torch.Tensor]]:
    return [collate(sequences(seed + index, list(group))) for index, group in enumerate(lengths)]


def targets_of(model: torch.nn.Module, suffixes: list[str] = PROJECTIONS) -> list[str]:
    return [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in suffixes]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    error = (actual - expected).norm() / expected.norm()
    assert error <= rel, f"relative error {error:.3e} > {rel:.1e}"
