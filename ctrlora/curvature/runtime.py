"""Plumbing shared by the estimators: devices, dtypes, progress, all-reduce, seeds, peak memory."""

from __future__ import annotations

import ctypes
import resource
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor, nn

from ctrlora.curvature.hooks import base_linear, input_embeddings


def return_freed_host_memory() -> None:
    """Hand the host memory that a finished phase freed back to the OS (glibc's `malloc_trim`; a no-op
    elsewhere).

    glibc keeps freed heap blocks for reuse, and once a large block has been freed it serves blocks up
    to that size from the heap too, so after a calibration pass or a curvature refresh the resident set
    still counts that pass's activations and the replaced factors until trimmed. Called once after
    set-up and once after each refresh: cheap next to them (milliseconds), and what training allocates
    next comes from fresh pages."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl)
        pass


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def all_reduce_sum_(tensors: Iterable[Tensor]) -> None:
    """Sum each tensor in place across data-parallel ranks (no-op in a single process)."""
    if distributed():
        for tensor in tensors:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)


def all_reduce_count(count: int, device: torch.device) -> int:
    """Sum an integer across ranks."""
    if not distributed():
        return count
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return int(total.item())


def accumulation_dtype(modules: Iterable[nn.Module]) -> torch.dtype:
    """fp64 when the targets are fp64, else fp32 (whatever the activation dtype)."""
    return (
        torch.float64 if any(base_linear(m).weight.dtype == torch.float64 for m in modules) else torch.float32
    )


def module_device(module: nn.Module) -> torch.device:
    return base_linear(module).weight.device


def input_device(model: nn.Module) -> torch.device:
    """Where batches go: the input embeddings' device, else the first parameter's."""
    embeddings = input_embeddings(model)
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if isinstance(value, Tensor) else value for key, value in batch.items()}


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on `device`, seeded by (seed, data-parallel rank) so ranks draw independent samples."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + rank())
    return generator


def track(batches: Iterable[Any], description: str, enabled: bool) -> Iterator[Any]:
    """Iterate over calibration batches behind a rich progress bar (rank 0 only, stderr)."""
    if not enabled or rank() != 0:
        yield from batches
        return
    total = len(batches) if hasattr(batches, "__len__") else None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total)
        for batch in batches:
            yield batch
            progress.advance(task)


class PeakMemory:
    """Peak memory over a block: CUDA allocator peak when the model is on a GPU, else the process's peak RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.source = "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"

    @contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        yield self
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
            self.peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
