"""One calibration pass: forward every batch with hooks on the targets, then the backward passes asked for.

Backward jobs per batch: ``"labels"`` backpropagates the summed loss against the batch's labels,
``"sampled"`` against labels drawn from the model (MC Fisher, seeded). One forward serves all
jobs of a batch (the graph is retained between them). The passes of ``grad_mode: sketch`` live
here too, since they can follow any estimator that supplies factors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import cache, partial
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ctrlora.curvature.factor_base import Whitening
from ctrlora.curvature.factors import Factor, relative_damping
from ctrlora.curvature.hooks import TargetRecorder
from ctrlora.curvature.objectives import Objective
from ctrlora.curvature.result import ModuleCurvature
from ctrlora.curvature.runtime import (
    accumulation_dtype,
    all_reduce_count,
    all_reduce_sum_,
    batch_to_device,
    input_device,
    seeded_generator,
    track,
)
from ctrlora.curvature.sketch import WhitenedGradientSketch, WhitenedProduct, orthonormal_basis

JOBS = ("labels", "sampled")


class TokenCounts(NamedTuple):
    """Counts of one pass, summed over ranks: T supervised tokens, P statistics positions."""

    tokens: int
    positions: int


def symmetric_blocks(dim: int) -> list[slice]:
    """Column blocks of a ``dim``-wide Gram sum: 1 below 512, 2 below 2048, else 4. Only the blocks on and
    above the diagonal are multiplied, which saves ``(k−1)/2k`` of the flops (25% at k = 2, 37.5% at k = 4)."""
    count = 1 if dim < 512 else 2 if dim < 2048 else 4
    edges = [dim * index // count for index in range(count + 1)]
    return [slice(low, high) for low, high in zip(edges, edges[1:], strict=False)]


class ProductSums:
    """Per-target running sums of matrix products in a fixed dtype; `means` sums across ranks and divides."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.sums: dict[str, Tensor] = {}

    def _add(self, name: str, left: Tensor, right: Tensor) -> None:
        if name in self.sums:
            self.sums[name].addmm_(left, right)
        else:
            self.sums[name] = left @ right

    def means(self, count: int) -> dict[str, Tensor]:
        """Sum across ranks, then divide by `count` (in place: the sums are spent)."""
        all_reduce_sum_(self.sums.values())
        return {name: total.div_(count) for name, total in self.sums.items()}


class CrossProductSums(ProductSums):
    """``Σ_t l_t r_tᵀ`` per target (the gradient ``G`` from output gradients and inputs)."""

    def add(self, name: str, left_rows: Tensor, right_rows: Tensor) -> None:
        """Add ``Σ_t l_t r_tᵀ`` over the rows of both matrices."""
        self._add(name, left_rows.to(self.dtype).T, right_rows.to(self.dtype))


class OuterProductSums(ProductSums):
    """``Σ_t v_t v_tᵀ`` per target, computed block-upper-triangular (`symmetric_blocks`) and mirrored by `means`.

    `sums` holds the blocks on and above the diagonal (the rest is zero until `means`), so a saved
    window restores as it was.
    """

    def add(self, name: str, rows: Tensor) -> None:
        rows = rows.to(self.dtype)
        blocks = symmetric_blocks(rows.shape[1])
        if len(blocks) == 1:
            self._add(name, rows.T, rows)
            return
        if name not in self.sums:
            self.sums[name] = rows.new_zeros(rows.shape[1], rows.shape[1])
        total = self.sums[name]
        for index, row_block in enumerate(blocks):
            for column_block in blocks[index:]:
                total[row_block, column_block].addmm_(rows[:, row_block].T, rows[:, column_block])

    def means(self, count: int) -> dict[str, Tensor]:
        means = super().means(count)
        for mean in means.values():
            blocks = symmetric_blocks(mean.shape[1])
            for index, row_block in enumerate(blocks):
                for column_block in blocks[index + 1 :]:
                    mean[column_block, row_block] = mean[row_block, column_block].T
        return means


def run_pass(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    recorder: TargetRecorder,
    objective: Objective,
    *,
    jobs: Sequence[str],
    seed: int,
    description: str,
    progress: bool,
) -> TokenCounts:
    """Run every batch through the model (and the backward `jobs`); the recorder sees the
    objective's statistics positions. Returns T and P summed over ranks."""
    unknown = set(jobs) - set(JOBS)
    if unknown:
        raise ValueError(f"unknown backward jobs {sorted(unknown)}; valid: {list(JOBS)}")
    device = input_device(model)
    generator_on = cache(partial(seeded_generator, seed))  # one seeded stream for the whole pass, made on first use
    tokens = positions = 0
    with recorder, torch.set_grad_enabled(bool(jobs)):
        for batch in track(batches, description, progress):
            batch_tokens, batch_positions = _batch_pass(
                model, batch_to_device(batch, device), recorder, objective, jobs, generator_on
            )
            tokens, positions = tokens + batch_tokens, positions + batch_positions
    tokens, positions = all_reduce_count(tokens, device), all_reduce_count(positions, device)
    if tokens == 0:
        raise ValueError("the calibration batches hold no counted tokens (every label is -100 or padding)")
    return TokenCounts(tokens, positions)


