"""activation and kfac statistics against a per-token oracle, and their invariances."""

from __future__ import annotations

import gc
import weakref

import peft
import pytest
import torch
import torch.nn.functional as F

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.curvature.objectives import CausalLMObjective
from ctrlora.curvature.passes import OuterProductSums, symmetric_blocks

from .helpers import assert_close, collate, sequences, targets_of, tiny_llama, tiny_llama_classifier

EXACT = 1e-10


def causal_token_oracle(model, batches, targets):
    """S_a, S_g, G, T and P by explicit loops: the loss over counted tokens, the factors over every
    non-padding position (S_a / P, S_g / T); g_t from retain_grad on the layer outputs."""
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in targets}
    sums = {name: {"a": 0.0, "g": 0.0, "grad": 0.0} for name in targets}
    tokens = positions = 0
    for weight in weights.values():
        weight.requires_grad_(True)
    for batch in batches:
        captured = {}

        def capture(name, captured=captured):
            def hook(_module, args, output):
                output.retain_grad()
                captured[name] = (args[0].detach(), output)

            return hook

        handles = [modules[name].register_forward_hook(capture(name)) for name in targets]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        counted = []
        loss = 0.0
        rows, width = batch["input_ids"].shape
        for b in range(rows):
            for t in range(width - 1):
                label = int(batch["labels"][b, t + 1])
                if batch["attention_mask"][b, t] == 1 and label != -100:
                    loss = loss - F.log_softmax(logits[b, t], -1)[label]
                    counted.append((b, t))
        loss.backward()
        for handle in handles:
            handle.remove()
        tokens += len(counted)
        present = [(b, t) for b in range(rows) for t in range(width) if batch["attention_mask"][b, t] == 1]
        positions += len(present)
        for name in targets:
            x, y = captured[name]
            for b, t in present:
                sums[name]["a"] = sums[name]["a"] + torch.outer(x[b, t], x[b, t])
                sums[name]["g"] = sums[name]["g"] + torch.outer(y.grad[b, t], y.grad[b, t])
            sums[name]["grad"] = sums[name]["grad"] + weights[name].grad
            weights[name].grad = None
    for weight in weights.values():
        weight.requires_grad_(False)
    counts = {"a": positions, "g": tokens, "grad": tokens}
    return {
        name: {key: value / counts[key] for key, value in parts.items()} for name, parts in sums.items()
    }, tokens


def test_activation_and_kfac_match_the_per_token_oracle(model, batches):
    targets = targets_of(model)
    oracle, tokens = causal_token_oracle(model, batches, targets)
    activation = estimate_curvature(
        model, batches, targets, CurvatureConfig(kind="activation"), progress=False
    )
    kfac = estimate_curvature(
        model, batches, targets, CurvatureConfig(kind="kfac"), want_grad=True, progress=False
    )
    assert tokens == kfac.report.tokens == activation.report.tokens == 20  # 5+3+4 and 2+6 counted tokens
    for name in targets:
        assert kfac[name].a.dense().dtype == torch.float64
        assert_close(activation[name].a.dense(), oracle[name]["a"], EXACT)
        assert_close(kfac[name].a.dense(), oracle[name]["a"], EXACT)
        assert_close(kfac[name].g.dense(), oracle[name]["g"], EXACT)
        assert_close(kfac[name].grad, oracle[name]["grad"], EXACT)


