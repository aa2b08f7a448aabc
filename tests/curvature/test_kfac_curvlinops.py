"""ctrlora's K-FAC factors (`estimate_curvature` with kind=kfac, i.e. `ctrlora.curvature.kfac.estimate_kfac`)
against curvlinops' `KFACLinearOperator` (K-FAC-expand), an independent implementation, in fp64.

The conventions, ctrlora (ctrlora/curvature/kfac.py, objectives.py) next to curvlinops 3.0.1 (curvlinops/kfac.py):

- A: ctrlora's S_a = (1/P) Σ_p x_p x_pᵀ over the P non-padding positions; curvlinops' input covariance
  averages over all N sequences × S positions. Equal without padding (curvlinops has no attention mask,
  so padded batches are not compared).
- G: ctrlora's S_g = (1/T) Σ_p g_p g_pᵀ over every position p, g_p the output gradient of the SUMMED loss
  of the T counted tokens. curvlinops' gradient covariance is Σ_p g_p g_pᵀ of the summed loss for
  reduction="sum", and that divided by N·R for reduction="mean" (R: loss terms per sequence). Hence
    causal LM, every token supervised (R = S − 1, N·R = T):        curvlinops(mean) = S_g
    causal LM, prompt labels -100 (T counts supervised tokens):    curvlinops(sum)  = T·S_g
    sequence classifier (R = 1, T = N·S tokens):                   curvlinops(mean) = S·S_g
  (S = T/N is ctrlora's tokens per training-loss term, `objectives.tokens_per_loss_term`);
    MLP, squared error (ctrlora ½‖f − y‖², curvlinops MSELoss(sum) ‖f − y‖²):
      empirical: curvlinops(sum) = 4·T·S_g (its gradients are twice ctrlora's)
      MC:        curvlinops(sum) = 2·T·S_g (it samples y ~ N(f, ½I), ctrlora y ~ N(f, I), from the same draws)
- MC Fisher: both draw labels by torch.multinomial on the softmax of the counted positions, in (sequence,
  position) order, from one generator seeded once per pass, `mc_samples` draws one after another per batch;
  ctrlora seeds it with seed·1_000_003 + rank (`runtime.seeded_generator`), which is passed to curvlinops as
  its seed, so MC factors match to fp64 rounding. With a masked prompt curvlinops also draws labels at the
  ignored positions (MC ignores y), so there only the empirical Fisher is compared.
- HF's LlamaRMSNorm computes in fp32 whatever the input dtype; the tiny Llamas here get the same formula in
  fp64, without which the two libraries agree only to fp32 rounding (~1e-7) once their loss scalings differ.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import pytest
import torch
from curvlinops import KFACLinearOperator
from torch import Tensor, nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ctrlora.curvature.config import CurvatureConfig
from ctrlora.curvature.estimate import estimate_curvature
from ctrlora.curvature.result import CurvatureResult

from .helpers import VOCAB, assert_close, targets_of, tiny_llama, tiny_llama_classifier

EXACT = 1e-12
SEED = 5
FISHERS = [("empirical", 1), ("mc", 1), ("mc", 3)]  # (curvature.fisher, curvature.mc_samples)


def rms_norm_fp64(self: LlamaRMSNorm, hidden_states: Tensor) -> Tensor:
    """LlamaRMSNorm's formula in the input's dtype (HF's casts to fp32)."""
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def in_fp64(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, LlamaRMSNorm):
            module.forward = types.MethodType(rms_norm_fp64, module)
    return model


class Outputs(nn.Module):
    """`model` with the forward curvlinops calls, ``read(model, inputs)``; its targets are under ``model.``."""

    def __init__(self, model: nn.Module, read: Callable[[nn.Module, Tensor], Tensor]) -> None:
        super().__init__()
        self.model, self.read = model, read

    def forward(self, inputs: Tensor) -> Tensor:
        return self.read(self.model, inputs)


def next_token_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    """The logits that predict the next token, (N, vocab, S − 1): curvlinops' class dim is 1."""
    return model(input_ids=input_ids, use_cache=False).logits[:, :-1].transpose(1, 2)


def class_logits(model: nn.Module, input_ids: Tensor) -> Tensor:
    return model(input_ids=input_ids).logits


def predictions(model: nn.Module, inputs: Tensor) -> Tensor:
    return model(inputs)


def token_batch(seed: int, rows: int, length: int, prompt: int = 0) -> dict[str, Tensor]:
    """Unpadded random sequences; the first `prompt` labels of each are -100."""
    ids = torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :prompt] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def ctrlora_factors(
    model: nn.Module, batches, targets: list[str], fisher: str = "empirical", mc_samples: int = 1
) -> CurvatureResult:
    cfg = CurvatureConfig(kind="kfac", fisher=fisher, mc_samples=mc_samples, seed=SEED)
    return estimate_curvature(model, batches, targets, cfg, progress=False)


