"""Allocation rules against brute-force optima, relaxation bounds and exact hand cases."""

from __future__ import annotations

import itertools
import random

import pytest

from ctrlora.allocation import allocate_ranks, allocation_params, reallocate, total_utility


def random_utilities(rng: random.Random, length: int) -> list[float]:
    return sorted((rng.uniform(0, 10) for _ in range(length)), reverse=True)


def brute_force(scores, costs, budget, r_min, r_max) -> float:
    """Best total utility over every rank vector within bounds and budget."""
    names = list(scores)
    ranges = [range(r_min, min(r_max, len(scores[n])) + 1) for n in names]
    best = float("-inf")
    for vector in itertools.product(*ranges):
        ranks = dict(zip(names, vector, strict=True))
        if allocation_params(ranks, costs) <= budget:
            best = max(best, total_utility(ranks, scores))
    return best


def fractional_relaxation(scores, costs, budget, r_min) -> float:
    """Optimum of the LP relaxation (units may be taken fractionally), above every integer optimum."""
    value = sum(sum(u[:r_min]) for u in scores.values())
    remaining = budget - r_min * sum(costs.values())
    units = sorted(((u / costs[n], u, costs[n]) for n in scores for u in scores[n][r_min:]), reverse=True)
    for _, u, cost in units:
        take = min(1.0, remaining / cost)
        value += take * u
        remaining -= take * cost
        if remaining <= 0:
            break
    return value


def random_problem(rng: random.Random, equal_costs: bool):
    modules = [f"m{i}" for i in range(rng.randint(2, 3))]
    scores = {n: random_utilities(rng, rng.randint(2, 4)) for n in modules}
    cost = rng.randint(2, 9)
    costs = {n: cost if equal_costs else rng.randint(2, 9) for n in modules}
    r_min = rng.choice([0, 0, 1])
    budget = r_min * sum(costs.values()) + rng.randint(0, 30)
    return scores, costs, budget, r_min, 4


@pytest.mark.parametrize("score", ["per_param", "raw"])
def test_greedy_is_optimal_with_equal_costs(score):
    rng = random.Random(0)
    for _ in range(300):
        scores, costs, budget, r_min, r_max = random_problem(rng, equal_costs=True)
        ranks = allocate_ranks(scores, costs, budget, r_min, r_max, "greedy", score)
        assert total_utility(ranks, scores) == pytest.approx(brute_force(scores, costs, budget, r_min, r_max))


def test_greedy_with_unequal_costs_is_within_one_unit_of_optimum():
    """OPT <= LP relaxation <= greedy + utility of the first unit that did not fit.

    The first misfit closes its module and stays that module's next unit, so the gap is at most
    the largest next-unit utility among modules below their cap.
    """
    rng = random.Random(1)
    for _ in range(300):
        scores, costs, budget, r_min, r_max = random_problem(rng, equal_costs=False)
        ranks = allocate_ranks(scores, costs, budget, r_min, r_max, "greedy")
        greedy = total_utility(ranks, scores)
        optimum = brute_force(scores, costs, budget, r_min, r_max)
        relaxed = fractional_relaxation(scores, costs, budget, r_min)
        next_units = [scores[n][r] for n, r in ranks.items() if r < min(r_max, len(scores[n]))]
        assert greedy <= optimum + 1e-9
        assert optimum <= relaxed + 1e-9
        assert relaxed - greedy <= max(next_units, default=0.0) + 1e-9


def test_greedy_is_not_always_the_integer_optimum():
    scores, costs = {"a": [10.0], "b": [6.0, 6.0]}, {"a": 3, "b": 2}
    ranks = allocate_ranks(scores, costs, budget=4, r_min=0, r_max=2, rule="greedy")
    assert ranks == {"a": 1, "b": 0}
    assert brute_force(scores, costs, 4, 0, 2) == 12.0


def test_greedy_skips_a_misfit_and_keeps_filling_with_cheaper_units():
    scores, costs = {"a": [10.0, 9.0], "b": [1.0]}, {"a": 5, "b": 1}
    ranks = allocate_ranks(scores, costs, budget=6, r_min=0, r_max=2, rule="greedy")
    assert ranks == {"a": 1, "b": 1}


def test_per_param_and_raw_order_differ():
    scores, costs = {"wide": [10.0], "narrow": [6.0]}, {"wide": 10, "narrow": 2}
    assert allocate_ranks(scores, costs, 10, 0, 1, "greedy", "per_param") == {"wide": 0, "narrow": 1}
    assert allocate_ranks(scores, costs, 10, 0, 1, "greedy", "raw") == {"wide": 1, "narrow": 0}


