"""Settings of the evaluation suites (EVALUATION §1); the `eval=` config group."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalConfig:
    suite: str = "none"  # paper | local | none
    tasks: dict[str, Any] = field(default_factory=dict)  # task -> {num_fewshot, metrics, limit, batch_size}
    data_dir: str | None = None  # local mirrors of the benchmarks
    limit: float | None = None
    batch_size: int = 8
    seed: int = 0
    base_row: bool = True
    cache_dir: str | None = None
