"""CTR-LoRA in training runs on tiny-llama: refreshes, λ, training-source factors, ablations, resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import FAST, compose_config
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_run import StopAtStep

from ctrlora import report
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.curvature.factors import DenseFactor, LowRankFactor
from ctrlora.curvature.lowrank import damped_factors
from ctrlora.errors import ConfigError
from ctrlora.methods.cg_lora import mean_token_loss
from ctrlora.methods.ctr_refresh import REFRESHED_CURVATURE, load_refreshed_curvature
from ctrlora.run import assemble, train
from ctrlora.trust_region import LambdaSchedule, kronecker_penalty

from .curvature_method_helpers import (
    SMALL_CALIBRATION,
    build_run,
    logits,
    relative_error,
    reload_in_plain_peft,
)

REFRESH = ["method.ctr.refresh_every=5"]


def metric_factors(method) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The penalty's (S_a, S_g) per module, dense copies."""
    return {name: (m.s_a.dense().clone(), m.s_g.dense().clone()) for name, m in method.trust.penalty.metrics.items()}


def expected_metric(raw, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(S_a, S_g) of the fisher metric built from raw factors: damped, at their raw scale (a causal LM's
    training loss is the mean token loss: T/N = 1)."""
    a, g = damped_factors(raw, cfg.damping, cfg.pi_damping)
    return a.dense(), g.dense()


class FreshEstimateAt(L.Callback):
    """After the method's refresh at `step`: the metric in use, the refresh's file, and a fresh estimate
    at the same weights."""

    def __init__(self, step: int, calibration, cfg, run_dir: Path) -> None:
        self.step, self.calibration, self.cfg, self.run_dir = step, calibration, cfg, run_dir
        self.fresh = self.used = self.saved = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.step and self.fresh is None:
            self.used = metric_factors(pl_module.method)
            self.saved = load_refreshed_curvature(self.run_dir / REFRESHED_CURVATURE.format(step=self.step))
            model = pl_module.model.get_base_model()
            self.fresh = estimate_curvature(model, self.calibration, list(self.used), self.cfg, progress=False)


def test_refreshes_happen_at_the_refresh_steps_with_fresh_estimates_and_lambda_follows_its_schedule(tmp_path: Path) -> None:
    run = build_run(tmp_path, "ctrlora", *REFRESH)
    cfg = run.method.curvature_settings()
    probe = FreshEstimateAt(10, run.datamodule.calibration_dataloader(), cfg, tmp_path)
    run.trainer.callbacks.append(probe)
    initial = metric_factors(run.method)
    batch = next(iter(run.datamodule.calibration_dataloader()))
    before = mean_token_loss(run.model, [batch])
    metric_held_while_estimating, estimate = [], run.method.refresher.estimate_at_current_weights

    def recording_estimate(**kwargs):
        metric_held_while_estimating.append(run.method.trust.penalty is not None)
        return estimate(**kwargs)

    run.method.refresher.estimate_at_current_weights = recording_estimate
    run.trainer.fit(run.module, datamodule=run.datamodule)

    assert run.method.trust.loss_scale == 1.0
    assert [refresh["step"] for refresh in run.method.refresher.refreshes] == [5, 10, 15]
    assert metric_held_while_estimating == [False] * 3  # the old metric goes before the new one is estimated
    for name, (a, g) in probe.used.items():
        fresh_a, fresh_g = expected_metric(probe.fresh[name], cfg)
        assert relative_error(a, fresh_a) < 1e-6, name
        assert relative_error(g, fresh_g) < 1e-6, name
        assert relative_error(g, initial[name][1]) > 0.1, name  # not the step-0 factors: the weights moved
        assert relative_error(probe.saved[name].a.dense(), probe.fresh[name].a.dense()) < 1e-6, name  # for resuming
        assert relative_error(probe.saved[name].g.dense(), probe.fresh[name].g.dense()) < 1e-6, name
    assert [r["label"] for r in run.method.curvature_reports] == ["initial", "refresh", "refresh", "refresh"]

    schedule = LambdaSchedule("cosine", 0.1, 20)
    with open(tmp_path / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row.get("method/lambda")]
    assert [int(row["step"]) for row in rows] == list(range(20))
    for row in rows:
        assert float(row["method/lambda"]) == approx_f32(schedule(int(row["step"])))
        assert float(row["train/extra_to_task"]) == approx_f32(float(row["train/extra_loss"]) / float(row["train/loss"]))
        assert float(row["train/extra_to_task_grad"]) >= 0
    assert float(rows[-1]["method/penalty"]) > 0

    assert mean_token_loss(run.model, [batch]) < before - 0.05
    assert len(set(run.method.ranks.values())) > 2  # unequal ranks
    report.save_adapter(run.method, run.model, run.tokenizer, tmp_path / "adapter")
    reloaded = reload_in_plain_peft(tmp_path, tmp_path / "adapter", batch)
    assert torch.allclose(reloaded, logits(run.model, batch), atol=1e-5)


def approx_f32(value: float):
    return pytest.approx(value, rel=1e-6, abs=1e-9)  # Lightning logs scalars as fp32


class WindowSnapshots(L.Callback):
    """The batch and adapter weights of every training micro-batch of the given optimizer steps."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.snapshots = steps, []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if trainer.global_step + 1 in self.steps:
            weights = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if p.requires_grad}
            self.snapshots.append(({k: v.clone() for k, v in batch.items()}, weights))


