"""FSDP2 on CPU (gloo, 2 processes): sharded PEFT training, resume, adapter export and checkpoint size.

The FSDP run is SIGKILLed on both ranks after step 6 (the checkpoint of step 4 exists) and resumed;
it must then match one process with the same global batch, save one stock PEFT adapter (gathered
from the shards) that plain PEFT loads, and leave checkpoints that hold the adapter and its
optimizer state only — never the frozen base weights. CTR-LoRA (trust region, refresh, unequal
ranks) runs once, unkilled, against one process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHORT_RUN, TWO_CPU_PROCESSES, compose_config, with_test_defaults
from kill_points import arm_every_process
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel
from safetensors.torch import load_file
from test_distributed import outputs, run_train
from test_run import PLAIN_PEFT
from transformers import AutoModelForCausalLM, PreTrainedModel

from ctrlora.backbones import load_backbone, load_tokenizer, resolve_source
from ctrlora.checkpoints import latest_checkpoint
from ctrlora.config import ModelConfig
from ctrlora.data.datamodule import FinetuneDataModule
from ctrlora.errors import ConfigError
from ctrlora.fsdp import check_fsdp_support, shard_model
from ctrlora.methods.base import build_method
from ctrlora.report import logged_losses
from ctrlora.run import train

FSDP = ["trainer=fsdp", *TWO_CPU_PROCESSES]
COMMON = SHORT_RUN


def killed_run(run_dir: Path, after_step: int, *overrides: str) -> int:
    """`python train.py` whose every rank SIGKILLs itself after `after_step`; its exit code."""
    env = arm_every_process(run_dir.with_name(run_dir.name + "-site"), after_step)
    command = [sys.executable, "train.py", f"run_dir={run_dir}", f"hydra.run.dir={run_dir}", *with_test_defaults(list(overrides))]
    return subprocess.run(
        command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600
    ).returncode


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def calibration_batch(composed: DictConfig) -> dict[str, torch.Tensor]:
    cfg = OmegaConf.to_object(composed)
    data = FinetuneDataModule(
        cfg.data,
        load_tokenizer(cfg.model),
        task=cfg.model.task,
        seed=cfg.seed,
        calibration=cfg.calibration,
        base_dir=ROOT,
    )
    data.setup("fit")
    return next(iter(data.calibration_dataloader()))


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def tiny_llama_base() -> PreTrainedModel:
    source = resolve_source(ModelConfig(builder="tiny_llama"))
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)


def adapter_config(run_dir: Path) -> dict:
    """The saved adapter_config.json, `target_modules` sorted (PEFT writes a set in hash order)."""
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    return {**config, "target_modules": sorted(config["target_modules"])}


def assert_trains_like_one_process(single_dir: Path, fsdp_dir: Path, steps: int) -> dict[str, torch.Tensor]:
    """The loss curve (rel. 1e-5) and the adapter (full tensors gathered from the shards, same config) of one
    process with the same global batch, in one run dir with the same outputs; returns the FSDP adapter."""
    steps_single, losses_single = logged_losses(single_dir)
    steps_fsdp, losses_fsdp = logged_losses(fsdp_dir)
    assert steps_fsdp == steps_single == list(range(1, steps + 1))
    assert losses_fsdp == pytest.approx(losses_single, rel=1e-5)
    expected = load_file(single_dir / "adapter" / "adapter_model.safetensors")
    adapter = load_file(fsdp_dir / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == expected.keys()
    for key in expected:  # fp32 sums in another order; Adam's g/√v magnifies them where g is near 0
        assert adapter[key].shape == expected[key].shape
        assert torch.allclose(adapter[key], expected[key], atol=1e-5), key
    assert adapter_config(fsdp_dir) == adapter_config(single_dir)
    assert outputs(fsdp_dir) == outputs(single_dir)
    return adapter


def assert_plain_peft_computes_the_trained_logits(
    adapter_dir: Path, trained_dir: Path, tmp_path: Path
) -> None:
    """Plain PEFT (no ctrlora import) loads `adapter_dir` and computes the logits of the backbone with the
    one-process adapter of `trained_dir` (not the backbone's own)."""
    batch = calibration_batch(compose_config([f"run_dir={tmp_path}", *COMMON]))
    torch.save(batch, tmp_path / "batch.pt")
    (tmp_path / "plain_peft.py").write_text(PLAIN_PEFT)
    subprocess.run(
        [
            sys.executable,
            str(tmp_path / "plain_peft.py"),
            str(adapter_dir),
            str(tmp_path / "batch.pt"),
            str(tmp_path / "logits.pt"),
        ],
        check=True,
        cwd=tmp_path,
    )
    plain = torch.load(tmp_path / "logits.pt")
    trained = PeftModel.from_pretrained(tiny_llama_base(), trained_dir).eval()
    assert torch.allclose(plain, logits(trained, batch), atol=1e-5)
    with trained.disable_adapter():
        assert not torch.allclose(plain, logits(trained, batch), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora"])
def test_fsdp_killed_and_resumed_matches_one_process_and_exports_the_adapter(
    tmp_path: Path, method: str
) -> None:
    single_dir, fsdp_dir = tmp_path / "single", tmp_path / "fsdp"
    single = train(
        compose_config([f"run_dir={single_dir}", f"method={method}", "data.batch_size=8", *COMMON])
    )
    overrides = [f"method={method}", "data.batch_size=4", *FSDP, *COMMON]
    assert killed_run(fsdp_dir, 6, *overrides) == -9
    assert latest_checkpoint(fsdp_dir / "checkpoints").name == "step000004.ckpt"
    fsdp = run_train(fsdp_dir, "resume=true", *overrides, "eval=local", "eval.limit=4")
    assert 0 <= fsdp["eval"]["fortune_topics"]["acc"]["value"] <= 1  # rank 0 evaluates alone

    # the same training as one process with the same global batch, across the kill
    assert fsdp["meta"]["world_size"] == 2 and fsdp["train"]["steps"] == 8
    assert fsdp["train"]["final_loss"] == pytest.approx(single["train"]["final_loss"], rel=1e-5)
    adapter = assert_trains_like_one_process(single_dir, fsdp_dir, steps=8)
    assert_plain_peft_computes_the_trained_logits(fsdp_dir / "adapter", single_dir / "adapter", tmp_path)

    # the checkpoint: adapter + its two Adam moments (+ a little state), no base weights
    checkpoint_path = fsdp_dir / "checkpoints" / "step000008.ckpt"
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    assert set(checkpoint["state_dict"]) == {
        f"model.{k}".replace(".weight", ".default.weight") for k in adapter
    }
    adapter_bytes = tensor_bytes(adapter)
    assert tensor_bytes(checkpoint["state_dict"]) == adapter_bytes
    moments = {
        f"{index}.{name}": value
        for index, state in checkpoint["optimizer_states"][0]["state"].items()
        for name, value in state.items()
        if name != "step"
    }
    assert tensor_bytes(moments) == 2 * adapter_bytes
    base_bytes = tensor_bytes(dict(tiny_llama_base().named_parameters()))
    assert checkpoint_path.stat().st_size <= 3 * adapter_bytes + 96 * 1024 < base_bytes


@pytest.mark.slow
def test_ctrlora_under_fsdp_matches_one_process_and_exports_its_unequal_ranks(tmp_path: Path) -> None:
    """The trust-region penalty on sharded adapters (gathered for it), a calibration refresh through the
    sharded model, calibration split across the ranks, and adapters of unequal ranks (some of rank 1:
    one rank's shard is empty) gathered into one stock PEFT adapter."""
    single_dir, fsdp_dir = tmp_path / "single", tmp_path / "fsdp"
    overrides = [
        "method=ctrlora", *COMMON, "trainer.max_steps=4", "method.ctr.refresh_every=2",
        "calibration.num_samples=16",
    ]
    single = train(compose_config([f"run_dir={single_dir}", "data.batch_size=8", *overrides]))
    fsdp = run_train(fsdp_dir, "data.batch_size=4", *FSDP, *overrides)
    assert fsdp["meta"]["world_size"] == 2
    assert fsdp["allocation"]["ranks"] == single["allocation"]["ranks"]
    assert min(single["allocation"]["ranks"].values()) == 1 < max(single["allocation"]["ranks"].values())
    assert [refresh["step"] for refresh in fsdp["train"]["curvature"]["refreshes"]] == [2]
    assert_trains_like_one_process(single_dir, fsdp_dir, steps=4)
    assert_plain_peft_computes_the_trained_logits(fsdp_dir / "adapter", single_dir / "adapter", tmp_path)


@pytest.mark.slow
def test_qlora_under_fsdp_matches_one_process(tmp_path: Path) -> None:
    """4-bit weights stored in the compute dtype (`bnb_4bit_quant_storage`) shard like any other weight;
    on CPU that dtype is fp32, on GPU bf16 (`model.dtype=bfloat16`)."""
    backbone = load_backbone(ModelConfig(builder="tiny_llama"), accelerator="cpu", quantize_4bit=True)
    quantized = [p for p in backbone.parameters() if getattr(p, "quant_state", None) is not None]
    assert quantized and {p.dtype for p in quantized} == {torch.float32}  # one dtype: FSDP can shard it

    overrides = ["method=qlora", *COMMON, "trainer.max_steps=4"]
    train(compose_config([f"run_dir={tmp_path / 'single'}", "data.batch_size=8", *overrides]))
    run_train(tmp_path / "fsdp", "data.batch_size=4", *FSDP, *overrides)
    assert_trains_like_one_process(tmp_path / "single", tmp_path / "fsdp", steps=4)


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [(["method=adalora"], "allocator"), (["method=pissa"], "converts its adapter"), (["method=lora"], None)],
)
def test_methods_fsdp_cannot_shard_are_refused_before_training(
    tmp_path: Path, overrides: list[str], refused: str | None
) -> None:
    cfg = OmegaConf.to_object(compose_config([f"run_dir={tmp_path}", *overrides]))
    method = build_method(cfg, total_steps=8, run_dir=tmp_path)
    if refused is None:
        check_fsdp_support(method)
        return
    with pytest.raises(ConfigError, match=f"{refused}.*trainer=ddp"):
        check_fsdp_support(method)


def test_fsdp_refuses_to_cast_4bit_weights_stored_in_another_dtype(tmp_path: Path) -> None:
    """FSDP casts every parameter to its compute dtype; packed 4-bit codes survive only if stored in it."""
    cfg = OmegaConf.to_object(compose_config([f"run_dir={tmp_path}", "method=qlora"]))
    backbone = load_backbone(cfg.model, accelerator="cpu", quantize_4bit=True)  # stored as fp32 on CPU
    model = build_method(cfg, total_steps=8, run_dir=tmp_path).prepare(backbone, None)
    with pytest.raises(ConfigError, match="stored as.*float32.*model.dtype"):
        shard_model(model, mesh=None, param_dtype=torch.bfloat16)
