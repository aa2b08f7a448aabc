"""The calibration subset: a fixed, seeded sample of the training examples for curvature estimation.

The subset depends only on ``calibration.seed`` and ``calibration.num_samples`` (not on the
training seed), so runs that differ only in their seed see the same curvature. Its indices are
the first ``num_samples`` entries of ``randperm(N, calibration.seed)``: a larger sample contains a
smaller one. Under data parallelism rank r takes every W-th of them (``indices[r::W]``), so the
ranks' shards are disjoint and together are the whole subset: statistics summed over ranks equal
the single-process ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from ctrlora.config import CalibrationConfig
from ctrlora.data.tokenization import TokenizedExample


def calibration_indices(num_examples: int, num_samples: int, seed: int) -> list[int]:
    """``randperm(num_examples, seed)[:num_samples]`` (all examples, permuted, when fewer)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_examples, generator=generator)[:num_samples].tolist()


def calibration_dataloader(
    examples: Sequence[TokenizedExample],
    cfg: CalibrationConfig,
    collate_fn: Callable,
    *,
    world_size: int = 1,
    rank: int = 0,
) -> DataLoader:
    """This rank's shard of the calibration subset, in fixed order, ``cfg.batch_size`` per batch."""
    indices = calibration_indices(len(examples), cfg.num_samples, cfg.seed)[rank::world_size]
    return DataLoader(
        Subset(examples, indices), batch_size=cfg.batch_size, shuffle=False, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(cfg.seed),  # iterating must not draw from the global RNG
    )