def test_targets_fed_the_same_input_share_one_input_factor(model, batches):
    targets = targets_of(model)
    result = estimate_curvature(model, batches, targets, CurvatureConfig(kind="kfac"), progress=False)
    layer = "model.layers.1"
    q, k, v, o = (result[f"{layer}.self_attn.{p}"].a for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gate, up, down = (result[f"{layer}.mlp.{p}"].a for p in ("gate_proj", "up_proj", "down_proj"))
    assert q is k is v and gate is up
    assert o is not q and down is not gate and gate is not q


def test_right_padding_gives_the_statistics_of_the_unpadded_sequences(model):
    pairs = sequences(3, [8, 5, 3])
    padded = [collate(pairs)]
    unpadded = [collate([pair]) for pair in pairs]
    targets = targets_of(model)
    cfg = CurvatureConfig(kind="kfac")
    with_padding = estimate_curvature(model, padded, targets, cfg, want_grad=True, progress=False)
    without = estimate_curvature(model, unpadded, targets, cfg, want_grad=True, progress=False)
    assert with_padding.report.tokens == without.report.tokens == 6 + 3 + 1
    for name in targets:
        assert_close(with_padding[name].a.dense(), without[name].a.dense(), EXACT)
        assert_close(with_padding[name].g.dense(), without[name].g.dense(), EXACT)
        assert_close(with_padding[name].grad, without[name].grad, EXACT)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_every_token_once(batches, reentrant):
    plain, checkpointed = tiny_llama(), tiny_llama()
    checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    targets = targets_of(plain)
    calls = []
    checkpointed.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    cfg = CurvatureConfig(kind="kfac")
    expected = estimate_curvature(plain, batches, targets, cfg, want_grad=True, progress=False)
    actual = estimate_curvature(checkpointed, batches, targets, cfg, want_grad=True, progress=False)
    assert len(calls) == 2 * len(batches)  # the layer was recomputed in every backward
    assert actual.report.tokens == expected.report.tokens
    for name in targets:
        assert_close(actual[name].a.dense(), expected[name].a.dense(), EXACT)
        assert_close(actual[name].g.dense(), expected[name].g.dense(), EXACT)
        assert_close(actual[name].grad, expected[name].grad, EXACT)


def test_estimation_restores_modes_and_flags_and_leaves_no_gradients(model, batches):
    model.train()
    model.lm_head.weight.requires_grad_(True)
    before_training = {name: module.training for name, module in model.named_modules()}
    before_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for kind in ("activation", "kfac", "hutchinson"):
        estimate_curvature(
            model,
            batches,
            targets_of(model, ["v_proj"]),
            CurvatureConfig(kind=kind, probes=1),
            progress=False,
        )
    assert {name: module.training for name, module in model.named_modules()} == before_training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before_flags
    assert all(p.grad is None for p in model.parameters())


def held_tensors(result) -> list[torch.Tensor]:
    """The tensors a result's modules hold: their factors' and their own (grad, diag)."""
    found = []
    for module in result.modules.values():
        for value in vars(module).values():
            parts = [value] if isinstance(value, torch.Tensor) else vars(value).values() if hasattr(value, "__dict__") else []
            found.extend(part for part in parts if isinstance(part, torch.Tensor))
    return found


@pytest.mark.parametrize("kind", ["activation", "kfac", "hutchinson"])
def test_a_dropped_estimate_frees_its_statistics_without_a_garbage_collection(model, batches, kind):
    """Nothing the estimate leaves behind (hooks, reference cycles) may keep its sums alive: a refresh
    drops one mid-training, and Python's collector may not run for many steps."""
    result = estimate_curvature(
        model, batches, targets_of(model, ["v_proj"]), CurvatureConfig(kind=kind, probes=1),
        want_grad=kind == "kfac", progress=False,
    )
    alive = [weakref.ref(tensor) for tensor in held_tensors(result)]
    assert alive
    gc.disable()
    try:
        del result
        assert [ref for ref in alive if ref() is not None] == []
    finally:
        gc.enable()


def test_a_batch_outputs_are_freed_before_the_next_batch_runs(model, batches, monkeypatch):
    """The logits (and, through their graph, the hooks' stashed inputs) of batch i must not be alive while
    batch i+1's activations are: that would add a batch's outputs to the calibration peak."""
    earlier: list[weakref.ref] = []
    leaked: list[int] = []
    forward = CausalLMObjective.forward

    def recording_forward(self, model, batch):
        leaked.extend(index for index, ref in enumerate(earlier) if ref() is not None)
        outputs = forward(self, model, batch)
        earlier.append(weakref.ref(outputs))
        return outputs

    monkeypatch.setattr(CausalLMObjective, "forward", recording_forward)
    gc.disable()
    try:
        estimate_curvature(model, batches, targets_of(model), CurvatureConfig(kind="kfac"), want_grad=True, progress=False)
    finally:
        gc.enable()
    assert len(earlier) == len(batches) > 1
    assert leaked == []


def test_peft_wrappers_are_estimated_at_the_adapted_weights(batches):
    lora = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    merged = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    merged.load_state_dict(lora.state_dict())
    merged = merged.merge_and_unload()
    plain_targets = targets_of(merged, ["q_proj", "down_proj", "v_proj"])
    wrapped_targets = [f"base_model.model.{name}" for name in plain_targets]
    cfg = CurvatureConfig(kind="kfac")
    adapted = estimate_curvature(lora, batches, wrapped_targets, cfg, want_grad=True, progress=False)
    reference = estimate_curvature(merged, batches, plain_targets, cfg, want_grad=True, progress=False)
    for wrapped, plain in zip(wrapped_targets, plain_targets, strict=True):
        assert_close(adapted[wrapped].a.dense(), reference[plain].a.dense(), EXACT)
        assert_close(adapted[wrapped].g.dense(), reference[plain].g.dense(), EXACT)
        assert_close(adapted[wrapped].grad, reference[plain].grad, EXACT)
    trainable = [p for name, p in lora.named_parameters() if "lora_" in name]
    assert trainable and all(p.requires_grad and p.grad is None for p in trainable)


def test_statistics_accumulate_in_fp32_for_bf16_activations(batches):
    model = tiny_llama(dtype=torch.bfloat16)
    target = "model.layers.1.mlp.down_proj"
    inputs, grads = [], []

    def capture(_module, args, output):
        inputs.append(args[0].detach())
        output.register_hook(grads.append)

    dict(model.named_modules())[target].register_forward_hook(capture)
    result = estimate_curvature(model, batches, [target], CurvatureConfig(kind="kfac"), progress=False)[
        target
    ]
    assert result.a.dense().dtype == result.g.dense().dtype == torch.float32

    def exact_moment(tensors, count):  # fp64 sum over positions of the very bf16 values the estimator saw
        rows = torch.cat(
            [t[batch["attention_mask"].bool()] for t, batch in zip(tensors, batches, strict=True)]
        ).double()
        return rows.T @ rows / count

    positions = sum(int(batch["attention_mask"].sum()) for batch in batches)
    assert_close(result.a.dense().double(), exact_moment(inputs, positions), 1e-6)
    assert_close(result.g.dense().double(), exact_moment(grads, result.tokens), 1e-6)


def test_sequence_classification_counts_non_padding_positions():
    model = tiny_llama_classifier()
    pairs = sequences(5, [6, 4, 3])
    batch = collate(pairs)
    batch["labels"] = torch.tensor([0, 2, 1])
    target = "model.layers.0.mlp.up_proj"
    captured = {}

    def capture(_module, args, output):
        output.retain_grad()
        captured["x"], captured["y"] = args[0].detach(), output

    handle = dict(model.named_modules())[target].register_forward_hook(capture)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    F.cross_entropy(logits, batch["labels"], reduction="sum").backward()
    handle.remove()
    mask = batch["attention_mask"].bool()
    x, g = captured["x"][mask], captured["y"].grad[mask]
    result = estimate_curvature(model, [batch], [target], CurvatureConfig(kind="kfac"), progress=False)[
        target
    ]
    assert result.tokens == 13
    assert_close(result.a.dense(), x.T @ x / 13, EXACT)
    assert_close(result.g.dense(), g.T @ g / 13, EXACT)


def test_progress_bar_runs_over_every_batch(model, batches):
    target = targets_of(model, ["o_proj"])
    shown = estimate_curvature(model, batches, target, CurvatureConfig(kind="activation"), progress=True)
    hidden = estimate_curvature(model, batches, target, CurvatureConfig(kind="activation"), progress=False)
    assert shown.report.tokens == hidden.report.tokens == 20
    assert_close(shown[target[0]].a.dense(), hidden[target[0]].a.dense(), EXACT)


def pseudo_inverse_root(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    keep = values > 1e-10 * values.max()
    roots = torch.where(keep, values.clamp_min(1e-300).rsqrt(), torch.zeros_like(values))
    return vectors @ torch.diag(roots) @ vectors.T


def test_whitened_gradient_is_bounded_by_the_position_to_token_ratio(model, batches):
    """With S_a over the P positions and S_g, G over the same positions per counted token (T), Cauchy–Schwarz
    gives σ₁(S_g^{-1/2} G S_a^{-1/2}) ≤ √(P/T). Factors counted only at supervised tokens (masked prompts
    here) miss the prompt directions that G holds, and the whitened gradient is unbounded."""
    targets = targets_of(model)
    kfac = estimate_curvature(model, batches, targets, CurvatureConfig(kind="kfac"), want_grad=True, progress=False)
    positions = sum(int(batch["attention_mask"].sum()) for batch in batches)
    assert positions > kfac.report.tokens  # the prompts are masked
    bound = (positions / kfac.report.tokens) ** 0.5
    for name in targets:
        whitened = pseudo_inverse_root(kfac[name].g.dense()) @ kfac[name].grad @ pseudo_inverse_root(kfac[name].a.dense())
        assert torch.linalg.matrix_norm(whitened, ord=2) <= bound * (1 + 1e-8), name


def test_tokens_per_loss_term_converts_the_mean_token_loss_to_the_training_loss() -> None:
    """T/N: 1 for a causal LM (its loss is the mean token loss), the mean counted length for a classifier."""
    from ctrlora.curvature.objectives import tokens_per_loss_term

    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    classification = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask, "labels": torch.tensor([0, 1])}
    assert tokens_per_loss_term([classification, classification], torch.device("cpu")) == 5 / 2
    causal = {**classification, "labels": torch.tensor([[1, 2, 3, -100], [-100, 4, -100, -100]])}
    assert tokens_per_loss_term([causal], torch.device("cpu")) == 1.0


@pytest.mark.parametrize("dim", [300, 600, 2100])  # one block, two blocks, four blocks
def test_gram_sums_from_upper_blocks_equal_the_full_products(dim):
    generator = torch.Generator().manual_seed(dim)
    batches = [torch.randn(37, dim, dtype=torch.float64, generator=generator) for _ in range(2)]
    sums = OuterProductSums(torch.float64)
    for rows in batches:
        sums.add("layer", rows)
    stacked = torch.cat(batches)
    assert len(symmetric_blocks(dim)) == {300: 1, 600: 2, 2100: 4}[dim]
    assert_close(sums.means(74)["layer"], stacked.T @ stacked / 74, EXACT)
