"""`eval.batch_size` (docs/EVALUATION.md §1): a fixed size, or ``auto``, the largest that fits the device.

lm-eval's HFLM resolves ``auto`` itself: accelerate's `find_executable_batch_size` tries
``eval.max_batch_size`` and shrinks it on out-of-memory (``auto:N`` detects again N times as the
requests get shorter). Our own loaders (a classifier's test and validation splits) use the same
function around the whole evaluation. On a CPU nothing runs out of device
memory, so ``auto`` is ``eval.max_batch_size`` there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from accelerate.utils import find_executable_batch_size

from ctrlora.errors import ConfigError

AUTO = re.compile(r"auto(:[1-9][0-9]*)?")
T = TypeVar("T")

BatchSize = int | str  # a size >= 1, "auto" or "auto:N"


def check_batch_size(key: str, value: object) -> None:
    """Raise `ConfigError` naming `key` unless `value` is an int >= 1, ``auto`` or ``auto:N``."""
    valid = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
        isinstance(value, str) and AUTO.fullmatch(value) is not None
    )
    if not valid:
        raise ConfigError(f"{key}={value!r} is not a batch size; use an integer >= 1, auto or auto:N")


def with_batch_size(batch_size: BatchSize, body: Callable[[int], T], maximum: int) -> T:
    """``body(batch_size)``; for ``auto``, ``body`` at `maximum`, shrunk and rerun on each out-of-memory error."""
    if isinstance(batch_size, int):
        return body(batch_size)
    return find_executable_batch_size(body, starting_batch_size=maximum)()