def test_greedy_ties_go_to_module_order_then_rank_index():
    scores, costs = {"a": [5.0, 5.0], "b": [5.0, 5.0]}, {"a": 1, "b": 1}
    assert allocate_ranks(scores, costs, 1, 0, 2, "greedy") == {"a": 1, "b": 0}
    assert allocate_ranks(scores, costs, 3, 0, 2, "greedy") == {"a": 2, "b": 1}


def test_greedy_spends_zero_utility_units_last():
    scores, costs = {"a": [3.0, 0.0], "b": [0.0, 0.0]}, {"a": 1, "b": 1}
    assert allocate_ranks(scores, costs, 3, 0, 2, "greedy") == {"a": 2, "b": 1}


def test_allocations_never_exceed_budget_or_bounds():
    rng = random.Random(2)
    for _ in range(500):
        modules = [f"m{i}" for i in range(rng.randint(1, 8))]
        r_max = rng.randint(1, 12)
        r_min = rng.randint(0, min(r_max, 2))
        scores = {n: random_utilities(rng, rng.randint(r_min, 14)) for n in modules}
        costs = {n: rng.randint(1, 50) for n in modules}
        budget = r_min * sum(costs.values()) + rng.randint(0, 400)
        score = rng.choice(["per_param", "raw"])
        ranks = allocate_ranks(scores, costs, budget, r_min, r_max, "greedy", score)
        assert list(ranks) == modules
        assert allocation_params(ranks, costs) <= budget
        leftover = budget - allocation_params(ranks, costs)
        for name, rank in ranks.items():
            cap = min(r_max, len(scores[name]))
            assert r_min <= rank <= cap
            assert rank == cap or costs[name] > leftover  # maximal: no module could grow


def test_greedy_respects_r_max_and_r_min():
    scores, costs = {"a": [9.0, 8.0, 7.0], "b": [0.5, 0.1, 0.0]}, {"a": 1, "b": 1}
    assert allocate_ranks(scores, costs, 3, 0, 2, "greedy") == {"a": 2, "b": 1}
    assert allocate_ranks(scores, costs, 3, 1, 3, "greedy") == {"a": 2, "b": 1}
    assert allocate_ranks(scores, costs, 2, 1, 3, "greedy") == {"a": 1, "b": 1}


@pytest.mark.parametrize(
    ("scores", "costs", "budget", "r_min", "message"),
    [
        ({"a": [1.0], "b": [1.0]}, {"a": 4, "b": 4}, 7, 1, "r_min=1"),
        ({"a": [1.0, 2.0]}, {"a": 1}, 5, 0, "non-increasing"),
        ({"a": [-1.0]}, {"a": 1}, 5, 0, ">= 0"),
        ({"a": [float("nan")]}, {"a": 1}, 5, 0, ">= 0"),
        ({"a": [1.0]}, {"b": 1}, 5, 0, "different modules"),
        ({"a": [1.0]}, {"a": 1}, 5, 2, "fewer than r_min=2"),
        ({"a": [1.0]}, {"a": 0}, 5, 0, "cost"),
    ],
)
def test_greedy_rejects_bad_input(scores, costs, budget, r_min, message):
    with pytest.raises(ValueError, match=message):
        allocate_ranks(scores, costs, budget, r_min, 4, "greedy")


def test_unknown_rule_score_and_bounds_are_named():
    with pytest.raises(ValueError, match=r"'knapsack'.*greedy.*proportional.*uniform"):
        allocate_ranks({"a": [1.0]}, {"a": 1}, 1, 0, 1, "knapsack")
    with pytest.raises(ValueError, match=r"'ratio'.*per_param.*raw"):
        allocate_ranks({"a": [1.0]}, {"a": 1}, 1, 0, 1, "greedy", "ratio")
    with pytest.raises(ValueError, match="r_min <= r_max"):
        allocate_ranks({"a": [1.0]}, {"a": 1}, 1, 3, 2, "greedy")
    with pytest.raises(ValueError, match="needs costs"):
        allocate_ranks({"a": [1.0]}, None, 1, 0, 1, "greedy")


def proportional_quotas(thetas: list[float], total: int, lo: int, hi: int) -> list[float]:
    """Independent oracle: bisection on c in f(c) = Σ clip(c θ, lo, hi) = total."""
    low, high = 0.0, 1.0
    while sum(min(max(high * t, lo), hi) for t in thetas) < total:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if sum(min(max(middle * t, lo), hi) for t in thetas) < total:
            low = middle
        else:
            high = middle
    return [min(max(high * t, lo), hi) for t in thetas]


