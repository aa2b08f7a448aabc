"""The LightningModule that fine-tunes a PEFT model, and the callback that measures the run.

Loss = the model's own loss (labels passed through, so PEFT adds AdaLoRA's regulariser) plus the
method's extra term (CTR-LoRA's trust region); besides the loss ratio, the ratio of the extra
term's gradient norm to the task gradient's on the parameters it reaches is logged every step.
AdamW on the method's parameter groups, linear warm-up over `warmup_ratio` of the steps, then
cosine decay to zero. Checkpoints hold only the
trainable weights, the optimizer and scheduler, the method's state and the RNG states — never the
frozen base weights.
"""

from __future__ import annotations

import math
import random
import resource
import statistics
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from peft import PeftModel
from torch import Tensor
from torch.distributed.tensor import DTensor
from transformers import get_cosine_schedule_with_warmup

from ctrlora.config import OptimConfig
from ctrlora.methods.base import Method


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the last good checkpoint is left as it was."""


class FinetuneModule(L.LightningModule):
    def __init__(self, model: PeftModel, method: Method, optim: OptimConfig, total_steps: int) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.optim = optim
        self.total_steps = total_steps
        self.strict_loading = False  # checkpoints carry the trainable weights only
        self.model.train()  # from_pretrained leaves the backbone in eval mode (dropout off)
        self.resumed_from_step = 0
        self.step_losses: list[Tensor] = []  # task losses of the optimizer step in progress, checked at it
        self.extra_grads: list[tuple[Tensor, Tensor]] = []  # (parameter, the extra term's gradient on it)

    def configure_model(self) -> None:
        """Under `trainer=fsdp` (a device mesh exists): shard with FSDP2 (ctrlora.fsdp); else nothing."""
        if self.device_mesh is None:
            return
        from ctrlora.fsdp import DATA_PARALLEL, check_fsdp_support, low_precision_dtype, shard_model

        check_fsdp_support(self.method)
        shard_model(self.model, self.device_mesh[DATA_PARALLEL], low_precision_dtype(self.trainer.precision))

    def nonfinite_counts(self, losses: list[Tensor], grads: list[Tensor]) -> tuple[int, int]:
        """(non-finite losses, gradients holding a non-finite entry), summed over ranks.

        One device sync per call (and under data parallelism one collective, so all ranks stop
        together). The gradients are screened by their total norm (a few fused kernels rather than
        several per tensor); since a finite gradient's norm can overflow, a non-finite norm is
        confirmed tensor by tensor — only then, so a healthy step never pays for it.
        """
        local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]  # FSDP: this rank's shard
        zero = torch.zeros((), device=self.device)
        loss_flags = ~torch.isfinite(torch.stack([loss.float() for loss in losses])) if losses else zero
        norm_flag = ~torch.isfinite(torch.nn.utils.get_total_norm(local)) if local else zero
        bad_losses, bad_norm = self._sum_over_ranks(torch.stack([loss_flags.sum(), norm_flag.sum()]))
        if not bad_norm:
            return bad_losses, 0
        tensor_flags = torch.stack([(~torch.isfinite(g)).any() for g in local])
        (bad_grads,) = self._sum_over_ranks(tensor_flags.sum().reshape(1))
        return bad_losses, bad_grads

    def _sum_over_ranks(self, counts: Tensor) -> list[int]:
        """A vector of counts summed over ranks, on the host (the device sync)."""
        counts = counts.float()
        if self.trainer.world_size > 1:
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        return [int(count) for count in counts.tolist()]

    def task_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """The model's loss. Under data parallelism a causal LM's token losses are summed and divided by
        the token count of the whole (all-rank) batch over the world size, so that DDP's gradient
        averaging gives exactly the global per-token mean that one process with the same batch gets.
        """
        if self.trainer.world_size == 1 or batch["labels"].dim() == 1:  # one process, or classification
            return self.model(**batch).loss
        tokens = (batch["labels"][:, 1:] != -100).sum()
        all_tokens = self.trainer.strategy.reduce(tokens.float(), reduce_op="sum")
        return self.model(**batch, num_items_in_batch=all_tokens / self.trainer.world_size).loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """Task loss + the method's extra term. The loss is checked for NaN/inf with the gradients in
        `on_before_optimizer_step`, before any weight changes: one device sync per step, not two."""
        task_loss = self.task_loss(batch)
        self.step_losses.append(task_loss.detach())
        self.log("train/loss", task_loss, prog_bar=True, sync_dist=True)
        self.log_learning_rates()
        extra = self.method.extra_loss(self.model, self.global_step)
        for name, value in self.method.step_metrics().items():
            self.log(f"method/{name}", value)
        if extra is None:
            return task_loss
        self.log("train/extra_loss", extra)
        self.log("train/extra_to_task", extra.detach() / task_loss.detach().clamp_min(1e-12))
        self.extra_grads = extra_gradients(extra, self.model)  # its share of the step, logged with the grads
        return task_loss + extra

    def log_learning_rates(self) -> None:
        """Each parameter group's lr for this step, under Lightning's LearningRateMonitor names
        (``lr-AdamW``, ``lr-AdamW/pg2``, …), in the step's one metrics row."""
        optimizer = self.optimizers(use_pl_optimizer=False)
        name = type(optimizer).__name__
        for index, group in enumerate(optimizer.param_groups):
            self.log(f"lr-{name}" + (f"/pg{index + 1}" if index else ""), group["lr"])

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.method.param_groups(self.model, self.optim.lr)
        optimizer = torch.optim.AdamW(
            groups, lr=self.optim.lr, betas=tuple(self.optim.betas), weight_decay=self.optim.weight_decay
        )
        warmup = math.ceil(self.optim.warmup_ratio * self.total_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """A non-finite loss (of any micro-batch of this step) or gradient stops the run before the step
        can write NaN/inf into the weights, naming the step."""
        losses, self.step_losses = self.step_losses, []
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad_losses, bad_grads = self.nonfinite_counts(losses, grads)
        if self.extra_grads:
            self.log("train/extra_to_task_grad", gradient_norm_ratio(self.extra_grads))
            self.extra_grads = []
        if bad_losses:
            values = ", ".join(str(float(loss)) for loss in losses)
            raise NonFiniteLossError(
                f"non-finite loss ({values} on rank {self.global_rank}) at step {self.global_step};"
                " the last good checkpoint in run_dir/checkpoints is intact — lower optim.lr or check the data"
            )
        if bad_grads:
            raise NonFiniteLossError(
                f"non-finite gradient at step {self.global_step}; the weights were not updated and the last"
                " good checkpoint in run_dir/checkpoints is intact — lower optim.lr or check the data"
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the trainable entries of the strategy's state dict (under FSDP: already gathered, full)."""
        trainable = {f"model.{name}" for name, p in self.model.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items() if key in trainable}
        checkpoint["method_state"] = self.method.state_dict()
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.resumed_from_step = checkpoint["global_step"]
        self.method.load_state_dict(checkpoint.get("method_state", {}))
        set_rng_states(checkpoint["rng_states"])


def extra_gradients(extra: Tensor, model: torch.nn.Module) -> list[tuple[Tensor, Tensor]]:
    """``(p, ∂extra/∂p)`` for the trainable parameters the extra term reaches (the adapters).

    Autograd runs through the extra term's own graph only (for the trust region: r×r Gram products),
    not through the model; the graph is kept for the step's backward.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(extra, params, retain_graph=True, allow_unused=True)
    return [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]


def gradient_norm_ratio(extra_grads: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``‖∇extra‖ / ‖∇task‖`` on the parameters the extra term reaches, at the optimizer step.

    The accumulated ``p.grad`` is ``∇task + ∇extra`` (the extra term is the same in every micro-batch
    of a step, so accumulation's averaging keeps it once); a loss ratio can look small while the
    penalty's gradient dominates the step, which this ratio shows. A tensor: logging needs no sync.
    """
    extra = [g for _, g in extra_grads]
    task = torch._foreach_sub([p.grad for p, _ in extra_grads], extra)  # one fused call, not one per tensor
    norms = [torch.nn.utils.get_total_norm(tensors) for tensors in (extra, task)]
    extra_norm, task_norm = (n.full_tensor() if isinstance(n, DTensor) else n for n in norms)
    return extra_norm / task_norm.clamp_min(1e-30)


def rng_states() -> dict[str, Any]:
    """RNG states in types that `torch.load(weights_only=True)` accepts (numpy's array as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    states = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RunStats(L.Callback):
    """Per optimizer step: wall time, tokens and loss; at the end, peak memory.

    Step time is the sum of its micro-batches' times (data loading excluded). Tokens are the
    non-padding tokens of every rank's micro-batches, summed across ranks once per optimizer step
    (so ``tokens_per_s`` is the global throughput). Peak memory is CUDA's max allocated on GPU, the
    process's peak RSS on CPU.
    """

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.losses: list[float] = []
        self.tokens = 0
        self._step_tokens = 0  # this rank's tokens of the optimizer step in progress
        self._elapsed = 0.0
        self._start = 0.0
        self._seen_step = 0
        self.process_start = time.perf_counter()
        self.earlier_wall_s = 0.0  # the wall time of the processes before a resume, up to their last checkpoint
        self.head_warmup: dict[str, Any] | None = None  # set when the run warmed its head up before calibration
        self.base_eval: dict[str, Any] | None = None  # a classifier's test metrics before adaptation (its base row)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step  # non-zero when resumed

    def wall_s(self) -> float:
        """Wall time of the run so far: this process's, plus its predecessors' up to their last checkpoint."""
        return self.earlier_wall_s + time.perf_counter() - self.process_start

    def state_dict(self) -> dict[str, Any]:
        """Saved in checkpoints, so a resumed run's results cover every step, not just the resumed ones."""
        return {"step_times": list(self.step_times), "losses": list(self.losses), "tokens": self.tokens,
                "wall_s": self.wall_s()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step_times = list(state_dict["step_times"])
        self.losses = list(state_dict["losses"])
        self.tokens = int(state_dict["tokens"])
        self.earlier_wall_s = float(state_dict.get("wall_s", 0.0))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, *_: Any) -> None:
        self._start = time.perf_counter()
        self._step_tokens += int(batch["attention_mask"].sum())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *_: Any) -> None:
        self._elapsed += time.perf_counter() - self._start
        if trainer.global_step != self._seen_step:  # an optimizer step was taken
            self._seen_step = trainer.global_step
            self.step_times.append(self._elapsed)
            self._elapsed = 0.0
            step_tokens = self._step_tokens
            if trainer.world_size > 1:  # every rank's tokens of this step
                local = torch.tensor(step_tokens, device=pl_module.device)
                step_tokens = int(trainer.strategy.reduce(local, reduce_op="sum"))
            self.tokens += step_tokens
            self._step_tokens = 0
            loss = trainer.callback_metrics.get("train/loss")
            if loss is not None:
                self.losses.append(float(loss))

    def summary(self) -> dict[str, Any]:
        """The `train` timing section of results.json (first step excluded as warm-up)."""
        times = self.step_times[1:] or self.step_times
        total = sum(self.step_times)
        return {
            "tokens": self.tokens,
            "tokens_per_s": self.tokens / total if total else None,
            "step_time_s": {
                "median": statistics.median(times) if times else None,
                "p90": float(np.percentile(times, 90)) if times else None,
            },
            "peak_memory_bytes": peak_memory_bytes(),
            "final_loss": self.losses[-1] if self.losses else None,
            "head_warmup": self.head_warmup,
        }


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
