"""What the bench measures with: loop-iteration clocks, a peak-memory probe and a FLOP counter.

A step's time is that of one whole training-loop iteration: from the start of the step's first
batch to the start of the next step's, so data loading, logging, callbacks and the optimizer are
all in it, in the Lightning loop and in the bare loop alike. On a GPU the clock synchronises before
reading the time, so queued kernels count towards the step that launched them.
"""

from __future__ import annotations

import gc
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ctrlora.curvature.runtime import return_freed_host_memory


class IterationClock:
    """Start times of optimizer steps, wall clock and this thread's CPU time; a step's time is the
    difference between its start and the next step's.

    CPU time counts only this process's main thread, where all the work runs with one torch thread
    on the CPU: unlike wall time it does not grow when other processes compete for the cores, so its
    ratios hold on a shared machine. (With several torch threads or on a GPU it undercounts; the
    wall time is the measure there.)
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: dict[int, tuple[float, float]] = {}

    def mark(self, step: int) -> None:
        """Optimizer step `step` (0-based) begins now (a later mark of the same step, i.e. its next
        micro-batch, is ignored)."""
        if step in self.starts:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.starts[step] = (time.perf_counter(), time.thread_time())

    def step_times(self, clock: int) -> dict[int, float]:
        """``{step (1-based, as global_step after it): seconds}`` of wall time (`clock` 0) or CPU time
        (`clock` 1), for every step whose successor began."""
        starts = self.starts
        return {
            step + 1: starts[step + 1][clock] - starts[step][clock] for step in starts if step + 1 in starts
        }

    def summary(self, warmup: int, steps: int) -> dict[str, Any]:
        """Median, p10 and p90 of the wall time over steps ``warmup + 1 … warmup + steps``, and the
        median and smallest CPU time (None on a GPU): interference from other processes only ever adds
        time, so on a busy machine the fastest step's CPU time is the closest to the work itself."""
        window = range(warmup + 1, warmup + steps + 1)
        wall, cpu = self.step_times(0), self.step_times(1)
        missing = [step for step in window if step not in wall]
        if missing:
            raise ValueError(f"steps {missing} were not timed (timed: {sorted(wall)})")
        times = [wall[step] for step in window]
        cpu_times = None if self.device.type == "cuda" else [cpu[step] for step in window]
        return {
            "median_s": statistics.median(times),
            "p10_s": float(np.percentile(times, 10)),
            "p90_s": float(np.percentile(times, 90)),
            "times_s": times,
            "cpu_median_s": cpu_times and statistics.median(cpu_times),
            "cpu_min_s": cpu_times and min(cpu_times),
            "cpu_times_s": cpu_times,
        }


class StepClock(L.Callback):
    """An `IterationClock` driven by the Lightning loop (a mark at each batch start)."""

    def __init__(self, device: torch.device) -> None:
        self.clock = IterationClock(device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        self.clock.mark(trainer.global_step)


def resident_bytes() -> int:
    """The process's anonymous resident memory: resident minus shared pages (/proc/self/statm on Linux;
    ``ru_maxrss`` elsewhere).

    Shared pages are mostly file-backed: a checkpoint that the loader maps (safetensors) lives in the
    page cache and enters the resident set only when something first reads it, so plain RSS charges
    the backbone's weights to whichever phase touches them first (a calibration pass in set-up, the
    first training step otherwise), not to the process at rest. Anonymous memory is what the run allocates.
    """
    try:
        with open("/proc/self/statm") as statm:
            fields = statm.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the monotonic peak is the best available
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class MemoryProbe:
    """Peak memory above a baseline, phase by phase.

    GPU: CUDA's max allocated bytes. CPU: the anonymous resident memory (`resident_bytes`), sampled
    every `interval_s` by a background thread (``ru_maxrss`` only ever grows over the process's life, so it cannot say what
    one method of several used). Use as a context manager; `start` takes the baseline, `peak` returns
    the highest usage above it since the last `start`/`peak` and begins the next phase.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.005) -> None:
        self.device = device
        self.interval_s = interval_s
        self.source = "cuda_max_allocated" if device.type == "cuda" else "anonymous_rss_sampled"
        self._baseline = self._highest = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _current(self) -> int:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else resident_bytes()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._highest = max(self._highest, resident_bytes())

    def __enter__(self) -> MemoryProbe:
        if self.device.type != "cuda":
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="bench-memory-probe", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def _reset_phase(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._highest = self._current()

    def start(self) -> None:
        """Take the current usage as the baseline and begin the first phase."""
        self._baseline = self._current()
        self._reset_phase()

    def peak(self) -> int:
        """Bytes above the baseline at the peak of the phase just ended; the next phase begins."""
        if self.device.type == "cuda":
            highest = torch.cuda.max_memory_allocated(self.device)
        else:
            highest = max(self._highest, resident_bytes())
        self._reset_phase()
        return max(0, highest - self._baseline)


def release_memory() -> None:
    """Free what earlier runs left behind, so the next baseline is the process at rest: garbage
    collection, the CUDA cache, and glibc's free lists (`return_freed_host_memory`)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return_freed_host_memory()


def counted_flops(work: Callable[[], Any]) -> int:
    """Floating-point operations of the matrix products (matmul, linear, bmm, attention, convolution)
    that `work()` dispatches, its backward passes and double backward included
    (`torch.utils.flop_counter`); elementwise work is not counted. Unlike a time, the count does not
    depend on the machine's load: the bench sets time ratios beside it to show how far a pass is
    from its arithmetic."""
    counter = FlopCounterMode(display=False)
    with counter:
        work()
    return counter.get_total_flops()
