"""Checkpoint files a killed run can always resume from.

A run may be killed (SIGKILL, a SLURM time limit, a preempted node) at any instruction, also in
the middle of writing a checkpoint. Two rules make that harmless:

1. A checkpoint file appears complete or not at all: it is written next to its final name
   (`<name>.partial`, same directory, so the same filesystem), flushed and fsynced, then renamed
   with `os.replace`. Lightning's own `_atomic_save` stages through fsspec's temporary file in the
   system temp dir, which is a plain copy — not atomic — when /tmp and the run dir are on different
   filesystems (the usual case on clusters: local /tmp, shared run dirs).
2. A resume picks the newest complete `step*.ckpt` by its step number, not `last.ckpt`, which is a
   link that is briefly absent while Lightning re-points it (`last.ckpt` only when it is all there is).
3. The two newest checkpoints are kept (the older is removed only once the newer is durable), and a
   resume skips a newest checkpoint that does not open — a disk error, a bad copy — saying so.

`SignalCheckpoint` stops a run on SIGTERM/SIGUSR1/SIGUSR2 (a scheduler's notice) at the next
optimizer-step boundary, after writing a checkpoint there, so `resume=true` continues from exactly
that step; then `pass_on` requeues a SLURM job (see there).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from ctrlora.atomic import staged

log = logging.getLogger(__name__)
CHECKPOINT_NAME = re.compile(r"^step(\d+)\.ckpt$")
CHECKPOINT_FORMAT = "step{:06d}.ckpt"  # ModelCheckpoint's filename="step{step:06d}" (trainers.checkpoint_callback)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)  # USR2: submitit's notice


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose files are written to `<path>.partial`, fsynced, then renamed into place."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        with staged(Path(path), durable=True) as partial, open(partial, "wb") as file:
            torch.save(checkpoint, file)  # a failed write: storage.storage_error finds the OSError under it


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step in a checkpoint's file name (`step000040.ckpt` -> 40), or None."""
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def step_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The complete `step*.ckpt` files in `checkpoint_dir`, newest (highest step) first.

    Leftover `.partial` files of a write that was killed are ignored (the next save replaces them).
    """
    if not checkpoint_dir.is_dir():
        return []
    steps = {step: path for path in checkpoint_dir.iterdir() if (step := checkpoint_step(path)) is not None}
    return [steps[step] for step in sorted(steps, reverse=True)]


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint of the highest step in `checkpoint_dir`, or None when there is none."""
    return next(iter(step_checkpoints(checkpoint_dir)), None)


def resumable_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The checkpoint a resume loads: the newest `step*.ckpt` that opens (an unreadable one is skipped
    with a warning naming it), else `last.ckpt` when it is the only file; None when nothing opens."""
    last = checkpoint_dir / "last.ckpt"
    candidates = step_checkpoints(checkpoint_dir) or ([last] if last.exists() else [])
    for path in candidates:
        problem = unreadable(path)
        if problem is None:
            return path
        log.warning("checkpoint %s does not open (%s); trying the one before it", path, problem)
    return None


def unreadable(path: Path) -> str | None:
    """Why `path` does not open as a checkpoint, or None when it does (memory-mapped: tensor data
    is not read; a sharded checkpoint directory is taken as it is)."""
    if path.is_dir():
        return None
    try:
        torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except Exception as error:  # a truncated or overwritten file: zip, pickle or storage errors alike
        return f"{type(error).__name__}: {error}"
    return None


class SignalCheckpoint(L.Callback):
    """On SIGTERM or SIGUSR1: finish the optimizer step in progress, write its checkpoint, stop.

    The handlers only set a flag (installed at the start of training, the previous ones restored at
    its end). At each step boundary the ranks agree on the flag (one collective under data
    parallelism), so every rank saves and stops at the same step. `stopped_by` then names the signal;
    the run is unfinished and resumes with ``resume=true``.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.received: int | None = None
        self.stopped_by: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}
        self._last_step = -1

    def _notice(self, signum: int, _: FrameType | None) -> None:
        self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._previous = {sig: signal.signal(sig, self._notice) for sig in STOP_SIGNALS}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        if trainer.global_step == self._last_step:  # inside gradient accumulation
            return
        self._last_step = trainer.global_step
        stop = trainer.strategy.reduce_boolean_decision(self.received is not None, all=False)
        if not stop or trainer.global_step >= trainer.max_steps:
            return
        trainer.save_checkpoint(self.checkpoint_dir / CHECKPOINT_FORMAT.format(trainer.global_step))
        self.stopped_by = signal.Signals(self.received).name if self.received else "a signal on another rank"
        self.stopped_at = trainer.global_step
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def pass_on(self) -> str:
        """After a stop, what the signal asked of the job; returns what was done ("; ..." or "").

        A Python handler of the signal, outside training (submitit's: it requeues the job with
        ``resume=true`` and exits the process; the one Lightning holds during `fit` is gone by now),
        gets the signal. Under plain ``sbatch``
        (``SLURM_JOB_ID`` set; submit with ``--requeue --signal=B:USR1@300`` and ``resume=true`` in the
        command) SIGUSR1/SIGUSR2 requeue the job with ``scontrol requeue``. Otherwise nothing.
        """
        if self.received is not None and callable(signal.getsignal(self.received)):
            signal.raise_signal(self.received)  # its handler runs now, with ours gone (submitit's exits)
            return ""
        job = os.environ.get("SLURM_JOB_ID")
        if job is None or self.received not in (signal.SIGUSR1, signal.SIGUSR2) or os.environ.get("SLURM_PROCID", "0") != "0":
            return ""
        if shutil.which("scontrol") is None:
            return f"; SLURM job {job} not requeued: no scontrol on PATH"
        requeued = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if requeued.returncode != 0:
            return f"; SLURM job {job} not requeued: {requeued.stderr.strip()} (submit with sbatch --requeue)"
        return f"; SLURM job {job} requeued"
