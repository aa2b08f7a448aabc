"""Points at which a test run SIGKILLs itself (test-only hooks on ctrlora's own classes).

SIGKILL leaves no chance for cleanup: no `finally`, no Lightning exception handling, no logger
flush — what `kill -9`, the OOM killer or a lost node does to a run.

`arm_every_process` arms `kill_after_step` in every process of a `python train.py` run, the rank
processes Lightning starts included, so all ranks die at the same step.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from ctrlora import report
from ctrlora.checkpoints import AtomicCheckpointIO
from ctrlora.lit import FinetuneModule


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_step(step: int) -> None:
    """SIGKILL once optimizer step `step` is done (after that step's checkpoint, if it has one)."""

    def on_train_batch_end(self: FinetuneModule, *args: object) -> None:
        if self.global_step == step:
            die()

    FinetuneModule.on_train_batch_end = on_train_batch_end


def kill_while_writing_checkpoint(step: int) -> None:
    """SIGKILL half-way through writing the checkpoint of `step`: half its bytes are on disk."""
    save = AtomicCheckpointIO.save_checkpoint

    def truncate_and_die(fd: int) -> None:
        os.ftruncate(fd, os.fstat(fd).st_size // 2)
        die()

    def save_checkpoint(
        self: AtomicCheckpointIO, checkpoint: dict, path: str | Path, **kwargs: object
    ) -> None:
        if Path(path).name == f"step{step:06d}.ckpt":
            os.fsync = truncate_and_die
        save(self, checkpoint, path, **kwargs)

    AtomicCheckpointIO.save_checkpoint = save_checkpoint


def kill_before_results() -> None:
    """SIGKILL after training and the adapter were saved, before results.json exists."""
    report.build_results = lambda *args, **kwargs: die()


SITECUSTOMIZE = """
import os
from kill_points import kill_after_step
kill_after_step(int(os.environ["CTRLORA_KILL_AFTER_STEP"]))
"""


def arm_every_process(site_dir: Path, after_step: int) -> dict[str, str]:
    """The environment under which every Python process (each rank too) SIGKILLs itself after
    `after_step`: a `sitecustomize` on PYTHONPATH arms `kill_after_step` at interpreter start."""
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    tests = Path(__file__).resolve().parent
    path = os.pathsep.join([str(site_dir), str(tests), str(tests.parent)])
    return {**os.environ, "PYTHONPATH": path, "CTRLORA_KILL_AFTER_STEP": str(after_step)}