def _batch_pass(
    model: nn.Module,
    batch: dict[str, Any],
    recorder: TargetRecorder,
    objective: Objective,
    jobs: Sequence[str],
    generator_on: Callable[[torch.device], torch.Generator],
) -> tuple[int, int]:
    """One batch's forward and backward `jobs`; returns its (counted tokens, statistics positions).

    A function of its own so that the batch's outputs, whose graph holds the output-gradient hooks
    and the inputs they stash, are freed when it returns: a loop variable would keep them alive
    through the next batch's forward, on top of its activations."""
    mask = objective.position_mask(batch)
    with recorder.forward(mask):
        outputs = objective.forward(model, batch)
    for index, job in enumerate(jobs):
        targets = None
        if job == "sampled":
            targets = objective.sample_targets(outputs, batch, generator_on(outputs.device))
        loss = objective.loss(outputs, batch, targets)
        if not loss.requires_grad:
            raise RuntimeError(
                "the calibration loss does not depend on any target layer's output: are the targets "
                "used by the model's forward?"
            )
        with recorder.backward(job):
            loss.backward(retain_graph=index < len(jobs) - 1)
    return int(objective.token_mask(batch).sum()), int(mask.sum())


def _whitened_products(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    modules: dict[str, nn.Module],
    damped: dict[str, tuple[Whitening, Whitening]],
    tests: dict[str, Tensor],
    objective: Objective,
    *,
    side: str,
    description: str,
    seed: int,
    progress: bool,
) -> dict[str, Tensor]:
    """One pass computing ``G̃ M`` ('right') or ``G̃ᵀ M`` ('left') for each target's test matrix M."""
    products = {name: WhitenedProduct(*damped[name], tests[name], side) for name in modules}

    def on_output_grad(name: str, grad: Tensor, inputs: Tensor | None, _job: str) -> None:
        products[name].update(grad.reshape(-1, grad.shape[-1]), inputs.reshape(-1, inputs.shape[-1]))

    recorder = TargetRecorder(modules, on_output_grad=on_output_grad, stash_inputs=True)
    tokens, _ = run_pass(
        model,
        batches,
        recorder,
        objective,
        jobs=["labels"],
        seed=seed,
        description=description,
        progress=progress,
    )
    all_reduce_sum_(product.total for product in products.values())
    return {name: product.finish(tokens) for name, product in products.items()}


def sketch_whitened_gradients(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    modules: dict[str, nn.Module],
    curvatures: dict[str, ModuleCurvature],
    objective: Objective,
    *,
    rank: int,
    oversampling: int,
    power_iters: int,
    damping: float,
    pi_split: bool,
    seed: int,
    progress: bool,
) -> None:
    """Attach a `WhitenedGradientSketch` of each target's true-label gradient to its curvature (in place).

    Runs ``2 + 2·power_iters`` passes: range, power iterations, projection (`ctrlora.curvature.sketch`).
    """
    dtype = accumulation_dtype(modules.values())
    per_factor = relative_damping(damping, pi_split)
    memo: dict[int, Whitening] = {}  # a factor shared by several targets is damped (and factorised) once

    def damp(factor: Factor) -> Whitening:
        """The damped factor's whitening alone: every pass needs all of them, the damped matrices none."""
        if id(factor) not in memo:
            memo[id(factor)] = factor.damped(per_factor).to(dtype=dtype).whitening()
        return memo[id(factor)]

    damped = {name: (damp(curvatures[name].a), damp(curvatures[name].g)) for name in modules}
    omega = {}
    for index, name in enumerate(modules):
        a, g = damped[name]
        width = min(rank + oversampling, a.dim, g.dim)
        generator = torch.Generator().manual_seed(seed * 7919 + index)
        omega[name] = torch.randn(a.dim, width, generator=generator, dtype=dtype).to(curvatures[name].a.device)
    steps = iter(range(1, 3 + 2 * power_iters))

    def product(side: str, tests: dict[str, Tensor]) -> dict[str, Tensor]:
        description = f"gradient sketch {next(steps)}/{2 + 2 * power_iters}"
        return _whitened_products(
            model,
            batches,
            modules,
            damped,
            tests,
            objective,
            side=side,
            description=description,
            seed=seed,
            progress=progress,
        )

    def orthonormal(products: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: orthonormal_basis(matrix) for name, matrix in products.items()}

    range_basis = orthonormal(product("right", omega))  # Q = orth(G̃ Ω)
    for _ in range(power_iters):
        range_basis = orthonormal(product("right", orthonormal(product("left", range_basis))))
    projections = product("left", range_basis)  # G̃ᵀ Q = Bᵀ
    for name in modules:
        curvatures[name].grad_sketch = WhitenedGradientSketch(
            range_basis[name], projections[name].T, damping, pi_split
        )
