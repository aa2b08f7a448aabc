"""The on-disk cache: a second call loads, a changed setting or key misses."""

from __future__ import annotations

from dataclasses import replace

import torch

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import estimate_curvature

from .helpers import targets_of


class Unreadable:
    """Calibration batches that fail when read: a cache hit must not touch them."""

    def __iter__(self):
        raise AssertionError("the estimate was recomputed instead of loaded")


def test_a_second_call_loads_and_a_changed_setting_misses(tmp_path, model, batches):
    targets = targets_of(model, ["q_proj", "k_proj", "down_proj"])
    key = {"backbone": "tiny-llama", "data": "lm-batches", "calibration_seed": 0, "num_samples": 5}
    cfg = CurvatureConfig(cache_dir=str(tmp_path))
    first = estimate_curvature(model, batches, targets, cfg, want_grad=True, progress=False, cache_key=key)
    assert not first.report.cached and len(list(tmp_path.glob("curvature-*.pt"))) == 1

    again = estimate_curvature(
        model, Unreadable(), targets, cfg, want_grad=True, progress=False, cache_key=key
    )
    assert again.report.cached and again.report.tokens == first.report.tokens
    for name in targets:
        assert torch.equal(again[name].a.dense(), first[name].a.dense())
        assert torch.equal(again[name].g.dense(), first[name].g.dense())
        assert torch.equal(again[name].grad, first[name].grad)
    layer = "model.layers.0.self_attn"
    assert again[f"{layer}.q_proj"].a is again[f"{layer}.k_proj"].a  # shared factors stay shared

    # settings that do not change the numbers still hit (damping is applied by consumers)
    assert estimate_curvature(
        model, Unreadable(), targets, replace(cfg, damping=0.5), want_grad=True, progress=False, cache_key=key
    ).report.cached
    changed_setting = estimate_curvature(
        model, batches, targets, replace(cfg, fisher="mc"), want_grad=True, progress=False, cache_key=key
    )
    changed_key = estimate_curvature(
        model, batches, targets, cfg, want_grad=True, progress=False, cache_key={**key, "calibration_seed": 1}
    )
    assert not changed_setting.report.cached and not changed_key.report.cached
    assert len(list(tmp_path.glob("curvature-*.pt"))) == 3


def test_without_a_key_nothing_is_cached(tmp_path, model, batches):
    cfg = CurvatureConfig(kind="activation", cache_dir=str(tmp_path))
    estimate_curvature(model, batches, targets_of(model, ["o_proj"]), cfg, progress=False)
    assert not list(tmp_path.iterdir())
