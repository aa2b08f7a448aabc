"""Hutchinson diagonals against torch.func Hessians and exact Gauss–Newton matrices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.curvature.factors import DiagonalFactor
from ctrlora.curvature.hutchinson import _hessian_product, kronecker_fit
from ctrlora.curvature.objectives import (
    CausalLMObjective,
    SequenceClassificationObjective,
    SquaredErrorObjective,
)
from ctrlora.curvature.result import ModuleCurvature

from .helpers import assert_close, lm_batches, tiny_llama, tiny_llama_classifier


def tanh_regression():
    """A 4 -> 6 -> 6 tanh network under ½‖f − y‖² whose first layer has a diagonally dominant Hessian
    (whitened inputs, identity read-out), so a few hundred probes reach a few percent; the residual
    term keeps that Hessian far from the GGN."""
    torch.manual_seed(0)
    network = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Tanh(), nn.Linear(6, 6, bias=False)).double()
    with torch.no_grad():
        network[2].weight.copy_(torch.eye(6))
    inputs = torch.linalg.qr(torch.randn(128, 4, dtype=torch.float64)).Q * 128**0.5
    targets = torch.randn(128, 6, dtype=torch.float64)
    return network, [
        {"inputs": inputs[:64], "targets": targets[:64]},
        {"inputs": inputs[64:], "targets": targets[64:]},
    ]


def exact_matrices(network, batches, name):
    """Hessian and GGN of the mean loss w.r.t. the row-major vec of `name`.weight."""
    weight = dict(network.named_parameters())[f"{name}.weight"].detach()
    inputs = torch.cat([b["inputs"] for b in batches])
    targets = torch.cat([b["targets"] for b in batches])

    def outputs(flat):
        return torch.func.functional_call(network, {f"{name}.weight": flat.reshape(weight.shape)}, (inputs,))

    def mean_loss(flat):
        return 0.5 * (outputs(flat) - targets).pow(2).sum() / len(inputs)

    hessian = torch.func.hessian(mean_loss)(weight.flatten())
    jacobian = torch.func.jacrev(outputs)(weight.flatten()).reshape(-1, weight.numel())
    return hessian, jacobian.T @ jacobian / len(inputs)


@pytest.mark.parametrize("matrix", ["hessian", "ggn"])
def test_diagonal_and_trace_converge_to_the_exact_matrix(matrix):
    network, batches = tanh_regression()
    hessian, ggn = (m.detach() for m in exact_matrices(network, batches, "0"))
    exact = hessian if matrix == "hessian" else ggn
    assert (hessian - ggn).norm() > 0.3 * ggn.norm()  # the two variants estimate different matrices
    cfg = CurvatureConfig(kind="hutchinson", matrix=matrix, probes=1024, seed=3)
    result = estimate_curvature(network, batches, ["0"], cfg, progress=False)["0"]
    assert_close(result.diag.flatten(), exact.diagonal(), 0.05)
    assert abs(result.hessian_trace - float(exact.trace())) <= 0.05 * abs(float(exact.trace()))


def test_gradient_is_the_mean_loss_gradient():
    network, batches = tanh_regression()
    weight = network[2].weight
    loss = sum(0.5 * (network(b["inputs"]) - b["targets"]).pow(2).sum() for b in batches) / 128
    (expected,) = torch.autograd.grad(loss, weight)
    for matrix in ("hessian", "ggn"):
        cfg = CurvatureConfig(kind="hutchinson", matrix=matrix, probes=1)
        assert_close(
            estimate_curvature(network, batches, ["2"], cfg, want_grad=True, progress=False)["2"].grad,
            expected,
            1e-12,
        )


def language_model_matrices(model, batch, target):
    """Exact Hessian and GGN of the summed token loss of one batch w.r.t. one target weight."""
    weight = dict(model.named_parameters())[f"{target}.weight"].detach()
    mask = CausalLMObjective().token_mask(batch)
    labels = batch["labels"].roll(-1, dims=1)[mask]

    def logits(flat):
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        return torch.func.functional_call(
            model, {f"{target}.weight": flat.reshape(weight.shape)}, (), kwargs
        ).logits[mask]

    def summed_loss(flat):
        return F.cross_entropy(logits(flat), labels, reduction="sum")

    with sdpa_kernel(SDPBackend.MATH):
        hessian = torch.func.hessian(summed_loss)(weight.flatten())
        jacobian = torch.func.jacrev(logits)(weight.flatten())  # (tokens, vocab, params)
        probs = logits(weight.flatten()).softmax(-1)
    loss_hessian = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    ggn = torch.einsum("tvp,tvw,twq->pq", jacobian, loss_hessian, jacobian)
    return hessian.detach(), ggn.detach()


def test_language_model_hessian_vector_products_are_exact():
    """Exact up to HF's RMSNorm, which computes in fp32 even in an fp64 model (the oracle Hessian itself
    is symmetric only to ~2e-7)."""
    model = tiny_llama()
    for param in model.parameters():
        param.requires_grad_(False)
    batch = lm_batches()[0]
    target = "model.layers.0.self_attn.k_proj"
    hessian, _ = language_model_matrices(model, batch, target)
    weight = dict(model.named_parameters())[f"{target}.weight"]
    vector = torch.randn(weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    objective = CausalLMObjective()
    weight.requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        outputs = objective.forward(model, batch)
        hessian_product, _ = _hessian_product(objective.loss(outputs, batch), [weight])
        assert_close(hessian_product([vector])[0].flatten(), hessian @ vector.flatten(), 1e-6)


def root_columns(objective, outputs, batch):
    """The rows the loss depends on, and the loss Hessian root S of each of them, column j from the j-th
    basis vector: (rows, V, V)."""
    root = objective.loss_hessian_root(outputs, batch)
    basis = torch.eye(outputs.shape[-1], dtype=outputs.dtype)
    return root.rows, torch.stack([root.apply(row.expand(root.shape)) for row in basis], -1)


def test_loss_hessian_roots_factor_the_loss_hessian_of_the_counted_rows():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 7, (2, 5), generator=generator)
    labels[0, 1:3] = -100  # prompt tokens: positions 0 and 1 of row 0 predict them and do not count
    lm_batch = {"input_ids": labels.clamp_min(0), "labels": labels, "attention_mask": torch.ones_like(labels)}
    classes = {"input_ids": labels[:, :3], "labels": labels[:, 0].clamp_min(0)}
    lm_rows, lm_roots = root_columns(CausalLMObjective(), logits, lm_batch)
    assert torch.equal(lm_rows, CausalLMObjective().token_mask(lm_batch)) and int(lm_rows.sum()) == 6
    class_rows, class_roots = root_columns(SequenceClassificationObjective(), logits[:, 0], classes)
    assert class_rows is None  # every sequence counts
    for roots, outputs in ((lm_roots, logits[lm_rows]), (class_roots, logits[:, 0])):
        probs = outputs.softmax(-1)
        loss_hessian = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
        assert_close(roots @ roots.mT, loss_hessian, 1e-12)
    rows, squared = root_columns(SquaredErrorObjective(), logits, {"inputs": logits, "targets": logits})
    assert rows is None and torch.equal(squared, torch.eye(7, dtype=torch.float64).expand(2, 5, 7, 7))


def test_the_ggn_variant_still_checks_the_labels():
    """Its probes never read the labels; float labels of a classifier are refused all the same."""
    model = tiny_llama_classifier(num_labels=1)
    ids = torch.randint(1, 20, (3, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.rand(3, dtype=torch.float64)}
    cfg = CurvatureConfig(kind="hutchinson", matrix="ggn", probes=2)
    with pytest.raises(ValueError, match="regression heads are not supported"):
        estimate_curvature(model, [batch], ["model.layers.0.mlp.up_proj"], cfg, progress=False)


PROBES = 256


def language_model_diagonal(matrix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The `PROBES`-probe estimate of one target's diagonal and the exact matrix, both of the mean token loss."""
    model = tiny_llama()
    batch = lm_batches()[1]
    target = "model.layers.1.mlp.gate_proj"
    hessian, ggn = language_model_matrices(model, batch, target)
    tokens = int(CausalLMObjective().token_mask(batch).sum())
    cfg = CurvatureConfig(kind="hutchinson", matrix=matrix, probes=PROBES)
    estimate = estimate_curvature(model, [batch], [target], cfg, progress=False)[target].diag.flatten()
    return estimate, (hessian if matrix == "hessian" else ggn) / tokens


