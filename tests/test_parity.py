"""`python -m ctrlora.bench.parity`: LoRA on the bundled sentence-pair task through ctrlora and through a
bare transformers + PEFT loop with the same settings — both learn, with the same trainable weights, and so
does the bare loop started from ctrlora's initial weights and batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctrlora.bench.parity import main


@pytest.mark.slow
def test_ctrlora_and_a_bare_peft_loop_both_learn_the_pair_task(tmp_path: Path) -> None:
    assert main(["trainer.max_steps=100", "optim.lr=1.4e-3", "--seeds", "0", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "parity.json").read_text())["seeds"]
    assert row["ctrlora_params"] == row["bare_params"] == 332_546  # LoRA r=8 on 36 projections + the 2-way head
    for side in ("ctrlora", "bare", "bare_shared"):
        assert row[side] > 0.6, side  # test accuracy on unseen words; 50% is chance
    assert "| 0 |" in (tmp_path / "parity.md").read_text()