def curvlinops_factors(
    wrapper: nn.Module,
    loss: nn.Module,
    data,
    targets: list[str],
    fisher: str = "empirical",
    mc_samples: int = 1,
) -> dict[str, tuple[Tensor, Tensor]]:
    """name -> (input covariance, gradient covariance) of the targets of `wrapper.model`."""
    params = [wrapper.model.get_submodule(name).weight for name in targets]
    operator = KFACLinearOperator(
        wrapper,
        loss,
        params,
        data,
        fisher_type=fisher,
        mc_samples=mc_samples,
        seed=SEED * 1_000_003,  # ctrlora's generator seed on rank 0
        check_deterministic=False,
    )
    operator.compute_kronecker_factors()
    state = operator.state_dict()
    return {
        name: (state["input_covariances"][f"model.{name}"], state["gradient_covariances"][f"model.{name}"])
        for name in targets
    }


@pytest.mark.parametrize(("fisher", "mc_samples"), FISHERS)
def test_causal_lm_factors_equal_curvlinops_mean_reduction(fisher: str, mc_samples: int) -> None:
    model = in_fp64(tiny_llama())
    targets = targets_of(model)
    batches = [token_batch(0, rows=3, length=6), token_batch(1, rows=2, length=6)]  # unequal batches
    ours = ctrlora_factors(model, batches, targets, fisher, mc_samples)
    data = [(batch["input_ids"], batch["labels"][:, 1:]) for batch in batches]
    oracle = curvlinops_factors(
        Outputs(model, next_token_logits), nn.CrossEntropyLoss(), data, targets, fisher, mc_samples
    )
    assert ours.report.tokens == 5 * 5
    for name in targets:
        a, g = oracle[name]
        assert_close(ours[name].a.dense(), a, EXACT)
        assert_close(ours[name].g.dense(), g, EXACT)
    if fisher == "mc":  # labels drawn from the model, not the data's
        empirical = ctrlora_factors(model, batches, targets[:1])
        assert (empirical[targets[0]].g.dense() - ours[targets[0]].g.dense()).norm() > 1e-3 * g.norm()


def test_masked_prompt_factors_equal_curvlinops_sum_reduction_over_counted_tokens() -> None:
    model = in_fp64(tiny_llama())
    targets = targets_of(model)
    batches = [token_batch(2, rows=3, length=7, prompt=3), token_batch(3, rows=2, length=7, prompt=3)]
    ours = ctrlora_factors(model, batches, targets)
    tokens = sum(int((batch["labels"][:, 1:] != -100).sum()) for batch in batches)
    assert (
        ours.report.tokens == tokens == 5 * 4 < 5 * 7
    )  # labels 3..6 are supervised; S_a has all 7 positions
    data = [(batch["input_ids"], batch["labels"][:, 1:]) for batch in batches]
    oracle = curvlinops_factors(
        Outputs(model, next_token_logits), nn.CrossEntropyLoss(reduction="sum"), data, targets
    )
    for name in targets:
        a, g = oracle[name]
        assert_close(ours[name].a.dense(), a, EXACT)  # every position, prompt included
        assert_close(tokens * ours[name].g.dense(), g, EXACT)


@pytest.mark.parametrize(("fisher", "mc_samples"), FISHERS)
def test_sequence_classifier_factors_are_curvlinops_mean_reduction_over_tokens_per_sequence(
    fisher: str, mc_samples: int
) -> None:
    model = in_fp64(tiny_llama_classifier(num_labels=3))
    targets = targets_of(model)
    length = 6
    batches = []
    for seed, rows in ((4, 3), (5, 2)):
        batch = token_batch(seed, rows, length)
        batch["labels"] = torch.randint(0, 3, (rows,), generator=torch.Generator().manual_seed(seed))
        batches.append(batch)
    ours = ctrlora_factors(model, batches, targets, fisher, mc_samples)
    assert ours.report.tokens == 5 * length
    data = [(batch["input_ids"], batch["labels"]) for batch in batches]
    oracle = curvlinops_factors(
        Outputs(model, class_logits), nn.CrossEntropyLoss(), data, targets, fisher, mc_samples
    )
    for name in targets:
        a, g = oracle[name]
        assert_close(ours[name].a.dense(), a, EXACT)
        assert_close(length * ours[name].g.dense(), g, EXACT)


@pytest.mark.parametrize(("fisher", "factor"), [("empirical", 4), ("mc", 2)])
def test_squared_error_factors_are_curvlinops_sum_reduction_up_to_the_gaussian_variance(
    fisher: str, factor: int
) -> None:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    targets = ["0", "2"]
    inputs, outputs = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    batches = [{"inputs": inputs[:6], "targets": outputs[:6]}, {"inputs": inputs[6:], "targets": outputs[6:]}]
    ours = ctrlora_factors(model, batches, targets, fisher)
    data = [(batch["inputs"], batch["targets"]) for batch in batches]
    oracle = curvlinops_factors(
        Outputs(model, predictions), nn.MSELoss(reduction="sum"), data, targets, fisher
    )
    for name in targets:
        a, g = oracle[name]
        assert_close(ours[name].a.dense(), a, EXACT)
        assert_close(factor * 10 * ours[name].g.dense(), g, EXACT)
