"""What a run prints: each log line once, no library noise a user cannot act on, its phases with
their timings, and progress by optimizer step — a rich bar on a terminal, one line every 5% of the
steps in a log file."""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger(__name__)

QUIET_WARNINGS = (  # (message regex, category): library warnings about library internals
    (r"Experiment logs directory .* exists and is not empty", UserWarning),  # ctrlora keeps metrics.csv across resumes
    (r".*isinstance\(treespec, LeafSpec\)", Warning),  # Lightning's own use of a torch API
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),  # PEFT's call into transformers
)
QUIET_RECORDS = {  # logger -> message prefixes dropped
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip",),  # an advertisement
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),  # optional `kernels` package
}
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")
LOAD_REPORT_LOGGERS = ("transformers.modeling_utils", "transformers.utils.loading_report")
FRESH_HEADS = ("classifier", "score")  # a classifier's head: new by design, trained by the run


class FreshHeadReport(logging.Filter):
    """Drops transformers' load report when all it reports is a fresh classifier head (keys MISSING
    from an encoder checkpoint, which the run trains); any other report passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "LOAD REPORT" not in message:
            return True
        rows = re.findall(r"^(\S+)\s*\|\s*([A-Z]+)\s*\|", message, flags=re.MULTILINE)
        fresh_head = rows and all(status == "MISSING" and key.split(".")[0] in FRESH_HEADS for key, status in rows)
        return not fresh_head


class DropPrefixes(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_libraries() -> None:
    """Call once logging is configured (under Hydra: inside the task function), before the libraries
    load. Drops the warnings and records above; Lightning, imported before Hydra set up logging,
    gave its loggers their own stderr handlers, so each of its lines printed twice: records now
    only propagate to the configured handlers; off a terminal, transformers' loading bars go."""
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in QUIET_RECORDS.items():
        logging.getLogger(name).addFilter(DropPrefixes(prefixes))
    for name in LOAD_REPORT_LOGGERS:
        logging.getLogger(name).addFilter(FreshHeadReport())
    if logging.getLogger().handlers:
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
    if not sys.stderr.isatty():
        import transformers

        transformers.utils.logging.disable_progress_bar()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Log that a phase of the run starts, then how long it took."""
    log.info("%s ...", name)
    start = time.perf_counter()
    yield
    log.info("%s: done in %.1f s", name, time.perf_counter() - start)


class StepProgress(ProgressBar):
    """Optimizer steps done / ``max_steps`` (counting from a resumed run's step), the training loss and
    the time left. A rich bar when stderr is a terminal; otherwise one log line every `every` steps
    (default: 5% of the run)."""

    def __init__(self, every: int | None = None) -> None:
        super().__init__()
        self.every, self.enabled = every, True
        self.terminal = sys.stderr.isatty()
        self.bar: Progress | None = None
        self.task: Any = None
        self.last_step, self.start_step, self.start_time = -1, 0, 0.0

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not (self.enabled and trainer.is_global_zero):
            return
        self.start_step, self.start_time = trainer.global_step, time.perf_counter()
        self.every = self.every or max(1, trainer.max_steps // 20)
        if self.terminal:
            self.bar = Progress(
                TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                TimeElapsedColumn(), TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=trainer.max_steps, completed=trainer.global_step, loss="")
            self.bar.start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if not (self.enabled and trainer.is_global_zero) or step == self.last_step:
            return
        self.last_step = step
        loss = trainer.callback_metrics.get("train/loss")
        loss_text = f"loss {float(loss):.4f}" if loss is not None else ""
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss_text)
        elif step % self.every == 0 or step == trainer.max_steps:
            per_step = (time.perf_counter() - self.start_time) / max(1, step - self.start_step)
            left = per_step * (trainer.max_steps - step)
            log.info("step %d/%d  %s  %.2f s/step  %.0f s left", step, trainer.max_steps, loss_text, per_step, left)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
