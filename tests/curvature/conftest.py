"""Fixtures of the curvature tests."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from .helpers import lm_batches, tiny_llama


@pytest.fixture
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def batches() -> list[dict[str, torch.Tensor]]:
    return lm_batches()
