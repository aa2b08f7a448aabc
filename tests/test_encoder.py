"""The NLU setting: the real all-MiniLM-L6-v2 encoder as a sequence classifier on the bundled topics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config

from ctrlora.run import train


def test_encoder_run_reports_accuracy_macro_f1_and_mcc(tmp_path: Path) -> None:
    results = train(compose_config(
        ["model=minilm-l6", "method=lora", f"run_dir={tmp_path}", *FAST, "trainer.max_steps=12", "optim.lr=1e-3",
         "eval=local", "eval.limit=64"]
    ))
    metrics = results["eval"]["fortune_topics"]
    assert set(metrics) == {"accuracy", "macro_f1", "mcc", "predicted_classes"}
    assert 0 <= metrics["accuracy"]["value"] <= 1 and 0 <= metrics["macro_f1"]["value"] <= 1
    assert -1 <= metrics["mcc"]["value"] <= 1
    assert results["eval"]["versions"]["samples"]["fortune_topics"] == 64  # eval.limit of the 645 test quotations
    budget = results["run"]["budget"]
    # adapters on the 6 layers' 6 projections at r̄ = 8, plus the trained 8-way classifier head
    assert budget["target_params"] == 8 * 6 * (4 * (384 + 384) + (384 + 1536) + (1536 + 384))
    assert budget["trainable_params"] == budget["target_params"] + 384 * 8 + 8
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert results["val"]["examples"] == 250 and 0 <= results["val"]["accuracy"] <= 1
    assert set(results["val"]) == {"examples", "loss", "accuracy", "macro_f1", "mcc", "predicted_classes"}


def test_head_warmup_trains_the_fresh_head_alone_before_calibration(tmp_path: Path) -> None:
    """The warm-up lowers the calibration loss through the head only; the encoder and the adapters are
    untouched and the warmed head is where the adapted model's head starts (PEFT copies it into
    modules_to_save). Every method gets it, LoRA too: the comparison stays fair."""
    from omegaconf import OmegaConf

    from ctrlora.run import assemble

    overrides = ["model=minilm-l6", "method=lora", f"run_dir={tmp_path}", *FAST, "calibration.num_samples=16"]
    cold = assemble(OmegaConf.to_object(compose_config([*overrides, "calibration.head_warmup_steps=0"])), tmp_path)
    warm = assemble(OmegaConf.to_object(compose_config([*overrides, "calibration.head_warmup_steps=6"])), tmp_path)
    report = warm.stats.head_warmup
    assert cold.stats.head_warmup is None and report["steps"] == 6 and report["loss_last"] < report["loss_first"]
    cold_params, warm_params = dict(cold.model.named_parameters()), dict(warm.model.named_parameters())
    changed = {name for name, param in warm_params.items() if not torch.equal(param, cold_params[name])}
    assert changed and all("classifier" in name for name in changed)  # the head alone (and both its copies)
    assert warm.stats.summary()["head_warmup"] == report


def test_head_warmup_defaults_to_a_fixed_count_with_a_fresh_head_and_none_without() -> None:
    from ctrlora.head_warmup import HEAD_WARMUP_STEPS, head_warmup_steps

    assert head_warmup_steps(None, ["classifier"]) == HEAD_WARMUP_STEPS > 0
    assert head_warmup_steps(None, []) == 0 and head_warmup_steps(7, ["classifier"]) == 7


def test_qlora_quantizes_the_encoder_projections_but_not_the_trained_head(tmp_path: Path) -> None:
    """QLoRA on the encoder: the adapted projections' base weights are 4-bit (NF4), the classifier head
    that is trained stays a full-precision nn.Linear (a 4-bit head could not be trained), and a step
    of training moves it."""
    import bitsandbytes as bnb
    from omegaconf import OmegaConf

    from ctrlora.run import assemble

    overrides = ["model=minilm-l6", "method=qlora", f"run_dir={tmp_path}", *FAST, "trainer.max_steps=2",
                 "calibration.head_warmup_steps=0", "eval=none"]
    run = assemble(OmegaConf.to_object(compose_config(overrides)), tmp_path)
    modules = dict(run.model.named_modules())
    query = modules["base_model.model.bert.encoder.layer.0.attention.self.query"]
    head = modules["base_model.model.classifier.modules_to_save.default"]
    assert isinstance(query.base_layer, bnb.nn.Linear4bit) and query.base_layer.weight.quant_type == "nf4"
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32 and head.weight.requires_grad
    before = head.weight.detach().clone()
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert not torch.equal(before, head.weight.detach())


def test_scoring_the_base_row_leaves_the_run_unchanged(tmp_path: Path) -> None:
    """The base row is scored before the adapters exist; it must not move the random state their
    init draws from (a DataLoader draws a seed when iterated), so a run starts the same with or
    without it."""
    from omegaconf import OmegaConf

    from ctrlora.run import assemble

    overrides = ["model=minilm-l6", "method=lora", f"run_dir={tmp_path}", *FAST, "calibration.head_warmup_steps=0",
                 "eval.limit=8"]
    scored = assemble(OmegaConf.to_object(compose_config([*overrides, "eval=local"])), tmp_path)
    unscored = assemble(OmegaConf.to_object(compose_config([*overrides, "eval=none"])), tmp_path)
    assert scored.stats.base_eval and unscored.stats.base_eval is None
    unscored_params = dict(unscored.model.named_parameters())
    for name, param in scored.model.named_parameters():
        assert torch.equal(param, unscored_params[name]), name


def tiny_classifier(kind: str) -> torch.nn.Module:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    torch.manual_seed(0)
    if kind == "bert":
        return BertForSequenceClassification(BertConfig(
            vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3))
    return LlamaForSequenceClassification(LlamaConfig(  # its backbone returns a key/value cache (use_cache)
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, num_labels=3, pad_token_id=0))


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("steps", [10, 2])
def test_head_warmup_replays_the_frozen_backbone_and_trains_the_head_exactly_as_recomputing(
    monkeypatch, kind: str, steps: int
) -> None:
    """After one cycle over the calibration batches the backbone is not run again (its recorded outputs
    replay, without a key/value cache), and the head and the losses end exactly where a warm-up that runs
    the whole model every step ends; a `forward` already set on the backbone instance is put back."""
    from ctrlora import head_warmup

    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(1, 50, (4, 7), generator=generator),
                "attention_mask": torch.ones(4, 7, dtype=torch.long),
                "labels": torch.randint(0, 3, (4,), generator=generator)} for _ in range(3)]

    def warmed(replay: bool) -> tuple[dict[str, torch.Tensor], dict, int]:
        model = tiny_classifier(kind)
        head = "classifier" if kind == "bert" else "score"
        calls, own = [], model.base_model.forward  # a bound method set on the instance, as accelerate's hooks do
        model.base_model.forward = lambda *args, **kwargs: calls.append(1) or own(*args, **kwargs)
        if not replay:
            monkeypatch.setattr(head_warmup, "frozen_backbone", lambda model, head: None)
        replaying, replayed_outputs = head_warmup.replaying, []
        monkeypatch.setattr(head_warmup, "replaying", lambda backbone, outputs: replayed_outputs.extend(outputs)
                            or replaying(backbone, outputs))
        report = head_warmup.warm_up_head(model, batches, [head], steps=steps, lr=1e-2)
        assert len(replayed_outputs) == (min(steps, 3) if replay else 0)
        assert all(output.get("past_key_values") is None for output in replayed_outputs)  # no cache kept
        monkeypatch.undo()
        assert vars(model.base_model)["forward"].__name__ == "<lambda>"  # the instance's own forward is back
        params = {name: p.detach().clone() for name, p in getattr(model, head).named_parameters()}
        return params, report, len(calls)

    (replayed, replayed_report, replayed_calls), (recomputed, recomputed_report, recomputed_calls) = warmed(True), warmed(False)
    assert replayed_calls == min(steps, 3) and recomputed_calls == steps
    assert all(torch.equal(replayed[name], recomputed[name]) for name in recomputed)
    assert replayed_report["loss_last"] == recomputed_report["loss_last"]


def test_the_head_warmup_runs_the_whole_model_where_a_replay_would_not_be_exact() -> None:
    from ctrlora.head_warmup import frozen_backbone

    model = tiny_classifier("bert")
    assert frozen_backbone(model, list(model.classifier.parameters())) is model.bert
    assert frozen_backbone(model, list(model.bert.pooler.parameters())) is None  # a head inside the backbone
    model.bert.register_forward_hook(lambda module, args, output: None)
    assert frozen_backbone(model, list(model.classifier.parameters())) is None  # a hook would run twice
