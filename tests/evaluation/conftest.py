"""Fixtures of the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ctrlora.backbones import load_backbone, load_tokenizer
from ctrlora.config import TrainConfig
from evaluation.helpers import train_config


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[TrainConfig, PreTrainedTokenizerBase, PreTrainedModel]:
    """The default config (tiny-llama), its tokenizer and a freshly loaded backbone."""
    cfg = train_config([], tmp_path)
    return cfg, load_tokenizer(cfg.model), load_backbone(cfg.model)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and two threads on two shared cores spin-wait
    (a 64x128 linear is ~7x slower with 2 threads when the cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
