"""The `Method` protocol, the method registry and the budget arithmetic of docs/METHODS.md §1.

A method turns the run's budget into ranks, wraps the frozen backbone in a PEFT model, and may add
a loss term, optimizer parameter groups, callbacks and resumable state. Methods register
themselves by name with ``@register_method("name")``; `build_method` looks the name up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from peft import PeftModel
from torch import Tensor, nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from ctrlora.config import BudgetConfig, MethodConfig, ModelConfig, TrainConfig
from ctrlora.curvature.config import CurvatureConfig
from ctrlora.errors import ConfigError
from ctrlora.peft_layout import is_target

ALLOCATION_FILE, HEATMAP_FILE = "allocation.json", "rank_heatmap.png"  # the run dir's allocation record


class Method(Protocol):
    """What the training loop needs from a PEFT method (docs/DESIGN.md §5)."""

    name: str
    needs_calibration: bool
    shards_calibration: bool  # under data parallelism each rank calibrates on its shard (summed estimates)

    def prepare(self, model: PreTrainedModel, calibration: DataLoader | None) -> PeftModel: ...

    def extra_loss(self, model: PeftModel, step: int) -> Tensor | None: ...

    def param_groups(self, model: PeftModel, lr: float) -> list[dict]: ...

    def callbacks(self) -> list[L.Callback]: ...

    def save_adapter(self, model: PeftModel, out_dir: Path) -> None: ...

    def step_metrics(self) -> dict[str, float | Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def describe(self) -> dict[str, Any]: ...

    def allocation_record(self) -> dict[str, Any] | None: ...

    def allocation_summary(self) -> dict[str, Any] | None: ...

    def curvature_summary(self) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class MethodContext:
    """What a method is built from: its own settings, the budget, the backbone's targets and task, the
    curvature settings, where it writes and how long it trains — not the whole `TrainConfig`.

    ``calibration_source`` is what identifies the calibration batches (the data and calibration
    settings): part of the key of a cached curvature estimate.
    """

    method: MethodConfig
    budget: BudgetConfig
    model: ModelConfig
    curvature: CurvatureConfig
    run_dir: Path
    total_steps: int
    weight_decay: float = 0.0  # LoRA+ builds its own optimizer groups
    progress_bar: bool = False
    calibration_source: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, cfg: TrainConfig, *, total_steps: int, run_dir: Path) -> MethodContext:
        return cls(
            method=cfg.method, budget=cfg.budget, model=cfg.model, curvature=cfg.curvature, run_dir=Path(run_dir),
            total_steps=total_steps, weight_decay=cfg.optim.weight_decay, progress_bar=cfg.trainer.progress_bar,
            calibration_source={"data": asdict(cfg.data), "calibration": asdict(cfg.calibration)},
        )


METHODS: dict[str, Callable[[MethodContext], Method]] = {}


def register_method(*names: str) -> Callable[[type], type]:
    """Class decorator: make the method constructible as ``method=<name>``."""

    def register(cls: type) -> type:
        for name in names:
            if name in METHODS:
                raise ValueError(f"method {name!r} registered twice")
            METHODS[name] = cls
        return cls

    return register


def build_method(cfg: TrainConfig, total_steps: int, run_dir: Path) -> Method:
    """Instantiate the method named by ``cfg.method.name`` on its `MethodContext`."""
    import_module("ctrlora.methods.builtin")  # registers the built-in methods

    name = cfg.method.name
    if name not in METHODS:
        raise ConfigError(f"method.name={name!r} is unknown; valid: {', '.join(sorted(METHODS))}")
    return METHODS[name](MethodContext.of(cfg, total_steps=total_steps, run_dir=run_dir))


@dataclass(frozen=True)
class Budget:
    """The budget of one run, resolved against the backbone (docs/METHODS.md §1).

    N = backbone parameters, C = Σ_{l∈T} (n_l + m_l) over the target linears, and the
    uniform-equivalent rank r̄ = floor(ρN / C) (or `budget.rank`); target_params = r̄·C is what a
    uniform LoRA spends, the yardstick every method is matched to.
    """

    backbone_params: int
    rank_cost: int
    rank: int
    ratio: float | None
    target_modules: tuple[str, ...]

    @property
    def target_params(self) -> int:
        return self.rank * self.rank_cost

    @property
    def allowed_params(self) -> int:
        """ρN for a ratio budget, r̄·C for a rank budget."""
        if self.ratio is None:
            return self.target_params
        return int(math.floor(self.ratio * self.backbone_params))


def parameter_count(model: nn.Module) -> int:
    """Σ p.numel() over the backbone, counting 4-bit packed weights at their logical size."""
    total = 0
    for param in model.parameters():
        quant_state = getattr(param, "quant_state", None)
        total += math.prod(quant_state.shape) if quant_state is not None else param.numel()
    return total


def target_linears(model: nn.Module, target_modules: list[str]) -> dict[str, tuple[int, int]]:
    """Fully qualified name -> (d_out, d_in) for every linear that PEFT's list matching selects (`is_target`)."""
    shapes: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if is_target(name, target_modules) and hasattr(module, "in_features"):
            shapes[name] = (module.out_features, module.in_features)
    if not shapes:
        raise ConfigError(
            f"model.target_modules={list(target_modules)} matches no linear layer of the backbone"
        )
    return shapes


