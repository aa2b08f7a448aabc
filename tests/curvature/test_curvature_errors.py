"""Bad input fails early with a message that names the problem."""

from __future__ import annotations

import pytest
import torch

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import estimate_curvature

from .helpers import assert_close, targets_of


def test_config_rejects_unknown_choices_and_bad_numbers():
    with pytest.raises(
        ValueError,
        match=r"curvature.kind='kfc' is not valid; choose one of \['kfac', 'hutchinson', 'activation'\]",
    ):
        CurvatureConfig(kind="kfc")
    with pytest.raises(ValueError, match="curvature.fisher"):
        CurvatureConfig(fisher="true")
    with pytest.raises(ValueError, match="curvature.probes must be > 0"):
        CurvatureConfig(probes=0)


def test_targets_must_be_named_linear_layers(model, batches):
    with pytest.raises(KeyError, match="model.layers.0.self_attn.q_proj"):
        estimate_curvature(
            model, batches, ["model.layers.0.self_attn.q_prj"], CurvatureConfig(), progress=False
        )
    with pytest.raises(TypeError, match="target 'model.norm'"):
        estimate_curvature(model, batches, ["model.norm"], CurvatureConfig(), progress=False)


def test_gradient_requests_need_a_backward_estimator_and_a_sketch_rank(model, batches):
    target = targets_of(model, ["o_proj"])
    with pytest.raises(ValueError, match="forward only"):
        estimate_curvature(
            model, batches, target, CurvatureConfig(kind="activation"), want_grad=True, progress=False
        )
    with pytest.raises(ValueError, match="needs sketch_rank"):
        estimate_curvature(
            model, batches, target, CurvatureConfig(grad_mode="sketch"), want_grad=True, progress=False
        )


def test_a_one_shot_iterator_serves_one_pass_only(model, batches):
    target = targets_of(model, ["o_proj"])
    from_list = estimate_curvature(model, batches, target, CurvatureConfig(), progress=False)
    from_iterator = estimate_curvature(model, iter(batches), target, CurvatureConfig(), progress=False)
    assert_close(from_iterator[target[0]].g.dense(), from_list[target[0]].g.dense(), 0.0)
    with pytest.raises(TypeError, match="makes 3 passes"):
        cfg = CurvatureConfig(grad_mode="sketch")
        estimate_curvature(model, iter(batches), target, cfg, want_grad=True, sketch_rank=2, progress=False)


def test_batches_without_counted_tokens_or_known_keys_are_rejected(model, batches):
    target = targets_of(model, ["o_proj"])
    silent = [{**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}]
    with pytest.raises(ValueError, match="no counted tokens"):
        estimate_curvature(model, silent, target, CurvatureConfig(kind="activation"), progress=False)
    with pytest.raises(ValueError, match="cannot tell the objective"):
        estimate_curvature(
            model, [{"ids": batches[0]["input_ids"]}], target, CurvatureConfig(), progress=False
        )