def test_training_source_accumulates_the_kfac_factors_of_the_batches_before_the_refresh(tmp_path: Path) -> None:
    run = build_run(
        tmp_path, "ctrlora", *REFRESH, "method.ctr.refresh_source=training", "method.ctr.refresh_batches=2",
        "method.dropout=0", "trainer.max_steps=6", "trainer.accumulate_grad_batches=2",
    )
    snapshots = WindowSnapshots({4, 5})
    run.trainer.callbacks.append(snapshots)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert [refresh["step"] for refresh in run.method.refresher.refreshes] == [5]
    assert len(snapshots.snapshots) == 4  # 2 optimizer steps × 2 accumulated micro-batches

    names = list(run.method.layers)
    sums: dict[str, list[torch.Tensor]] = {}
    total = positions = 0
    params = dict(run.model.named_parameters())
    for batch, weights in snapshots.snapshots:
        with torch.no_grad():
            for key, value in weights.items():
                params[key].copy_(value)
        estimate = estimate_curvature(run.model.get_base_model(), [batch], names, run.method.curvature_settings(), progress=False)
        total += estimate.report.tokens
        positions += int(batch["attention_mask"].sum())  # S_a is a mean over positions, S_g a sum per token
        for name in names:
            a, g = estimate[name].a.dense(), estimate[name].g.dense()
            previous = sums.get(name, [0, 0])
            a_weight = int(batch["attention_mask"].sum())
            sums[name] = [previous[0] + a_weight * a, previous[1] + estimate.report.tokens * g]
    saved = load_refreshed_curvature(tmp_path / REFRESHED_CURVATURE.format(step=5))
    cfg, used = run.method.curvature_settings(), metric_factors(run.method)
    for name in names:
        assert saved[name].tokens == total
        assert relative_error(saved[name].a.dense(), sums[name][0] / positions) < 1e-5, name
        assert relative_error(saved[name].g.dense(), sums[name][1] / total) < 1e-5, name
        expected_a, expected_g = expected_metric(saved[name], cfg)
        assert relative_error(used[name][0], expected_a) < 1e-6, name
        assert relative_error(used[name][1], expected_g) < 1e-6, name


def test_without_allocation_and_trust_region_ctrlora_trains_exactly_like_lora(tmp_path: Path) -> None:
    steps = ["trainer.max_steps=5"]
    lora = build_run(tmp_path / "lora", "lora", *steps)
    lora.trainer.fit(lora.module, datamodule=lora.datamodule)
    ablated = build_run(  # assembled after the first fit: assemble re-seeds the dropout RNG
        tmp_path / "ctr", "ctrlora", "method.ctr.allocation=uniform", "method.ctr.trust_region=false", *steps
    )
    assert not ablated.method.needs_calibration and ablated.method.callbacks() == []
    ablated.trainer.fit(ablated.module, datamodule=ablated.datamodule)
    expected = {n: p for n, p in lora.model.named_parameters() if p.requires_grad}
    actual = {n: p for n, p in ablated.model.named_parameters() if p.requires_grad}
    assert expected.keys() == actual.keys() and len(expected) == 28
    for name in expected:
        assert torch.equal(expected[name], actual[name]), name


