"""Files that appear complete or not at all: written beside their final name, then renamed.

`os.replace` within one folder (so one filesystem) is atomic, so a reader — or a run resumed after
a kill at any instruction — sees the old file or the complete new one, never a torn write. A
failed write removes its staging file (on a full disk that frees the space it took).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


@contextmanager
def staged(path: Path, *, per_process: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yield the staging path ``<path>.partial`` to write; on success it replaces `path`.

    `per_process`: the staging name holds the process id (several processes may write `path` at
    once, the last rename wins). `durable`: fsync the file before the rename (checkpoints: the
    rename must not reach the disk before the data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}" if per_process else path.name + PARTIAL_SUFFIX)
    try:
        yield partial
        if durable:
            with open(partial, "rb+") as file:
                os.fsync(file.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def write_text_atomic(path: Path, text: str, *, per_process: bool = False) -> None:
    """`path` holds `text`, written through `staged`."""
    with staged(path, per_process=per_process) as partial:
        partial.write_text(text)
