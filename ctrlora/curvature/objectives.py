"""What a calibration batch means: model outputs, counted tokens, the summed loss, sampled labels.

Token accounting (docs/METHODS.md §3), for a batch of ``B`` sequences of length ``L``. Two masks:
``token_mask`` marks the supervised (counted) tokens whose losses are summed — T of them;
``position_mask`` marks the positions whose layer inputs x_t and output gradients g_t enter the
Kronecker factors — P of them. They differ only for causal LMs with masked prompts:

- causal LM (``labels`` of shape (B, L), -100 = ignore): HF shifts labels inside the model, so
  the logits at position t predict ``labels[t+1]``. Position t is a counted token iff
  ``labels[t+1] != -100`` and ``attention_mask[t] == 1``; the last position never counts. The
  loss is the SUM over counted tokens of the token's cross-entropy. Every non-padding position
  is a statistics position: a prompt position's output feeds later tokens through attention, so
  it carries output gradient and an adapter acts on its input.
- sequence classification (``labels`` of shape (B,)): every non-padding position is a counted
  token (for S_a and the token count T); the loss is the SUM over sequences of the per-sequence
  cross-entropy, whose output gradients at the counted positions enter S_g.
- squared error (``inputs`` (..., d_in), ``targets`` (..., d_out)): every row counts; the loss
  is ``½ Σ ‖f(x) − y‖²``, whose Fisher is the Gauss–Newton matrix JᵀJ.

Summing (not averaging) makes each token's output gradient g_t independent of the batch size.
The training loss averages over ``loss_terms`` instead — supervised tokens of a causal LM,
sequences of a classifier, rows of squared error — so a quadratic model of the mean token loss
``L/T`` is one of the training loss after multiplying by ``T / N`` (`tokens_per_loss_term`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ctrlora.curvature.hooks import calibration_mode
from ctrlora.curvature.runtime import all_reduce_count, batch_to_device, input_device

IGNORE_INDEX = -100


def _accumulation_precision(t: Tensor) -> Tensor:
    """``t`` in fp32 unless it already is fp32/fp64 (the loss is always computed at least in fp32)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _logits(output: Any) -> Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


