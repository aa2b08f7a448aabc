"""Rank grid parsing and the written figures."""

from __future__ import annotations

import numpy as np
import pytest

from ctrlora.plots import loss_curve, parse_module_name, rank_grid, rank_heatmap

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_parse_module_name_styles():
    assert parse_module_name("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert parse_module_name("base_model.model.model.layers.12.mlp.down_proj") == (12, "mlp.down_proj")
    assert parse_module_name("encoder.layer.2.attention.self.query") == (2, "attention.self.query")
    with pytest.raises(ValueError, match="'lm_head'"):
        parse_module_name("lm_head")


def test_rank_grid_decoder_with_missing_cells():
    ranks = {
        "model.layers.0.self_attn.q_proj": 8,
        "model.layers.0.mlp.down_proj": 2,
        "model.layers.1.self_attn.q_proj": 4,
        "model.layers.1.self_attn.v_proj": 16,
        "model.layers.10.mlp.down_proj": 1,
    }
    layers, types, matrix = rank_grid(ranks)
    assert layers == [0, 1, 10]
    assert types == ["q_proj", "down_proj", "v_proj"]
    np.testing.assert_array_equal(matrix, [[8, 2, 0], [4, 0, 16], [0, 1, 0]])


def test_rank_grid_encoder_labels_stay_distinct():
    ranks = {
        "encoder.layer.0.attention.self.query": 3,
        "encoder.layer.0.attention.output.dense": 5,
        "encoder.layer.0.intermediate.dense": 7,
        "encoder.layer.0.output.dense": 9,
    }
    layers, types, matrix = rank_grid(ranks)
    assert layers == [0]
    assert types == ["query", "attention.output.dense", "intermediate.dense", "output.dense"]
    np.testing.assert_array_equal(matrix, [[3, 5, 7, 9]])


def test_rank_grid_rejects_two_modules_in_one_cell():
    with pytest.raises(ValueError, match="already taken"):
        rank_grid({"encoder.block.0.attn.q": 1, "decoder.block.0.attn.q": 2})


def test_figures_are_written(tmp_path):
    blocks = {"q_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn", "down_proj": "mlp"}
    ranks = {
        f"model.layers.{layer}.{block}.{kind}": (3 * layer + index) % 17
        for layer in range(6)
        for index, (kind, block) in enumerate(blocks.items())
    }
    heatmap = rank_heatmap(ranks, tmp_path / "plots" / "ranks.png", title="ranks")
    curve = loss_curve(list(range(50)), [2.0 / (1 + 0.1 * s) for s in range(50)], tmp_path / "loss.png")
    for path in (heatmap, curve):
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000
    with pytest.raises(ValueError, match="differ in length"):
        loss_curve([0, 1], [1.0], tmp_path / "bad.png")
