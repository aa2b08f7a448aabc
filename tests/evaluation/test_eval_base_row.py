"""The base model's row: computed once per protocol, cached as JSON, reused by the next run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from peft import LoraConfig, get_peft_model

from ctrlora.errors import ConfigError
from ctrlora.evaluation import suite
from ctrlora.evaluation.suite import evaluate_model
from evaluation.helpers import random_lora, train_config


def test_base_row_is_computed_once_then_read_from_the_cache(tiny, tmp_path: Path, monkeypatch) -> None:
    _, tokenizer, backbone = tiny
    calls: list[bool] = []

    def counting_hf_models(model, *args, **kwargs):
        calls.append(model._adapters_disabled)  # True: evaluated as the backbone
        return real_hf_models(model, *args, **kwargs)

    real_hf_models = suite.hf_models
    monkeypatch.setattr(suite, "hf_models", counting_hf_models)
    cfg = train_config(["eval=local", "eval.limit=4", "eval.max_length=64"], tmp_path)
    model = random_lora(backbone)

    first = evaluate_model(model, tokenizer, cfg.eval, base_model_key="tiny-llama-test", cache_root=tmp_path)
    assert calls == [False, True]  # the adapted model, then the base (adapter disabled)
    cached = list((tmp_path / "base_rows" / "tiny-llama-test").glob("local-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["row"] == first["base"]

    second = evaluate_model(model, tokenizer, cfg.eval, base_model_key="tiny-llama-test", cache_root=tmp_path)
    assert calls == [False, True, False]  # only the adapted model again
    assert second == first

    cfg.eval.tasks["fortune_topics"].limit = 3  # another protocol: another base row
    evaluate_model(model, tokenizer, cfg.eval, base_model_key="tiny-llama-test", cache_root=tmp_path)
    assert calls == [False, True, False, False, True]


def test_adapters_that_rewrote_the_base_weights_need_a_backbone_loader(tiny, tmp_path: Path) -> None:
    _, tokenizer, backbone = tiny
    model = get_peft_model(backbone, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa"))
    cfg = train_config(["eval=local", "eval.limit=2"], tmp_path)
    with pytest.raises(ConfigError, match="init_lora_weights=pissa rewrote the base weights"):
        evaluate_model(model, tokenizer, cfg.eval, base_model_key="tiny", cache_root=tmp_path)


def test_only_rank_zero_evaluates(tiny, tmp_path: Path) -> None:
    _, tokenizer, backbone = tiny
    cfg = train_config(["eval=local", "eval.limit=2"], tmp_path)
    assert (
        evaluate_model(
            random_lora(backbone),
            tokenizer,
            cfg.eval,
            base_model_key="t",
            cache_root=tmp_path,
            rank_zero=False,
        )
        == {}
    )
    assert not (tmp_path / "lm_eval_tasks").exists()
