"""Hooks on target layers for calibration passes: inputs x_t, output gradients g_t, token masks.

Target layers are `nn.Linear` modules named as in `model.named_modules()`. A PEFT LoRA wrapper
(a module with a `base_layer`) is hooked at the wrapper: its input is the base layer's x and the
gradient at its output is the same ∂ℓ/∂y, so estimates at adapted weights work unchanged.

Double counting under activation checkpointing is ruled out by construction: input statistics
are taken only inside the forward call the estimator issues (`TargetRecorder.forward`); a
forward hook firing inside the backward call is a checkpoint recomputation and only re-attaches
the output-gradient hook. Output-gradient hooks sit on output tensors, and autograd runs them
once per backward whether the graph was recorded in the first forward (non-reentrant
checkpointing, no checkpointing) or in the recomputation (reentrant checkpointing).
"""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ctrlora.peft_layout import is_target

InputCallback = Callable[[str, Tensor], None]  # (target, x rows of counted tokens)
OutputGradCallback = Callable[[str, Tensor, Tensor | None, str], None]  # (target, g, x or None, job)


def base_linear(module: nn.Module) -> nn.Linear:
    """The `nn.Linear` a target stands for: the module itself or a PEFT wrapper's `base_layer`."""
    base = getattr(module, "base_layer", module)
    if not isinstance(base, nn.Linear):
        raise TypeError(
            f"curvature targets must be nn.Linear (or a PEFT wrapper of one), got {type(base).__name__}"
        )
    return base


