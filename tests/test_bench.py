"""`make bench` (ctrlora.bench) end to end on tiny-llama with two methods and a few steps, and the
composition of its GPU preset. Timings are reported by the bench, never asserted here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ctrlora.bench import CONF_DIR, main
from ctrlora.bench.config import BenchSettings, register_bench_config
from ctrlora.bench.estimators import marginal_and_fixed
from ctrlora.bench.probes import MemoryProbe
from ctrlora.bench.suite import compose_train
from ctrlora.errors import ConfigError

ESTIMATORS = {
    "activation", "kfac_empirical_dense_grad", "kfac_empirical_sketch_grad", "kfac_mc", "hutchinson", "hutchinson_ggn"
}


def test_bench_writes_ratios_curvature_fractions_overhead_and_estimators(tmp_path: Path) -> None:
    summary = main([
        "bench.model=tiny-llama", "bench.methods=[lora,ctrlora]", "bench.steps=3", "bench.warmup=1",
        "bench.calibration_samples=16", "bench.estimator_batches=2", "bench.eval_limit=8", f"bench.output_dir={tmp_path}",
    ])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == json.loads(json.dumps(summary, default=str))
    assert data["environment"]["versions"]["torch"] and data["environment"]["device"]
    assert data["settings"]["model_group"] == "tiny-llama" and data["environment"]["budget_rank"] == 8

    lora, ctr = data["methods"]["lora"], data["methods"]["ctrlora"]
    assert lora["step_time_vs_lora"] == 1.0 and lora["peak_memory_vs_lora"] == 1.0
    assert lora["cpu_time_vs_lora"] == {"median": 1.0, "min": 1.0}
    for row in (lora, ctr):
        assert len(row["step_time"]["times_s"]) == len(row["step_time"]["cpu_times_s"]) == 3
        assert row["tokens_per_step"] == 8 * 32 and row["tokens_per_s"] > 0  # packed batch_size × seq_len
        assert row["results"]["train"]["steps"] == data["settings"]["refresh_step"] + 1
    assert lora["curvature_work"] is None

    # CTR-LoRA refreshed once inside the run, after the timed steps; at the default cadence (every 500
    # steps) a 1000-step run refreshes once. N = train.yaml's calibration.num_samples, then 256, 2048.
    refreshes = ctr["results"]["train"]["curvature"]["refreshes"]
    assert [refresh["step"] for refresh in refreshes] == [data["settings"]["refresh_step"]]
    works = {work["samples"]: work for work in ctr["curvature_work"]}
    assert list(works)[0] == data["defaults"]["ctrlora"]["calibration_samples"] and {256, 2048} <= set(works)
    for work in works.values():
        # no sign on the fraction: its set-up term is CTR-LoRA's set-up time minus LoRA's, noise on tiny-llama
        assert work["refreshes"] == 1 and work["per_refresh_s"] > 0  # a refresh's measured seconds
        assert work["total_s"] == pytest.approx(work["initial_s"] + work["per_refresh_s"])
        assert work["fraction"] == pytest.approx(work["total_s"] / (1000 * ctr["step_time"]["median_s"]))
    assert works[2048]["total_s"] > works[256]["total_s"]  # the estimate grows with the calibration set

    overhead = data["overhead"]
    assert overhead["lightning_median_s"] == lora["step_time"]["median_s"] and overhead["bare_median_s"] > 0
    assert overhead["loss_max_abs_diff"] < 1e-6  # the bare loop ran the very same steps
    assert set(data["estimators"]) == ESTIMATORS
    step_flops = overhead["bare"]["step_flops"]
    flops = {name: row["flops_vs_lora_step"] for name, row in data["estimators"].items()}
    for name, row in data["estimators"].items():
        assert flops[name] == pytest.approx(row["flops_one_batch"] / step_flops)
    # counts, not times, so their order is exact: 16 Hessian-vector products (double backward) > 16
    # Gauss–Newton backwards > one forward and backward (K-FAC) > a forward (activation)
    assert flops["hutchinson"] > flops["hutchinson_ggn"] > flops["kfac_mc"] > flops["activation"] > 0
    cpu_step = lora["step_time"]["cpu_median_s"]
    for row in data["estimators"].values():  # timed on 1 batch and on 2: one more batch, and the fixed rest
        assert row["batches"] == 2 and row["fixed_s"] is not None  # (a difference of timings: its sign is noise on tiny-llama)
        assert row["cpu_per_batch_vs_lora_step"] == pytest.approx(row["cpu_per_batch_s"] / cpu_step)
        spread = row["cpu_fixed_s"] / row["calibration_batches"] + row["cpu_per_batch_s"]
        assert row["calibration_batches"] == 2 and row["run_per_batch_vs_lora_step"] == pytest.approx(spread / cpu_step)

    evaluation = data["evaluation"]  # the same adapter, task YAMLs and limit: the same scores
    assert evaluation["limit"] == 8 and evaluation["tasks"] == ["fortune_topics"]
    score = evaluation["accuracy"]["fortune_topics"]
    assert score["ours"] == pytest.approx(score["lm_eval_cli"], abs=1e-9)

    table = (tmp_path / "results.md").read_text()
    assert "Evaluation (8 documents of fortune_topics, one LoRA adapter)" in table
    assert "| lora | " in table and " | 1.000 | " in table.split("| lora | ")[1].splitlines()[0]
    assert "| ctrlora | " in table and "Framework overhead" in table and "| hutchinson | " in table
    assert f"({step_flops / 1e9:.2f} GFLOP)" in table and "× LoRA step (FLOPs)" in table


def test_an_estimators_time_splits_into_one_more_batch_and_a_fixed_rest() -> None:
    row = marginal_and_fixed(one=(3.0, 2.0), every=(7.0, 5.0), count=3)  # (wall, CPU) on 1 and on 3 batches
    assert row == {"per_batch_s": 2.0, "fixed_s": 1.0, "cpu_per_batch_s": 1.5, "cpu_fixed_s": 0.5}
    assert marginal_and_fixed(one=(3.0, 2.0), every=(3.0, 2.0), count=1)["fixed_s"] is None


def test_the_llama2_7b_preset_composes_for_the_gpu() -> None:
    register_bench_config()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        settings: BenchSettings = OmegaConf.to_object(
            compose("bench", overrides=["bench.model=llama2-7b", "bench.model_path=/weights/llama"])
        ).bench
        assert len(settings.methods) == 9 and settings.steps >= 20
        for method in settings.methods:
            cfg = compose_train(settings.train_overrides_for(method, "gpu", f"/tmp/{method}"))
            assert cfg.method.name == method and cfg.model.name == "llama2-7b"
            assert cfg.model.path == "/weights/llama" and cfg.model.dtype == "auto"
            assert cfg.trainer.accelerator == "gpu" and cfg.trainer.max_steps == settings.total_steps


def test_the_reference_method_is_required() -> None:
    with pytest.raises(ConfigError, match="bench.methods=.*must include 'lora'"):
        main(["bench.methods=[dora,ctrlora]"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/statm")
def test_cpu_memory_probe_counts_allocations_not_the_pages_of_a_mapped_checkpoint(tmp_path: Path) -> None:
    mib = 2**20
    path = tmp_path / "weights.bin"
    np.ones(64 * mib // 4, dtype=np.float32).tofile(path)
    with MemoryProbe(torch.device("cpu"), interval_s=0.001) as probe:
        probe.start()
        mapped = np.memmap(path, dtype=np.float32, mode="r")
        assert float(mapped.sum()) == 64 * mib // 4  # every page read, so resident
        reading = probe.peak()
        allocated = torch.ones(64 * mib // 4)
        allocating = probe.peak()
    assert reading < 8 * mib <= 60 * mib < allocating
    del mapped, allocated