class Objective(ABC):
    """How a batch becomes model outputs, a token mask and a summed loss."""

    @abstractmethod
    def token_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """Bool mask of counted (supervised) tokens, shaped like a target layer's input without its last dim."""

    def position_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """Bool mask of the positions whose x_t and g_t enter S_a and S_g (default: the counted tokens)."""
        return self.token_mask(batch)

    def loss_terms(self, batch: dict[str, Tensor]) -> int:
        """N: how many terms the training loss of `batch` averages (default: the counted tokens)."""
        return int(self.token_mask(batch).sum())

    @abstractmethod
    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """The model's outputs (logits or predictions), attached to the autograd graph when grad is on."""

    @abstractmethod
    def loss(self, outputs: Tensor, batch: dict[str, Tensor], targets: Tensor | None = None) -> Tensor:
        """Summed loss against the batch's labels, or against ``targets`` from `sample_targets`."""

    @abstractmethod
    def sample_targets(self, outputs: Tensor, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        """Labels drawn from the model's predictive distribution (for the MC Fisher)."""

    @abstractmethod
    def loss_hessian_root(self, outputs: Tensor, batch: dict[str, Tensor]) -> LossHessianRoot:
        """The factor ``S`` (``S Sᵀ = H_ℓ``, the Hessian of the summed loss in one row of outputs) of the rows
        the loss depends on, computed once per batch. With Rademacher v, ``E[(Jᵀ S v)(Jᵀ S v)ᵀ] = Jᵀ H_ℓ J``:
        the Gauss–Newton matrix."""


@dataclass(frozen=True)
class LossHessianRoot:
    """``S v`` for the rows of the outputs the loss depends on (`rows`: a bool mask, None for every row)."""

    rows: Tensor | None
    shape: torch.Size  # of the vectors `apply` takes: (selected rows, output dim)
    apply: Callable[[Tensor], Tensor]  # v -> S v, in fp32 or wider


def softmax_hessian_root(logits: Tensor, rows: Tensor | None) -> LossHessianRoot:
    """``S = (I − p1ᵀ) diag(√p)`` row by row, p = softmax(logits[rows]): ``S Sᵀ = diag(p) − ppᵀ`` (using
    ``Σp = 1``), the Hessian of cross-entropy in the logits; p and √p are computed once."""
    selected = logits if rows is None else logits[rows]
    probs = _accumulation_precision(selected.detach()).softmax(-1)
    roots = probs.sqrt()

    def apply(vectors: Tensor) -> Tensor:
        scaled = roots * vectors.to(probs.dtype)
        return scaled - probs * scaled.sum(-1, keepdim=True)

    return LossHessianRoot(rows, selected.shape, apply)


class CausalLMObjective(Objective):
    """Next-token cross-entropy summed over counted tokens (see the module docstring)."""

    def token_mask(self, batch: dict[str, Tensor]) -> Tensor:
        labels = batch["labels"]
        attention = batch.get("attention_mask", torch.ones_like(labels))
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = (labels[:, 1:] != IGNORE_INDEX) & attention[:, :-1].bool()
        return mask

    def position_mask(self, batch: dict[str, Tensor]) -> Tensor:
        return batch.get("attention_mask", torch.ones_like(batch["labels"])).bool()

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return _logits(model(**inputs, use_cache=False))

    def loss(self, outputs: Tensor, batch: dict[str, Tensor], targets: Tensor | None = None) -> Tensor:
        mask = self.token_mask(batch)
        if targets is None:
            targets = batch["labels"].roll(-1, dims=1)[mask]
        return F.cross_entropy(_accumulation_precision(outputs[mask]), targets, reduction="sum")

    def sample_targets(self, outputs: Tensor, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        logits = _accumulation_precision(outputs[self.token_mask(batch)].detach())
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)

    def loss_hessian_root(self, outputs: Tensor, batch: dict[str, Tensor]) -> LossHessianRoot:
        return softmax_hessian_root(outputs, self.token_mask(batch))


class SequenceClassificationObjective(Objective):
    """Per-sequence cross-entropy summed over sequences; tokens are the non-padding positions."""

    def token_mask(self, batch: dict[str, Tensor]) -> Tensor:
        return batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        return _logits(model(**inputs))

    def loss(self, outputs: Tensor, batch: dict[str, Tensor], targets: Tensor | None = None) -> Tensor:
        labels = batch["labels"] if targets is None else targets
        if labels.is_floating_point():
            raise ValueError(
                "sequence-classification curvature needs integer class labels (regression heads are not supported)"
            )
        return F.cross_entropy(_accumulation_precision(outputs), labels, reduction="sum")

    def loss_terms(self, batch: dict[str, Tensor]) -> int:
        """One term per sequence: the training loss is the mean per-sequence cross-entropy."""
        return int(batch["labels"].shape[0])

    def sample_targets(self, outputs: Tensor, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        probs = _accumulation_precision(outputs.detach()).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def loss_hessian_root(self, outputs: Tensor, batch: dict[str, Tensor]) -> LossHessianRoot:
        return softmax_hessian_root(outputs, None)


class SquaredErrorObjective(Objective):
    """``½ Σ ‖model(inputs) − targets‖²`` for any module mapping (..., d_in) to (..., d_out)."""

    def token_mask(self, batch: dict[str, Tensor]) -> Tensor:
        return torch.ones(batch["inputs"].shape[:-1], dtype=torch.bool, device=batch["inputs"].device)

    def forward(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        inputs = batch["inputs"]
        if torch.is_grad_enabled():  # no embeddings to hook: let gradients reach the first layer
            inputs = inputs.detach().requires_grad_(True)
        return model(inputs)

    def loss(self, outputs: Tensor, batch: dict[str, Tensor], targets: Tensor | None = None) -> Tensor:
        targets = batch["targets"] if targets is None else targets
        return 0.5 * (_accumulation_precision(outputs) - targets).pow(2).sum()

    def sample_targets(self, outputs: Tensor, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
        noise = torch.randn(outputs.shape, generator=generator, device=outputs.device, dtype=outputs.dtype)
        return outputs.detach() + noise

    def loss_hessian_root(self, outputs: Tensor, batch: dict[str, Tensor]) -> LossHessianRoot:
        """``H_ℓ = I``, so ``S = I``."""
        return LossHessianRoot(None, outputs.shape, lambda vectors: vectors)


def objective_for(batch: dict[str, Tensor]) -> Objective:
    """Pick the objective from a batch's keys: causal LM (2-D labels), classification (1-D), squared error."""
    if "input_ids" in batch and "labels" in batch:
        if batch["labels"].dim() == 2:
            return CausalLMObjective()
        if batch["labels"].dim() == 1:
            return SequenceClassificationObjective()
        raise ValueError(
            f"labels must have shape (batch, seq) or (batch,), got {tuple(batch['labels'].shape)}"
        )
    if "inputs" in batch and "targets" in batch:
        return SquaredErrorObjective()
    raise ValueError(
        f"cannot tell the objective from batch keys {sorted(batch)}: expected input_ids + labels "
        "(+ attention_mask) for language models, or inputs + targets for squared error"
    )


def counts(objective: Objective, batch: dict[str, Tensor]) -> tuple[int, int]:
    """``(T, N)`` of one batch: its counted tokens and its training-loss terms."""
    return int(objective.token_mask(batch).sum()), objective.loss_terms(batch)


def tokens_per_loss_term(batches: Iterable[dict[str, Tensor]], device: torch.device) -> float:
    """``T / N`` over `batches` (summed over data-parallel ranks): counted tokens per training-loss term.

    The estimators' quadratic model ``⟨G, ΔW⟩ + ½ tr(ΔWᵀ S_g ΔW S_a)`` is that of the mean token loss
    ``L/T``; the training loss is ``L/N``, so its model is ``T/N`` times as large. 1 for a causal LM
    (N = T), the mean sequence length in counted tokens for a classifier. `device`: where the counts
    are all-reduced (the model's input device).
    """
    tokens = terms = 0
    for batch in batches:
        batch_tokens, batch_terms = counts(objective_for(batch), batch)
        tokens, terms = tokens + batch_tokens, terms + batch_terms
    tokens, terms = all_reduce_count(tokens, device), all_reduce_count(terms, device)
    if terms == 0:
        raise ValueError("the calibration batches hold no training-loss terms (every label is -100 or padding)")
    return tokens / terms


@dataclass(frozen=True)
class LossTotals:
    """The summed loss of some batches with its two normalisers."""

    loss: float  # Σ of the objective's (summed) loss
    tokens: int  # T, the counted tokens
    terms: int  # N, the training loss's terms (tokens of a causal LM, sequences of a classifier)

    @property
    def per_token(self) -> float:
        """``L / T``: the mean token loss of the curvature estimators."""
        return self.loss / self.tokens

    @property
    def per_term(self) -> float:
        """``L / N``: the training loss's own mean."""
        return self.loss / self.terms


@torch.no_grad()
def summed_loss(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> LossTotals:
    """The loss of `model` over `batches` in eval mode (dropout off; modes and flags restored)."""
    total, tokens, terms, objective = 0.0, 0, 0, None
    device = input_device(model)
    with calibration_mode(model, keep_checkpointing=False, input_grads=False):
        for batch in batches:
            batch = batch_to_device(batch, device)
            objective = objective or objective_for(batch)
            total += float(objective.loss(objective.forward(model, batch), batch))
            batch_tokens, batch_terms = counts(objective, batch)
            tokens, terms = tokens + batch_tokens, terms + batch_terms
    if tokens == 0 or terms == 0:
        raise ValueError("the batches hold no counted tokens (every label is -100 or padding)")
    return LossTotals(total, tokens, terms)
