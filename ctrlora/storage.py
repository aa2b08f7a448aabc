"""Where a run writes: checked before Hydra creates the folder, and disk errors during a run as one line.

Hydra makes ``hydra.run.dir`` (``hydra.sweep.dir`` for ``-m``) before train.py's code runs, so an
unwritable or full location would surface as Hydra's traceback. `OutputDirCheck`, a Hydra callback
(conf/train.yaml ``hydra.callbacks``), probes the nearest existing folder on the way first and
exits with one line and code 2. `storage_error` turns a disk error raised later (the disk filled
mid-run) into a `RunDirError` naming the file; the newest complete checkpoint is intact, since
checkpoints are written beside and renamed into place.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ctrlora.errors import RunDirError

MIN_FREE_BYTES = 256 * 2**20  # checkpoints, adapter and results of a 7B LoRA run need about this much
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}


def storage_problem(path: Path, min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why files cannot be written under `path` (which need not exist yet), or None: its nearest
    existing ancestor must be a folder that takes a file and has `min_free` bytes free."""
    ancestor = next(folder for folder in [path, *path.parents] if folder.exists())
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        return f"{ancestor} takes no new files ({error.strerror})"
    free = shutil.disk_usage(ancestor).free
    if free < min_free:
        return f"{ancestor} has {free / 2**20:.0f} MiB free, under the {min_free // 2**20} MiB a run needs"
    return None


class OutputDirCheck(Callback):
    """Refuses a run or sweep whose output folder cannot be written, before Hydra creates it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.check(config, "hydra.sweep.dir")

    @staticmethod
    def check(config: DictConfig, key: str) -> None:
        HydraConfig.instance().set_config(config)  # resolves ${hydra:...} in the folder's name
        path = Path(str(OmegaConf.select(config, key))).absolute()
        problem = storage_problem(path)
        if problem is not None:
            print(f"RunDirError: cannot write the run dir {path}: {problem}; choose another with {key}=<folder>",
                  file=sys.stderr)
            sys.exit(2)


def storage_error(error: BaseException, run_dir: str | Path) -> RunDirError | None:
    """A disk error (full, read-only, no permission, over the file-size limit) as a RunDirError naming
    the file; None for other errors. Libraries wrap the OSError: torch.save in a RuntimeError whose
    context it is, safetensors in its own error whose message ends ``(os error N)``."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    for link in chain:
        code = link.errno if isinstance(link, OSError) else rust_os_error(str(link))
        if code in STORAGE_ERRNOS:
            where = getattr(link, "filename", None) or run_dir
            return RunDirError(
                f"cannot write {where}: {os.strerror(code)}. Free space (or raise the file-size limit) or choose"
                f" another run_dir; resume=true run_dir={run_dir} continues from the newest complete checkpoint"
            )
    return None


def rust_os_error(message: str) -> int | None:
    """The errno in a Rust I/O error's message (``... (os error 28)``), as safetensors raises them."""
    match = re.search(r"\(os error (\d+)\)", message)
    return int(match.group(1)) if match else None
