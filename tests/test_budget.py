"""Budget arithmetic (docs/METHODS.md §1) from architecture configs alone: meta device, no weights."""

from __future__ import annotations

import pytest
from conftest import compose_config

from ctrlora.backbones import meta_model
from ctrlora.config import BudgetConfig
from ctrlora.errors import ConfigError
from ctrlora.methods.base import resolve_budget

# Published parameter counts, and C = Σ (n + m) over the seven projections of all layers:
# llama2-7b: 32 × (4·(4096+4096) + 3·(4096+11008)) ; llama3.1-8b: 32 × (2·8192 + 2·(4096+1024) + 3·(4096+14336))
CASES = {
    "llama2-7b": (6_738_415_616, 32 * (4 * 8192 + 3 * 15104), {0.001: 2, 0.003: 8}),
    "llama3.1-8b": (8_030_261_248, 32 * (2 * 8192 + 2 * 5120 + 3 * 18432), {0.001: 3, 0.003: 9}),
}


@pytest.mark.parametrize("model_name", sorted(CASES))
@pytest.mark.parametrize("ratio", [0.001, 0.003])
def test_uniform_rank_from_config_alone(model_name: str, ratio: float) -> None:
    params, rank_cost, ranks = CASES[model_name]
    cfg = compose_config([f"model={model_name}", "run_dir=unused"])
    model = meta_model(cfg.model)
    assert next(model.parameters()).is_meta
    budget = resolve_budget(BudgetConfig(ratio=ratio, rank=None), model, list(cfg.model.target_modules))
    assert budget.backbone_params == params
    assert budget.rank_cost == rank_cost
    assert budget.rank == ranks[ratio] == int(ratio * params // rank_cost)
    assert budget.target_params == ranks[ratio] * rank_cost <= budget.allowed_params


def test_rank_budget_and_exactly_one_knob() -> None:
    cfg = compose_config(["model=llama2-7b", "run_dir=unused"])
    model = meta_model(cfg.model)
    targets = list(cfg.model.target_modules)
    assert resolve_budget(BudgetConfig(ratio=None, rank=16), model, targets).rank == 16
    with pytest.raises(ConfigError, match="exactly one of budget.ratio and budget.rank"):
        resolve_budget(BudgetConfig(ratio=0.001, rank=8), model, targets)


def test_budget_that_gives_rank_zero_is_an_error() -> None:
    cfg = compose_config(["run_dir=unused"])
    model = meta_model(cfg.model)  # the tiny Llama: ~107k parameters, C = 2048
    with pytest.raises(ConfigError, match=r"budget.ratio=0.001 gives rank 0.*Raise budget.ratio to at least"):
        resolve_budget(BudgetConfig(ratio=0.001, rank=None), model, list(cfg.model.target_modules))
