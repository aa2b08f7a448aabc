"""The NLU setting: the real all-MiniLM-L6-v2 encoder as a sequence classifier on the bundled topics."""

from __future__ import annotations

from pathlib import Path

from conftest import FAST, compose_config

from ctrlora.run import train


def test_encoder_run_reports_accuracy_macro_f1_and_mcc(tmp_path: Path) -> None:
    results = train(compose_config(
        ["model=minilm-l6", "method=lora", f"run_dir={tmp_path}", *FAST, "trainer.max_steps=12", "optim.lr=1e-3",
         "eval=local", "eval.limit=64"]
    ))
    metrics = results["eval"]["fortune_topics"]
    assert set(metrics) == {"accuracy", "macro_f1", "mcc"}
    assert 0 <= metrics["accuracy"]["value"] <= 1 and 0 <= metrics["macro_f1"]["value"] <= 1
    assert -1 <= metrics["mcc"]["value"] <= 1
    assert results["eval"]["versions"]["samples"]["fortune_topics"] == 64  # eval.limit of the 645 test quotations
    budget = results["run"]["budget"]
    # adapters on the 6 layers' 6 projections at r̄ = 8, plus the trained 8-way classifier head
    assert budget["target_params"] == 8 * 6 * (4 * (384 + 384) + (384 + 1536) + (1536 + 384))
    assert budget["trainable_params"] == budget["target_params"] + 384 * 8 + 8
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