def test_proportional_hand_cases():
    def run(thetas, total, lo, hi):
        scores = {f"m{i}": t for i, t in enumerate(thetas)}
        return list(allocate_ranks(scores, None, total, lo, hi, "proportional").values())

    assert run([1, 2, 3, 4], 10, 1, 10) == [1, 2, 3, 4]
    assert run([1, 1, 1], 10, 1, 10) == [4, 3, 3]  # equal remainders: module order
    assert run([100, 1, 1], 12, 1, 6) == [6, 3, 3]  # surplus of the clamped module redistributed
    assert run([1000, 1000, 1], 9, 2, 9) == [4, 3, 2]  # deficit of the raised module taken from the rest
    assert run([0, 0, 0], 7, 1, 5) == [3, 2, 2]  # no preference: equal shares
    assert run([5, 0], 6, 1, 5) == [5, 1]


def test_proportional_total_is_exact_and_within_bounds():
    rng = random.Random(3)
    for _ in range(400):
        count = rng.randint(1, 12)
        hi = rng.randint(1, 16)
        lo = rng.randint(0, hi)
        total = rng.randint(lo * count, hi * count)
        thetas = [rng.choice([0.0, rng.expovariate(1.0), rng.uniform(0, 1e-3)]) for _ in range(count)]
        thetas[0] = rng.uniform(0.1, 5)
        scores = {f"m{i}": t for i, t in enumerate(thetas)}
        reachable = sum(hi if t > 0 else lo for t in thetas)
        if reachable < total:
            with pytest.raises(ValueError, match="out of reach"):
                allocate_ranks(scores, None, total, lo, hi, "proportional")
            continue
        ranks = list(allocate_ranks(scores, None, total, lo, hi, "proportional").values())
        assert sum(ranks) == total
        assert all(lo <= r <= hi for r in ranks)
        for rank, quota in zip(ranks, proportional_quotas(thetas, total, lo, hi), strict=True):
            assert abs(rank - quota) < 1 + 1e-9


@pytest.mark.parametrize(("total", "lo", "hi"), [(2, 1, 4), (13, 1, 4)])
def test_proportional_rejects_infeasible_totals(total, lo, hi):
    with pytest.raises(ValueError, match=r"must lie in \[3, 12\]"):
        allocate_ranks({"a": 1.0, "b": 2.0, "c": 3.0}, None, total, lo, hi, "proportional")


def test_proportional_rejects_negative_scores():
    with pytest.raises(ValueError, match="'b'.*finite and >= 0"):
        allocate_ranks({"a": 1.0, "b": -2.0}, None, 4, 1, 4, "proportional")


def test_uniform_is_clamped_rank_per_module():
    scores = {"a": [1.0], "b": [2.0]}
    assert allocate_ranks(scores, None, 8, 0, 64, "uniform") == {"a": 8, "b": 8}
    assert allocate_ranks(scores, None, 8, 0, 4, "uniform") == {"a": 4, "b": 4}
    assert allocate_ranks(scores, None, 0, 1, 4, "uniform") == {"a": 1, "b": 1}


def test_total_utility_and_params():
    scores, costs = {"a": [3.0, 2.0, 1.0], "b": [5.0]}, {"a": 10, "b": 7}
    assert total_utility({"a": 2, "b": 1}, scores) == 10.0
    assert allocation_params({"a": 2, "b": 1}, costs) == 27
    with pytest.raises(ValueError, match="'b' has rank 2"):
        total_utility({"a": 0, "b": 2}, scores)


def test_reallocate_switches_only_beyond_hysteresis():
    scores, costs = {"a": [10.0, 9.5], "b": [10.0, 1.0]}, {"a": 1, "b": 1}
    current = {"a": 2, "b": 0}  # utility 19.5; greedy optimum {a: 1, b: 1} has 20 (+2.6%)
    assert reallocate(current, scores, costs, 2, 0, 2, hysteresis=0.10) == current
    assert reallocate(current, scores, costs, 2, 0, 2, hysteresis=0.02) == {"a": 1, "b": 1}
    scores = {"a": [10.0, 1.0], "b": [9.0, 1.0]}  # optimum 19 vs current 11: +73%
    assert reallocate(current, scores, costs, 2, 0, 2) == {"a": 1, "b": 1}
    assert reallocate({"a": 1, "b": 1}, scores, costs, 2, 0, 2, hysteresis=0.0) == {"a": 1, "b": 1}


def test_reallocate_rejects_bad_input():
    with pytest.raises(ValueError, match="different modules"):
        reallocate({"a": 1}, {"b": [1.0]}, {"b": 1}, 2, 0, 2)
    with pytest.raises(ValueError, match="hysteresis"):
        reallocate({"a": 1}, {"a": [1.0]}, {"a": 1}, 2, 0, 2, hysteresis=-0.1)


def test_proportional_rejects_non_finite_scores():
    with pytest.raises(ValueError, match="'a'.*finite"):
        allocate_ranks({"a": float("nan"), "b": 1.0}, None, 4, 1, 4, "proportional")