def test_language_model_diagonal_is_unbiased_within_its_sampling_error():
    """With K probes the error vector has E‖e‖² = Σ_i Σ_{j≠i} H_ij² / K =: σ² and, over 512
    coordinates, a norm concentrated near σ: stay within 2σ, itself well below the signal."""
    estimate, hessian = language_model_diagonal("hessian")
    sigma = float((hessian.pow(2).sum() - hessian.diagonal().pow(2).sum()).sqrt()) / PROBES**0.5
    assert float((estimate - hessian.diagonal()).norm()) < 2 * sigma < 0.35 * float(hessian.diagonal().norm())


def test_language_model_ggn_diagonal_is_unbiased_within_its_sampling_error():
    """u = Jᵀ S z has E[u_i²] = g_i and Var(u_i²) ≤ 2 g_i² (a Rademacher quadratic form), so with K probes
    E‖ĝ − g‖² ≤ 2‖g‖²/K: stay within twice that RMS error."""
    estimate, ggn = language_model_diagonal("ggn")
    assert (estimate >= 0).all()
    assert float((estimate - ggn.diagonal()).norm()) < 2 * (2 / PROBES) ** 0.5 * float(ggn.diagonal().norm())


def test_kronecker_fit_recovers_a_rank_one_diagonal_and_clamps_negatives():
    rows, cols = torch.rand(5, dtype=torch.float64) + 0.1, torch.rand(4, dtype=torch.float64) + 0.1
    diag = torch.outer(rows, cols)
    fit = kronecker_fit(ModuleCurvature(diag=diag, tokens=7))
    assert isinstance(fit.a, DiagonalFactor) and isinstance(fit.g, DiagonalFactor)
    assert_close(torch.outer(fit.g.diagonal, fit.a.diagonal), diag, 1e-12)
    assert fit.diag is diag and fit.tokens == 7
    noisy = diag.clone()
    noisy[0, 0] = -1.0
    clamped = kronecker_fit(ModuleCurvature(diag=noisy))
    total = float(noisy.clamp_min(0).sum())
    assert float(torch.outer(clamped.g.diagonal, clamped.a.diagonal).sum()) == pytest.approx(total, rel=1e-12)
    assert (clamped.a.diagonal >= 0).all() and (clamped.g.diagonal >= 0).all()
