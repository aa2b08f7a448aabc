"""StepSampler: a deterministic stream of seeded permutations, exact to resume and to shard across ranks."""

from __future__ import annotations

from itertools import islice

import pytest
import torch
from torch.utils.data import DataLoader

from ctrlora.data.sampler import StepSampler, epoch_seed
from ctrlora.errors import ConfigError


def take(sampler: StepSampler, count: int) -> list[list[int]]:
    return list(islice(iter(sampler), count))


def test_stream_is_the_concatenation_of_seeded_permutations():
    num_examples, batch_size, seed = 10, 4, 7
    batches = take(StepSampler(num_examples, batch_size, seed=seed), 10)  # 40 positions = 4 epochs
    permutations = [
        torch.randperm(num_examples, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch))).tolist()
        for epoch in range(4)
    ]
    assert [index for batch in batches for index in batch] == sum(permutations, [])
    assert batches[2] == permutations[0][8:] + permutations[1][:2]  # batches straddle epochs, none is cut


def test_deterministic_and_seed_dependent():
    assert take(StepSampler(50, 8, seed=1), 20) == take(StepSampler(50, 8, seed=1), 20)
    assert take(StepSampler(50, 8, seed=1), 20) != take(StepSampler(50, 8, seed=2), 20)


def test_neighbouring_seeds_do_not_share_epoch_orders():
    """Seed s + 1's first epoch is not seed s's second (as it was with seeds s + e): the seed runs of a
    study see unrelated data orders."""
    orders = {seed: StepSampler(50, 10, seed=seed) for seed in range(4)}
    epochs = [tuple(orders[seed].permutation(epoch)) for seed in range(4) for epoch in range(3)]
    assert len(set(epochs)) == len(epochs)


@pytest.mark.parametrize("world_size", [1, 3])
def test_resume_continues_the_same_stream(world_size):
    for rank in range(world_size):
        full = take(StepSampler(23, 4, seed=3, world_size=world_size, rank=rank), 30)
        for start in (1, 5, 17):
            resumed = take(
                StepSampler(23, 4, seed=3, world_size=world_size, rank=rank, start_batch=start), 30 - start
            )
            assert resumed == full[start:]


def test_ranks_partition_the_single_process_batch():
    batch_size, world_size = 3, 4
    single = take(StepSampler(17, batch_size * world_size, seed=5), 12)
    per_rank = [
        take(StepSampler(17, batch_size, seed=5, world_size=world_size, rank=r), 12)
        for r in range(world_size)
    ]
    for step in range(12):
        shards = [per_rank[r][step] for r in range(world_size)]
        assert sum(shards, []) == single[step]  # rank r holds the r-th slice, in order
        assert all(len(shard) == batch_size for shard in shards)


def test_dataloader_needs_no_length():
    loader = DataLoader(list(range(100, 110)), batch_sampler=StepSampler(10, 4, seed=0))
    with pytest.raises(TypeError):
        len(loader)
    batches = list(islice(iter(loader), 3))
    expected = take(StepSampler(10, 4, seed=0), 3)
    assert [batch.tolist() for batch in batches] == [[100 + i for i in b] for b in expected]


def test_invalid_arguments_fail_clearly():
    with pytest.raises(ConfigError, match="empty"):
        StepSampler(0, 4)
    with pytest.raises(ConfigError, match="rank 2 is not in"):
        StepSampler(10, 4, world_size=2, rank=2)
