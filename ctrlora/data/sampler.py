"""`StepSampler`: an infinite, resumable, DDP-exact batch sampler for step-based training.

The stream of example indices is the concatenation of seeded permutations of ``range(N)``:
epoch e is ``randperm(N)`` from a generator seeded with `epoch_seed(seed, e)`, a hash of the pair
(not ``seed + e``, under which seed s + 1 would see seed s's orders shifted by one epoch). Stream position p holds ``perm_{p // N}[p % N]``. Global
batch k is stream positions ``[k·B·W, (k+1)·B·W)`` (B = per-rank batch size, W = world size), and
rank r takes its r-th slice ``[k·B·W + r·B, k·B·W + (r+1)·B)``. Hence

* the union over ranks of step k's batches is exactly the single-process batch k of size B·W;
* skipping the first ``start_batch`` batches costs nothing, and a resumed run continues the very
  stream an uninterrupted run would have produced.

Global batches may straddle epochs (the stream has no epoch boundaries), so no example is
dropped or repeated within an epoch's worth of steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from ctrlora.errors import ConfigError


def epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit seed for (run seed, epoch): NumPy's SeedSequence hash of the pair, so distinct pairs
    give unrelated permutations."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0])


class StepSampler(Sampler[list[int]]):
    """Yields per-rank batches (lists of example indices) forever, from batch ``start_batch`` on.

    Use as ``DataLoader(dataset, batch_sampler=StepSampler(...))``; it has no ``len``.
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        *,
        seed: int = 0,
        world_size: int = 1,
        rank: int = 0,
        start_batch: int = 0,
    ) -> None:
        if num_examples < 1:
            raise ConfigError("the training set is empty: StepSampler needs at least one example")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size} must be at least 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in [0, world_size={world_size})")
        if start_batch < 0:
            raise ConfigError(f"start_batch={start_batch} must be non-negative")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.start_batch = start_batch
        self._cached_epoch: tuple[int, list[int]] | None = None

    def permutation(self, epoch: int) -> list[int]:
        """``randperm(N)`` drawn from a generator seeded with ``epoch_seed(seed, epoch)``."""
        if self._cached_epoch is None or self._cached_epoch[0] != epoch:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            self._cached_epoch = (epoch, torch.randperm(self.num_examples, generator=generator).tolist())
        return self._cached_epoch[1]

    def stream(self, start: int, stop: int) -> list[int]:
        """Example indices at stream positions ``[start, stop)``."""
        indices, position = [], start
        while position < stop:
            epoch, offset = divmod(position, self.num_examples)
            take = min(stop - position, self.num_examples - offset)
            indices += self.permutation(epoch)[offset : offset + take]
            position += take
        return indices

    def batch(self, step: int) -> list[int]:
        """This rank's slice of global batch ``step``."""
        start = (step * self.world_size + self.rank) * self.batch_size
        return self.stream(start, start + self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_batch
        while True:
            yield self.batch(step)
            step += 1
