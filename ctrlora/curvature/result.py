"""What an estimate returns: per-target curvature plus a small report (docs/DESIGN.md §5)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from ctrlora.curvature.factors import Factor, factor_from_state_dict
from ctrlora.curvature.sketch import WhitenedGradientSketch


@dataclass(eq=False)
class ModuleCurvature:
    """Curvature of one target ``y = W x`` (W: d_out x d_in), raw (undamped, unnormalised).

    - ``a``: ``S_a = (1/P) Σ_p x_p x_pᵀ`` over the P statistics positions (activation, kfac) or the
      Hutchinson fit's column factor.
    - ``g``: ``S_g = (1/T) Σ_p g_p g_pᵀ`` (kfac) or the Hutchinson fit's row factor.
    - ``diag``: the Hutchinson estimate of diag(H) (d_out x d_in, unclamped) for the mean token loss.
    - ``grad``: the dense gradient ``G`` of the mean token loss (d_out x d_in).
    - ``grad_sketch``: a randomized sketch of the whitened gradient ``R_g⁻¹ G R_a⁻ᵀ`` (`spectra`).
    - ``tokens``: T, the counted calibration tokens (all ranks).
    """

    a: Factor | None = None
    g: Factor | None = None
    diag: Tensor | None = None
    grad: Tensor | None = None
    grad_sketch: WhitenedGradientSketch | None = None
    tokens: int = 0

    @property
    def hessian_trace(self) -> float | None:
        """``tr H = Σ diag(H)`` (Hutchinson), or None without a diagonal."""
        return None if self.diag is None else float(self.diag.sum())

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> ModuleCurvature:
        def move(value: Any) -> Any:
            return value if value is None or isinstance(value, int) else value.to(device=device, dtype=dtype)

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers (loads with ``torch.load(weights_only=True)``)."""
        return {
            "a": self.a and self.a.state_dict(),
            "g": self.g and self.g.state_dict(),
            "diag": self.diag,
            "grad": self.grad,
            "grad_sketch": self.grad_sketch and self.grad_sketch.state_dict(),
            "tokens": self.tokens,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ModuleCurvature:
        return cls(
            a=state["a"] and factor_from_state_dict(state["a"]),
            g=state["g"] and factor_from_state_dict(state["g"]),
            diag=state["diag"],
            grad=state["grad"],
            grad_sketch=state["grad_sketch"] and WhitenedGradientSketch.from_state_dict(state["grad_sketch"]),
            tokens=state["tokens"],
        )


@dataclass
class CurvatureReport:
    """How an estimate was made; `to_dict` is what goes into results.json."""

    kind: str
    estimate_s: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_source: str = ""
    tokens: int = 0
    passes: int = 0
    cached: bool = False
    settings: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(eq=False)
class CurvatureResult(Mapping[str, ModuleCurvature]):
    """Target name -> `ModuleCurvature`, plus the `CurvatureReport`.

    Targets that received the same input (q/k/v, gate/up) share one ``a`` Factor object.
    """

    modules: dict[str, ModuleCurvature]
    report: CurvatureReport

    def __getitem__(self, name: str) -> ModuleCurvature:
        return self.modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def state_dict(self) -> dict[str, Any]:
        """For checkpoints and the on-disk cache; a shared ``a`` is saved once and shared again on load."""
        owners: dict[int, str] = {}
        modules = {}
        for name, curvature in self.modules.items():
            state = curvature.state_dict()
            if curvature.a is not None:
                owner = owners.setdefault(id(curvature.a), name)
                if owner != name:
                    state["a"] = {"shared_with": owner}
            modules[name] = state
        return {"modules": modules, "report": self.report.to_dict()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CurvatureResult:
        modules: dict[str, ModuleCurvature] = {}
        for name, module_state in state["modules"].items():
            shared = module_state["a"] and module_state["a"].get("shared_with")
            if shared:
                module_state = {**module_state, "a": None}
            modules[name] = ModuleCurvature.from_state_dict(module_state)
            if shared:
                modules[name].a = modules[shared].a
        return cls(modules, CurvatureReport(**state["report"]))
