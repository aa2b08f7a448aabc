"""A non-finite loss or gradient stops the run with an error naming the step; the checkpoints before
it stay intact and none is written at or after it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from torch import Tensor

from ctrlora.checkpoints import checkpoint_step, latest_checkpoint
from ctrlora.lit import FinetuneModule, NonFiniteLossError
from ctrlora.run import train

STEPS = ["eval=none", "trainer.max_steps=8", "trainer.progress_bar=false", "calibration.num_samples=32"]
BAD_STEP = 5


class NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not."""

    @staticmethod
    def forward(ctx: object, loss: Tensor) -> Tensor:
        return loss.clone()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad * float("nan")


def corrupt_at(step: int, corrupt: Callable[[Tensor], Tensor]) -> Callable:
    task_loss = FinetuneModule.task_loss

    def corrupted(self: FinetuneModule, batch: dict[str, Tensor]) -> Tensor:
        loss = task_loss(self, batch)
        return corrupt(loss) if self.global_step == step else loss

    return corrupted


INJECTIONS = {
    "loss": (corrupt_at(BAD_STEP, lambda loss: loss * float("nan")), "non-finite loss"),
    "gradient": (corrupt_at(BAD_STEP, NanGradient.apply), "non-finite gradient"),
}


@pytest.mark.parametrize("where", sorted(INJECTIONS))
def test_non_finite_stops_at_its_step_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    injected, message = INJECTIONS[where]
    monkeypatch.setattr(FinetuneModule, "task_loss", injected)
    with pytest.raises(NonFiniteLossError, match=f"{message}.* at step {BAD_STEP};"):
        train(compose_config([f"run_dir={tmp_path}", "trainer.checkpoint_every_n_steps=2", *STEPS]))
    assert_last_good_checkpoint(tmp_path, BAD_STEP, every=2)


def test_exploding_learning_rate_stops_with_the_step_named(tmp_path: Path) -> None:
    """lr = 1e30: the first step throws the weights to ±1e30, the next forward overflows."""
    overrides = [
        f"run_dir={tmp_path}",
        "optim.lr=1e30",
        "optim.warmup_ratio=0",
        "trainer.checkpoint_every_n_steps=1",
    ]
    with pytest.raises(NonFiniteLossError, match=r"at step \d+;") as error:
        train(compose_config([*overrides, *STEPS]))
    bad_step = int(re.search(r"at step (\d+);", str(error.value)).group(1))
    assert bad_step >= 1
    assert_last_good_checkpoint(tmp_path, bad_step, every=1)


def assert_last_good_checkpoint(run_dir: Path, bad_step: int, every: int) -> None:
    """The newest checkpoint is the last periodic one before `bad_step`, loads, and holds finite
    weights; nothing was written at or after the bad step, and no outputs exist."""
    newest = latest_checkpoint(run_dir / "checkpoints")
    assert newest is not None and checkpoint_step(newest) == bad_step - bad_step % every
    checkpoint = torch.load(newest, weights_only=False)
    assert checkpoint["global_step"] == checkpoint_step(newest)
    assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())
    assert not (run_dir / "adapter").exists() and not (run_dir / "results.json").exists()
