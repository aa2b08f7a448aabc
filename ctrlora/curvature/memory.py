"""Factor storage plan and memory report (docs/DESIGN.md §7), computable from configs alone.

Storage rule (docs/METHODS.md §3): a factor of size dim x dim is stored dense when
``dim ≤ dense_max_dim``, else as its top ``factor_rank`` eigenpairs plus one isotropic value,
``(dim·k + k + 1)`` numbers. With ``max_factor_gb`` set and the settings over the cap, the plan
picks the largest rank k that fits: wide factors keep being truncated and narrow ones dense when
that fits even at k = 1, else every factor wider than k is truncated at k. The cap also splits
estimation into groups of targets (one calibration pass each) whose dense fp32 accumulators fit
in it, so the statistics never hold more than the stored factors plus one group's accumulators.
GB here is 1e9 bytes.

`memory_report` builds the model on the meta device from a `transformers` config (no weights);
``python -m ctrlora.curvature.memory --hidden 4096 ...`` prints the same report.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    PretrainedConfig,
)

from ctrlora.backbones import architecture_config
from ctrlora.config import ModelConfig
from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.hooks import base_linear, find_targets
from ctrlora.errors import ConfigError
from ctrlora.task_types import CAUSAL_LM, SEQUENCE_CLASSIFICATION

GB = 1e9
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
DEFAULT_TARGET_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FactorPlan:
    """Storage of one dim x dim factor: 'dense', 'low_rank' (rank eigenpairs + isotropic) or 'diagonal'."""

    dim: int
    storage: str
    rank: int | None = None

    def numel(self) -> int:
        if self.storage == "dense":
            return self.dim * self.dim
        if self.storage == "diagonal":
            return self.dim
        return self.dim * self.rank + self.rank + 1

    def describe(self) -> str:
        return f"rank {self.rank}/{self.dim}" if self.storage == "low_rank" else f"{self.storage} {self.dim}"


@dataclass(frozen=True)
class ModulePlan:
    """What is stored for one target layer, and what its estimation holds in memory."""

    name: str
    d_in: int
    d_out: int
    a: FactorPlan | None
    g: FactorPlan | None
    extra_numel: int  # stored besides the factors: raw Hutchinson diagonal, dense gradient
    working_numel: int  # dense accumulators while this layer is being estimated

    def factor_numel(self) -> int:
        return sum(f.numel() for f in (self.a, self.g) if f is not None)

    def in_place_numel(self) -> int:
        """The part of the working accumulators that becomes the stored result in place (dense factors are
        their own sums divided by the count; so are the raw diagonal and G), never held twice."""
        return self.extra_numel + sum(f.numel() for f in (self.a, self.g) if f is not None and f.storage == "dense")


@dataclass
class StoragePlan:
    """Per-target storage and the estimation groups for one estimator configuration."""

    kind: str
    modules: list[ModulePlan]
    element_bytes: int
    factor_rank: int
    dense_max_dim: int
    max_factor_gb: float | None
    groups: list[list[str]] = field(default_factory=list)
    sketch: bool = False  # the gradient is sketched: its passes whiten with damped copies of the factors

    def module(self, name: str) -> ModulePlan:
        return next(plan for plan in self.modules if plan.name == name)

    def factor_bytes(self) -> int:
        """Bytes of all stored factors under this plan."""
        return self.element_bytes * sum(plan.factor_numel() for plan in self.modules)

    def dense_factor_bytes(self) -> int:
        """Bytes of all factors if every one were stored dense (diagonal ones stay diagonal)."""
        return self.element_bytes * sum(
            f.dim * f.dim if f.storage != "diagonal" else f.dim for p in self.modules for f in (p.a, p.g) if f
        )

    def extra_bytes(self) -> int:
        """Bytes stored besides the factors (raw Hutchinson diagonals, dense gradients)."""
        return self.element_bytes * sum(plan.extra_numel for plan in self.modules)

    def estimation_peak_bytes(self) -> int:
        """A bound on the statistics' peak during an estimate (weights and activations aside): every stored factor
        and extra, plus the dense accumulators of the largest layer group (one pass's working set) that do
        not become stored results in place (`ModulePlan.in_place_numel`), or, when the gradient is sketched
        and that is larger, what its passes whiten with: the Cholesky factor of each damped dense factor (a
        low-rank factor's damped form shares its eigenvectors). Targets that share an input (q/k/v,
        gate/up) share one S_a, which the plan counts per target: an upper bound."""
        working = {plan.name: plan.working_numel - plan.in_place_numel() for plan in self.modules}
        largest_group = self.element_bytes * max((sum(working[name] for name in group) for group in self.groups), default=0)
        whitening = self.element_bytes * sum(
            f.numel() for plan in self.modules for f in (plan.a, plan.g) if f is not None and f.storage == "dense"
        )
        return self.factor_bytes() + self.extra_bytes() + max(largest_group, whitening if self.sketch else 0)

    def metric_bytes(self, rank: int | None, element_bytes: int = 2) -> int:
        """CTR-LoRA's trust-region metric in training if every target were adapted (`ctr_trust.held_at_rank`): each
        factor as stored, or at most `rank` eigenpairs plus an isotropic term (``ctr.metric_rank``), in
        ``element_bytes`` (2: bf16 on a bf16 backbone). An upper bound: it counts per target the S_a that
        q/k/v and gate/up share in the metric (llama2-7b: 12.35 GB counted, about 9.1 GB held)."""

        def numel(factor: FactorPlan) -> int:
            width = factor.rank if factor.storage == "low_rank" else factor.dim
            if rank is None or factor.storage == "diagonal" or rank >= width:
                return factor.numel()
            return factor.dim * rank + rank + 1

        return element_bytes * sum(numel(f) for plan in self.modules for f in (plan.a, plan.g) if f is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "element_bytes": self.element_bytes,
            "factor_rank": self.factor_rank,
            "dense_max_dim": self.dense_max_dim,
            "max_factor_gb": self.max_factor_gb,
            "factor_gb": self.factor_bytes() / GB,
            "dense_factor_gb": self.dense_factor_bytes() / GB,
            "extra_gb": self.extra_bytes() / GB,
            "estimation_peak_gb": self.estimation_peak_bytes() / GB,
            "passes": len(self.groups),
            "modules": [
                {**asdict(plan), "a": plan.a and plan.a.describe(), "g": plan.g and plan.g.describe()}
                for plan in self.modules
            ],
        }

    def format(self, metric_rank: int | None = None) -> str:
        """A plain-text table: one line per target, then the totals (and, given ``ctr.metric_rank``, the
        trust-region metric at that rank)."""
        lines = [f"{'target':<48} {'d_in':>6} {'d_out':>6}  {'S_a':<16} {'S_g':<16} {'MB':>9}"]
        for plan in self.modules:
            a = plan.a.describe() if plan.a else "-"
            g = plan.g.describe() if plan.g else "-"
            megabytes = plan.factor_numel() * self.element_bytes / 1e6
            lines.append(f"{plan.name:<48} {plan.d_in:>6} {plan.d_out:>6}  {a:<16} {g:<16} {megabytes:>9.1f}")
        lines.append(
            f"factors: {self.factor_bytes() / GB:.2f} GB stored (dense: {self.dense_factor_bytes() / GB:.2f} GB), "
            f"factor_rank={self.factor_rank}, dense_max_dim={self.dense_max_dim}, cap={self.max_factor_gb} GB, "
            f"other stored: {self.extra_bytes() / GB:.2f} GB, passes: {len(self.groups)}\n"
            f"estimation peak (statistics, besides weights and activations): {self.estimation_peak_bytes() / GB:.2f} GB"
        )
        if metric_rank is not None:
            lines.append(
                f"CTR-LoRA's trust-region metric in training, every target adapted, bf16: "
                f"{self.metric_bytes(None) / GB:.2f} GB as estimated, {self.metric_bytes(metric_rank) / GB:.2f} GB "
                f"at ctr.metric_rank={metric_rank}"
            )
        return "\n".join(lines)


def _factor_plan(dim: int, dense_max_dim: int, rank: int) -> FactorPlan:
    if dim <= dense_max_dim or dim <= rank:
        return FactorPlan(dim, "dense")
    return FactorPlan(dim, "low_rank", rank)


def _module_plan(
    name: str, d_in: int, d_out: int, kind: str, dense_max_dim: int, rank: int, dense_grad: bool
) -> ModulePlan:
    grad = d_in * d_out if dense_grad else 0
    if kind == "hutchinson":
        a, g = FactorPlan(d_in, "diagonal"), FactorPlan(d_out, "diagonal")
        return ModulePlan(
            name, d_in, d_out, a, g, extra_numel=d_in * d_out + grad, working_numel=d_in * d_out + grad
        )
    a = _factor_plan(d_in, dense_max_dim, rank)
    if kind == "activation":
        return ModulePlan(name, d_in, d_out, a, None, extra_numel=0, working_numel=d_in * d_in)
    g = _factor_plan(d_out, dense_max_dim, rank)
    return ModulePlan(
        name, d_in, d_out, a, g, extra_numel=grad, working_numel=d_in * d_in + d_out * d_out + grad
    )


def _estimation_groups(modules: list[ModulePlan], cap_numel: float | None) -> list[list[str]]:
    """Consecutive targets whose working accumulators fit in the cap (a target over the cap goes alone)."""
    groups: list[list[str]] = [[]]
    used = 0
    for plan in modules:
        if cap_numel is not None and groups[-1] and used + plan.working_numel > cap_numel:
            groups.append([])
            used = 0
        groups[-1].append(plan.name)
        used += plan.working_numel
    return groups


def resolve_grad_mode(
    cfg: CurvatureConfig, shapes: Mapping[str, tuple[int, int]], element_bytes: int = 4
) -> CurvatureConfig:
    """``grad_mode: auto`` made concrete: ``dense`` while the dense gradients of all targets,
    ``Σ d_in·d_out`` elements, fit in ``dense_grad_max_gb``, else ``sketch`` (docs/METHODS.md §3: the
    sketch is for a G that does not fit). Any other mode is returned as it is."""
    if cfg.grad_mode != "auto":
        return cfg
    return replace(cfg, grad_mode="dense" if dense_grad_bytes(shapes, element_bytes) <= cfg.dense_grad_max_gb * GB else "sketch")


def dense_grad_bytes(shapes: Mapping[str, tuple[int, int]], element_bytes: int = 4) -> int:
    """Bytes of every target's dense gradient G, ``Σ d_in·d_out`` elements."""
    return element_bytes * sum(d_in * d_out for d_in, d_out in shapes.values())


def plan_storage(
    shapes: dict[str, tuple[int, int]],
    cfg: CurvatureConfig,
    *,
    element_bytes: int = 4,
    want_grad: bool = False,
) -> StoragePlan:
    """Storage plan for targets with (d_in, d_out) `shapes` under `cfg` (see the module docstring)."""
    sketch = want_grad and resolve_grad_mode(cfg, shapes, element_bytes).grad_mode == "sketch"
    dense_grad = want_grad and not sketch

    def build(dense_max_dim: int, rank: int) -> list[ModulePlan]:
        return [
            _module_plan(name, d_in, d_out, cfg.kind, dense_max_dim, rank, dense_grad)
            for name, (d_in, d_out) in shapes.items()
        ]

    def factor_numel(modules: list[ModulePlan]) -> int:
        return sum(plan.factor_numel() for plan in modules)

    dense_max_dim, rank = cfg.dense_max_dim, cfg.factor_rank
    cap_numel = None if cfg.max_factor_gb is None else cfg.max_factor_gb * GB / element_bytes
    modules = build(dense_max_dim, rank)
    if cap_numel is not None and cfg.kind != "hutchinson" and factor_numel(modules) > cap_numel:
        if factor_numel(build(dense_max_dim, 1)) > cap_numel:
            dense_max_dim = 0  # narrow factors cannot all stay dense: truncate everything wider than k
        widest = max(max(d_in, d_out) for d_in, d_out in shapes.values())
        low, high = 0, widest  # largest k in [1, widest] with factor memory under the cap (monotone in k)
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (
                (mid, high) if factor_numel(build(dense_max_dim, mid)) <= cap_numel else (low, mid - 1)
            )
        if low == 0:
            need = factor_numel(build(dense_max_dim, 1)) * element_bytes / GB
            raise ValueError(
                f"curvature.max_factor_gb={cfg.max_factor_gb} is too small: rank-1 factors need {need:.2f} GB"
            )
        rank = low
        modules = build(dense_max_dim, rank)
    return StoragePlan(
        kind=cfg.kind,
        modules=modules,
        element_bytes=element_bytes,
        factor_rank=rank,
        dense_max_dim=dense_max_dim,
        max_factor_gb=cfg.max_factor_gb,
        groups=_estimation_groups(modules, cap_numel),
        sketch=sketch,
    )


def target_shapes(model: torch.nn.Module, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each target linear layer."""
    named = dict(model.named_modules())
    return {
        name: (base_linear(named[name]).in_features, base_linear(named[name]).out_features)
        for name in targets
    }


def memory_report(
    config: PretrainedConfig | Mapping[str, Any],
    cfg: CurvatureConfig,
    *,
    target_suffixes: Sequence[str] = DEFAULT_TARGET_SUFFIXES,
    task: str = CAUSAL_LM,
    element_bytes: int = 4,
    want_grad: bool = False,
) -> StoragePlan:
    """The storage plan of a backbone described by `config`, built on the meta device (no weights).

    `config` is a `transformers` config or a mapping with ``model_type`` and config kwargs (a model
    config's ``arch`` section). ``element_bytes`` is 4 for fp32 factors, 8 for fp64.
    """
    if isinstance(config, Mapping):
        config = AutoConfig.for_model(**config)
    auto = {CAUSAL_LM: AutoModelForCausalLM, SEQUENCE_CLASSIFICATION: AutoModelForSequenceClassification}
    if task not in auto:
        raise ValueError(f"task={task!r} is not valid; choose one of {sorted(auto)}")
    with torch.device("meta"):
        model = auto[task].from_config(config)
    targets = find_targets(model, target_suffixes)
    if not targets:
        raise ValueError(f"no linear layers named {list(target_suffixes)} in {type(model).__name__}")
    return plan_storage(target_shapes(model, targets), cfg, element_bytes=element_bytes, want_grad=want_grad)


def model_config(name: str) -> ModelConfig:
    """conf/model/<name>.yaml as a `ModelConfig`; `ConfigError` naming the valid names when there is none."""
    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise ConfigError(f"--model {name!r}: no {path}; valid: {valid}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path)))


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: print the factor memory report of a decoder, named (``--model llama2-7b``: the `arch` of
    conf/model/<name>.yaml) or described by its shape."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a conf/model name, e.g. llama2-7b (its `arch`, or the tiny builder's shape)")
    parser.add_argument("--model-type", default="llama")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--kind", default="kfac")
    parser.add_argument("--want-grad", action="store_true", help="the gradient too (CTR-LoRA, CG-LoRA)")
    parser.add_argument("--grad-mode", default=CurvatureConfig.grad_mode)
    parser.add_argument("--dense-max-dim", type=int, default=CurvatureConfig.dense_max_dim)
    parser.add_argument("--factor-rank", type=int, default=CurvatureConfig.factor_rank)
    parser.add_argument("--max-factor-gb", type=float, default=None)
    parser.add_argument("--metric-rank", type=int, default=None, help="also CTR-LoRA's metric at ctr.metric_rank=K")
    args = parser.parse_args(argv)
    task, suffixes = CAUSAL_LM, DEFAULT_TARGET_SUFFIXES
    if args.model is not None:
        try:
            model = model_config(args.model)
            config: Any = architecture_config(model)
        except ConfigError as error:
            parser.error(str(error))
        task, suffixes = model.task, tuple(model.target_modules)
    elif None in (args.hidden, args.intermediate, args.layers, args.heads):
        parser.error("give --model NAME, or --hidden, --intermediate, --layers and --heads")
    else:
        config = AutoConfig.for_model(
            args.model_type, hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads or args.heads, vocab_size=args.vocab,
        )
    cfg = CurvatureConfig(
        kind=args.kind, grad_mode=args.grad_mode, dense_max_dim=args.dense_max_dim, factor_rank=args.factor_rank,
        max_factor_gb=args.max_factor_gb,
    )
    plan = memory_report(config, cfg, target_suffixes=suffixes, task=task, want_grad=args.want_grad)
    print(plan.format(args.metric_rank))


if __name__ == "__main__":
    main()