def test_run_resumed_after_a_refresh_and_a_reallocation_ends_with_the_same_adapter(tmp_path: Path) -> None:
    options = [*FAST, *SMALL_CALIBRATION, *REFRESH, "method=ctrlora", "method.ctr.reallocate=true", "method.ctr.hysteresis=0"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    results = train(compose_config([f"run_dir={full}", *options]))
    history = json.loads((full / "allocation.json").read_text())["reallocations"]
    assert history and history[0]["step"] <= 10  # rank units moved before the stop (at step 10)

    stopped.mkdir()
    run = assemble(OmegaConf.to_object(compose_config([f"run_dir={stopped}", *options])), stopped)
    run.trainer.callbacks.insert(0, StopAtStep(10))
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert run.trainer.global_step == 10 and [r["step"] for r in run.method.refresher.refreshes] == [5, 10]
    resumed = train(compose_config([f"run_dir={stopped}", "resume=true", *options]))

    expected = load_file(full / "adapter" / "adapter_model.safetensors")
    actual = load_file(stopped / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert resumed["allocation"]["ranks"] == results["allocation"]["ranks"]
    assert [r["step"] for r in resumed["train"]["curvature"]["refreshes"]] == [5, 10, 15]
    assert results["train"]["curvature"]["refresh_s"] > 0 and results["train"]["curvature"]["calibration_s"] > 0
    curvature = results["train"]["curvature"]  # the share of the run's wall time spent on curvature
    spent = curvature["calibration_s"] + curvature["refresh_s"]
    assert 0 < curvature["overhead_frac"] < 1
    assert curvature["overhead_frac"] == pytest.approx(spent / results["run"]["wall_s"], abs=1e-4)
    state = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)["method_state"]
    assert state["curvature_file"] == "checkpoints/curvature/refresh-0000015.pt"  # factors once per refresh, by reference
    assert sorted(p.name for p in (full / "checkpoints" / "curvature").iterdir()) == ["refresh-0000010.pt", "refresh-0000015.pt"]
    config = json.loads((stopped / "adapter" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {k: v for k, v in results["allocation"]["ranks"].items() if v > 0}


def test_a_training_window_that_would_hold_a_too_large_dense_gradient_is_refused(tmp_path: Path) -> None:
    """Re-allocating from training statistics sums every target's dense G; above the size where the
    calibration passes would sketch it, the run stops before training, naming the keys to change."""
    overrides = [*REFRESH, "method.ctr.refresh_source=training", "method.ctr.refresh_batches=2",
                 "method.ctr.reallocate=true", "curvature.dense_grad_max_gb=1e-6"]
    with pytest.raises(ConfigError, match=r"ctr\.refresh_source=training with ctr\.reallocate=true .* above"
                                          r" curvature\.dense_grad_max_gb=1e-06"):
        build_run(tmp_path, "ctrlora", *overrides)
    build_run(tmp_path / "calibration", "ctrlora", *overrides[:1], *overrides[3:])  # calibration passes sketch G


def test_a_bf16_backbone_keeps_the_metric_in_bf16_at_half_the_memory(tmp_path: Path) -> None:
    runs = {dtype: build_run(tmp_path / dtype, "ctrlora", f"model.dtype={dtype}") for dtype in ("float32", "bfloat16")}
    metrics = {dtype: run.method.trust.penalty.metrics for dtype, run in runs.items()}
    assert metrics["float32"].keys() == metrics["bfloat16"].keys()

    def metric_bytes(dtype: str) -> int:
        factors = {id(f): f for m in metrics[dtype].values() for f in (m.s_g, m.s_a)}.values()
        assert {t.dtype for f in factors for t in f.tensors().values()} == {getattr(torch, dtype)}
        return sum(t.numel() * t.element_size() for f in factors for t in f.tensors().values())

    assert 2 * metric_bytes("bfloat16") == metric_bytes("float32")
    generator = torch.Generator().manual_seed(0)
    for name, metric in metrics["bfloat16"].items():  # the same factors, multiplied in bf16 or in fp32
        B = torch.randn(metric.s_g.dim, 4, generator=generator)
        A = torch.randn(4, metric.s_a.dim, generator=generator)
        exact = kronecker_penalty(B, A, metric.scaling, metric.s_g.to(dtype=torch.float32), metric.s_a.to(dtype=torch.float32))
        assert abs(float(kronecker_penalty(B, A, metric.scaling, metric.s_g, metric.s_a) / exact) - 1) < 1e-2, name


def test_metric_rank_holds_each_wide_metric_factor_as_its_top_eigenpairs_and_trains(tmp_path: Path) -> None:
    run = build_run(tmp_path, "ctrlora", "method.ctr.metric_rank=4")
    cfg = run.method.curvature_settings()
    metrics = run.method.trust.penalty.metrics
    step0 = estimate_curvature(run.model.get_base_model(), run.datamodule.calibration_dataloader(), list(metrics), cfg, progress=False)
    held = 0
    for name, metric in metrics.items():
        for factor, full in zip((metric.s_a, metric.s_g), expected_metric(step0[name], cfg), strict=True):
            if full.shape[0] <= 4:
                assert isinstance(factor, DenseFactor), name
                continue
            assert isinstance(factor, LowRankFactor) and factor.rank == 4, name
            assert relative_error(factor.dense(), DenseFactor(full).truncated(4).dense()) < 1e-5, name
            held += 1
    assert held > len(metrics)  # both sides of most modules are wider than 4
    batch = next(iter(run.datamodule.calibration_dataloader()))
    before = mean_token_loss(run.model, [batch])
    run.trainer.fit(run.module, datamodule=run.datamodule)
    assert mean_token_loss(run.model, [batch]) < before - 0.05
    assert float(run.trainer.callback_metrics["method/penalty"]) > 0
