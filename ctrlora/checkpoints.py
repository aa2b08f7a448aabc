"""Checkpoint files a killed run can always resume from.

A run may be killed (SIGKILL, a SLURM time limit, a preempted node) at any instruction, also in
the middle of writing a checkpoint. Two rules make that harmless:

1. A checkpoint file appears complete or not at all: it is written next to its final name
   (`<name>.partial`, same directory, so the same filesystem), flushed and fsynced, then renamed
   with `os.replace`. Lightning's own `_atomic_save` stages through fsspec's temporary file in the
   system temp dir, which is a plain copy — not atomic — when /tmp and the run dir are on different
   filesystems (the usual case on clusters: local /tmp, shared run dirs).
2. A resume picks the newest complete `step*.ckpt` by its step number, not `last.ckpt`, which is a
   link that is briefly absent while Lightning re-points it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

CHECKPOINT_NAME = re.compile(r"^step(\d+)\.ckpt$")
PARTIAL_SUFFIX = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose files are written to `<path>.partial`, fsynced, then renamed into place."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        with open(partial, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)


def checkpoint_step(path: Path) -> int | None:
    """The optimizer step in a checkpoint's file name (`step000040.ckpt` -> 40), or None."""
    match = CHECKPOINT_NAME.match(path.name)
    return int(match.group(1)) if match else None


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The complete checkpoint of the highest step in `checkpoint_dir`, or None when there is none.

    Leftover `.partial` files of a write that was killed are ignored (the next save replaces them).
    """
    if not checkpoint_dir.is_dir():
        return None
    steps = {step: path for path in checkpoint_dir.iterdir() if (step := checkpoint_step(path)) is not None}
    return steps[max(steps)] if steps else None
