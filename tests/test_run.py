"""One run end to end: its outputs, its adapter in plain PEFT, and resuming after a stop."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST, compose_config
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ctrlora import report
from ctrlora.run import assemble, train


def test_default_run_writes_every_output(tmp_path: Path) -> None:
    results = train(compose_config([f"run_dir={tmp_path}", *FAST, "eval=local", "eval.limit=16"]))
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    for name in ("config.yaml", "summary.md", "loss_curve.png", "metrics.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results, default=str))

    run, meta, train_section = results["run"], results["meta"], results["train"]
    assert (run["method"], run["model"], run["data"]) == ("ctrlora", "tiny-llama", "fortune_topics")
    # the budget of uniform LoRA at r̄ = 8, 8 · Σ(n + m) = 8 · 2048, allocated unequally and never exceeded
    assert run["budget"]["target_params"] == 8 * 2048
    assert 0 < run["budget"]["trainable_params"] <= run["budget"]["allowed_params"]
    assert len(set(results["allocation"]["ranks"].values())) > 1
    for name in ("allocation.json", "rank_heatmap.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert meta["versions"]["peft"] and meta["world_size"] == 1 and meta["precision"] == "32-true"
    assert train_section["steps"] == 20 and train_section["tokens"] > 0
    assert train_section["step_time_s"]["median"] > 0 and train_section["peak_memory_bytes"] > 0
    with open(tmp_path / "metrics.csv") as file:
        losses = [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]
    assert len(losses) == 20 and train_section["final_loss"] == losses[-1]
    assert "| steps | 20 |" in (tmp_path / "summary.md").read_text()
    # the local quotation-topic task is the default evaluation, with the base model's row beside it
    accuracy = results["eval"]["fortune_topics"]["acc"]
    assert 0 <= accuracy["value"] <= 1 and accuracy["stderr"] is not None
    assert "acc" in results["eval"]["base"]["fortune_topics"]
    assert f"| fortune_topics acc | {accuracy['value']:.4f}" in (tmp_path / "summary.md").read_text()
    # the 250 training rows held out for validation, scored by the mean loss per supervised token
    val = results["val"]
    assert val["examples"] == 250 and set(val) == {"examples", "loss"} and 0 < val["loss"] < 20
    assert f"| validation loss (250 examples) | {val['loss']:.4f} |" in (tmp_path / "summary.md").read_text()


PLAIN_PEFT = textwrap.dedent(
    """
    import sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    adapter, batch_file, out_file = sys.argv[1:]
    import json
    base = json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    batch = torch.load(batch_file)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not any(name.startswith("ctrlora") for name in sys.modules)
    torch.save(logits, out_file)
    """
)


def test_saved_adapter_loads_in_plain_peft_with_the_trained_logits(tmp_path: Path) -> None:
    cfg = OmegaConf.to_object(compose_config([f"run_dir={tmp_path}", "optim.lr=5e-3", *FAST]))
    run = assemble(cfg, tmp_path)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    report.save_adapter(run.method, run.model, run.tokenizer, tmp_path / "adapter")
    batch = next(iter(run.datamodule.calibration_dataloader()))
    run.model.eval()
    with torch.no_grad():
        trained = run.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base = run.model.get_base_model()
        with run.model.disable_adapter():
            untrained = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.save(batch, tmp_path / "batch.pt")
    script = tmp_path / "plain_peft.py"
    script.write_text(PLAIN_PEFT)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "adapter"), str(tmp_path / "batch.pt"), str(tmp_path / "out.pt")],
        check=True, cwd=tmp_path,
    )
    reloaded = torch.load(tmp_path / "out.pt")
    assert torch.allclose(reloaded, trained, atol=1e-5)
    assert not torch.allclose(reloaded, untrained, atol=1e-3)  # the adapter really changed the model


class StopAtStep(L.Callback):
    """Stop training gracefully once `step` optimizer steps are done (a stand-in for a kill)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_run_stopped_after_first_checkpoint_and_resumed_matches_uninterrupted(tmp_path: Path) -> None:
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train(compose_config([f"run_dir={full}", *FAST]))

    cfg = OmegaConf.to_object(compose_config([f"run_dir={stopped}", *FAST]))
    stopped.mkdir()
    run = assemble(cfg, stopped)
    run.trainer.callbacks.insert(0, StopAtStep(10))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 10 and (stopped / "checkpoints" / "last.ckpt").exists()
    assert not (stopped / "adapter").exists()

    results = train(compose_config([f"run_dir={stopped}", "resume=true", *FAST]))
    assert results["train"]["steps"] == 20
    assert report.logged_losses(stopped) == report.logged_losses(full)  # history kept across the stop
    expected = load_file(full / "adapter" / "adapter_model.safetensors")
    resumed = load_file(stopped / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    # the uninterrupted run's last checkpoint holds adapter weights only, never the frozen base
    checkpoint = torch.load(full / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"model.{k}".replace(".weight", ".default.weight") for k in expected}


def test_validation_is_scored_during_training_every_n_steps(tmp_path: Path) -> None:
    results = train(compose_config([f"run_dir={tmp_path}", *FAST, "method=lora", "eval.val_every_n_steps=10"]))
    with open(tmp_path / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("val/loss")]
    assert [int(row["step"]) for row in rows] == [9, 19]  # after optimizer steps 10 and 20 (logged 0-based)
    assert float(rows[-1]["val/loss"]) == pytest.approx(results["val"]["loss"], rel=1e-5)  # the end is step 20