def resolve_targets(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """Map fully-qualified target names to modules, failing with close matches for unknown names."""
    if not targets:
        raise ValueError("no curvature targets given")
    named = dict(model.named_modules())
    resolved = {}
    for name in targets:
        if name not in named:
            close = difflib.get_close_matches(name, list(named), n=3)
            raise KeyError(
                f"unknown curvature target {name!r}: targets are fully-qualified module names from "
                f"model.named_modules(); close matches: {close}"
            )
        module = named[name]
        try:
            base_linear(module)
        except TypeError as error:
            raise TypeError(f"target {name!r}: {error}") from None
        resolved[name] = module
    return resolved


def find_targets(model: nn.Module, suffixes: Sequence[str]) -> list[str]:
    """Names of the linear layers (or PEFT wrappers) that PEFT's list matching selects (`is_target`)."""
    found = []
    for name, module in model.named_modules():
        if is_target(name, suffixes) and isinstance(
            getattr(module, "base_layer", module), nn.Linear
        ):
            found.append(name)
    return found


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embedding module, if it has one."""
    try:
        return model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    except NotImplementedError:
        return None


def _require_grad(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_(True)


@contextmanager
def calibration_mode(model: nn.Module, *, keep_checkpointing: bool, input_grads: bool) -> Iterator[None]:
    """Deterministic calibration passes that leave no trace on the model.

    Every module goes to eval mode (dropout off) and every parameter to ``requires_grad=False``
    (so the passes accumulate no ``.grad``, e.g. into LoRA weights mid-training). With
    ``keep_checkpointing`` the blocks that have activation checkpointing enabled are themselves
    put in train mode (their children stay in eval), so checkpointing still saves memory. With
    ``input_grads`` the input embeddings' output requires grad, so gradients reach every layer
    of a frozen model (HF's `enable_input_require_grads`). Layers with 4-bit weights stay in train
    mode (they have no dropout): bitsandbytes repacks 4-bit weights into an inference-only layout on
    an eval-mode CPU forward without input grads, which later training cannot use. All flags are
    restored on exit.
    """
    training = {module: module.training for module in model.modules()}
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    handle = None
    try:
        model.eval()
        for module in model.modules():
            checkpointed = isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing
            quantized = getattr(getattr(module, "weight", None), "quant_state", None) is not None
            if (keep_checkpointing and checkpointed) or quantized:
                module.training = True
        for param in requires_grad:
            param.requires_grad_(False)
        embeddings = input_embeddings(model)
        if input_grads and embeddings is not None:
            handle = embeddings.register_forward_hook(_require_grad)
        yield
    finally:
        if handle is not None:
            handle.remove()
        for module, mode in training.items():
            module.training = mode
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


class TargetRecorder:
    """Forward and output-gradient hooks on the target modules for one calibration pass.

    Use as a context manager (registers/removes the hooks); wrap each model call in
    ``forward(mask)`` and each backward in ``backward(job)``. Callbacks:

    - ``on_input(name, x_rows)``: rows of the layer input at counted tokens (``mask``), once per
      batch. When several targets receive the very same input tensor (q/k/v, gate/up), only the
      first is reported; `input_alias` maps the others to it.
    - ``on_output_grad(name, g, x, job)``: the full output gradient ∂ℓ/∂y (all positions) with the
      matching input (when ``stash_inputs``), for the backward tagged ``job``.
    """

    def __init__(
        self,
        modules: dict[str, nn.Module],
        *,
        on_input: InputCallback | None = None,
        on_output_grad: OutputGradCallback | None = None,
        stash_inputs: bool = False,
    ) -> None:
        self.modules = modules
        self.on_input = on_input
        self.on_output_grad = on_output_grad
        self.stash_inputs = stash_inputs
        self.input_alias: dict[str, str | None] = {}
        self.mask: Tensor | None = None
        self._every_position = False
        self._phase = "idle"
        self._job = ""
        self._seen_inputs: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> TargetRecorder:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(partial(self._forward_hook, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextmanager
    def forward(self, mask: Tensor) -> Iterator[None]:
        """The model call of one batch; ``mask`` (bool) marks counted tokens, shaped like x without its last dim."""
        self.mask, self._phase, self._seen_inputs = mask.bool(), "forward", {}
        self._every_position = bool(self.mask.all())  # e.g. packed batches: rows need no gather (a copy)
        try:
            yield
        finally:
            self._phase, self._seen_inputs = "idle", {}

    @contextmanager
    def backward(self, job: str) -> Iterator[None]:
        """A backward pass; output-gradient callbacks receive ``job``."""
        self._phase, self._job = "backward", job
        try:
            yield
        finally:
            self._phase = "idle"

    def token_rows(self, name: str, tensor: Tensor) -> Tensor:
        """Rows of ``tensor`` (shape mask.shape + (d,)) at counted tokens, as a (tokens, d) matrix."""
        assert self.mask is not None
        if tensor.shape[:-1] != self.mask.shape:
            raise ValueError(
                f"target {name!r} sees tensors of shape {tuple(tensor.shape)} but the token mask has shape "
                f"{tuple(self.mask.shape)}; only layers applied per token can be curvature targets"
            )
        rows = tensor.reshape(-1, tensor.shape[-1])
        return rows if self._every_position else rows[self.mask.reshape(-1).to(tensor.device)]

    def _shared_input_owner(self, name: str, x: Tensor) -> str | None:
        """The earlier target of this forward that received the same tensor object, if any."""
        seen = self._seen_inputs.get(id(x))
        owner = seen[1] if seen is not None and seen[0]() is x else None
        if owner is None:
            self._seen_inputs[id(x)] = (weakref.ref(x), name)
        if name not in self.input_alias:
            self.input_alias[name] = owner
        elif self.input_alias[name] != owner:
            raise RuntimeError(
                f"target {name!r} shared its input with {self.input_alias[name]!r} in an earlier batch but "
                f"with {owner!r} now; input sharing must not change between batches"
            )
        return owner

    def _forward_hook(self, name: str, _module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if not args or not isinstance(args[0], Tensor):
            raise TypeError(
                f"target {name!r} must be called with its input tensor as the first positional argument"
            )
        x = args[0]
        if self._phase == "forward" and self.on_input is not None:
            if self._shared_input_owner(name, x) is None:
                self.on_input(name, self.token_rows(name, x.detach()))
        if self.on_output_grad is not None and isinstance(output, Tensor) and output.requires_grad:
            stash = x.detach() if self.stash_inputs else None
            output.register_hook(partial(self._grad_hook, name, stash))

    def _grad_hook(self, name: str, x: Tensor | None, grad: Tensor) -> None:
        if self._phase == "backward":
            self.on_output_grad(name, grad, x, self._job)