def resolve_budget(budget: BudgetConfig, model: nn.Module, target_modules: list[str]) -> Budget:
    """Turn `budget.ratio` or `budget.rank` into the uniform-equivalent rank r̄.

    A ratio so small that even rank 1 would exceed ρN is an error (the spec's max(1, ·) would
    silently overspend the budget).
    """
    if (budget.ratio is None) == (budget.rank is None):
        raise ConfigError(
            f"set exactly one of budget.ratio and budget.rank (got ratio={budget.ratio}, rank={budget.rank});"
            " e.g. budget.ratio=0.001 budget.rank=null"
        )
    shapes = target_linears(model, target_modules)
    rank_cost = sum(d_out + d_in for d_out, d_in in shapes.values())
    backbone_params = parameter_count(model)
    if budget.rank is not None:
        if budget.rank < 1:
            raise ConfigError(f"budget.rank={budget.rank} must be ≥ 1")
        rank = budget.rank
    else:
        if not 0 < budget.ratio < 1:
            raise ConfigError(f"budget.ratio={budget.ratio} must be in (0, 1)")
        rank = int(math.floor(budget.ratio * backbone_params / rank_cost))
        if rank < 1:
            raise ConfigError(
                f"budget.ratio={budget.ratio} gives rank 0: ρN = {budget.ratio * backbone_params:.0f}"
                f" parameters < {rank_cost} per rank unit over {len(shapes)} target modules. Raise"
                f" budget.ratio to at least {rank_cost / backbone_params:.2g} or set budget.rank."
            )
    return Budget(backbone_params, rank_cost, rank, budget.ratio, tuple(sorted(shapes)))


def trainable_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class MethodBase:
    """Defaults of the protocol: no extra loss, one parameter group, no callbacks, no state, no records."""

    name: str = "base"
    needs_calibration: bool = False
    shards_calibration: bool = False

    def __init__(self, ctx: MethodContext) -> None:
        self.ctx = ctx
        self.total_steps = ctx.total_steps
        self.run_dir = ctx.run_dir
        self.name = ctx.method.name
        self.budget: Budget | None = None

    def extra_loss(self, model: PeftModel, step: int) -> Tensor | None:
        return None

    def param_groups(self, model: PeftModel, lr: float) -> list[dict]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def callbacks(self) -> list[L.Callback]:
        return []

    def save_adapter(self, model: PeftModel, out_dir: Path) -> None:
        model.save_pretrained(out_dir)

    def step_metrics(self) -> dict[str, float | Tensor]:
        """Scalars (numbers or 0-d tensors) to log every step under `method/` (e.g. CTR-LoRA's λ and penalty)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        """What results.json records about the budget."""
        assert self.budget is not None, "prepare() resolves the budget"
        return {
            "rank": self.budget.rank,
            "ratio": self.budget.ratio,
            "backbone_params": self.budget.backbone_params,
            "target_params": self.budget.target_params,
            "allowed_params": self.budget.allowed_params,
        }

    def allocation_record(self) -> dict[str, Any] | None:
        """allocation.json's content for methods that allocate ranks (`report.write_allocation` writes it)."""
        return None

    def allocation_summary(self) -> dict[str, Any] | None:
        """The `allocation` section of results.json (None: no section)."""
        return None

    def curvature_summary(self) -> dict[str, Any] | None:
        """The `train.curvature` section of results.json (None: no calibration estimate)."""
        return None


def to_float32_trainables(model: nn.Module) -> None:
    """Keep adapter weights at least fp32 whatever the backbone dtype (stable AdamW updates)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
