"""Budget -> integer ranks (docs/METHODS.md §1, §4, §6.1, §6.3).

Three rules turn per-module scores into ranks ``{module name: rank}``:

``greedy`` (CTR-LoRA, CG-LoRA with ``cg.allocate: greedy``)
    ``scores[l]`` lists the utilities ``u_{l,1} >= u_{l,2} >= ... >= 0`` of the module's successive
    rank units (CTR-LoRA: ``u_{l,k} = ½ σ_{l,k}²`` of the whitened gradient), ``costs[l] = n_l + m_l``
    is the parameter count of one rank unit and ``budget`` is a parameter count. It solves the
    concave integer knapsack ``max Σ_l Σ_{k<=r_l} u_{l,k}  s.t.  Σ_l r_l c_l <= budget,
    r_min <= r_l <= r_max`` greedily: every module first gets ``r_min``, then candidates ``(l, k)``
    are visited in decreasing ``u_{l,k} / c_l`` (``score="per_param"``) or ``u_{l,k}``
    (``score="raw"``) and taken when they fit.
``proportional`` (Sensitivity-LoRA)
    ``scores[l] = θ_l >= 0`` and ``budget`` is the total rank count; ``r_l ∝ θ_l`` clamped to
    ``[r_min, r_max]``, rounded by largest remainder so that ``Σ_l r_l = budget`` exactly.
``uniform`` (ablation)
    ``budget`` is the rank of every module (``r̄``), clamped to ``[r_min, r_max]``.

``reallocate`` applies the greedy rule to refreshed utilities with hysteresis (docs/METHODS.md §6.3).
Everything here is plain Python on floats/ints: it runs identically on every data-parallel rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

RULES = ("greedy", "proportional", "uniform")
SCORES = ("per_param", "raw")


def allocate_ranks(
    scores: Mapping[str, Sequence[float]] | Mapping[str, float],
    costs: Mapping[str, int] | None,
    budget: int,
    r_min: int,
    r_max: int,
    rule: str,
    score: str = "per_param",
) -> dict[str, int]:
    """Integer ranks for every module of ``scores`` (in its order) under ``budget``.

    Units of ``budget`` depend on ``rule``: parameters (``greedy``), total rank count
    (``proportional``), rank per module (``uniform``). ``costs`` is only used by ``greedy``;
    ``score`` only by ``greedy``. Raises ``ValueError`` naming the offending value when the
    problem is infeasible or malformed.
    """
    _check_bounds(r_min, r_max)
    if rule == "greedy":
        if costs is None:
            raise ValueError("allocate_ranks(rule='greedy') needs costs (n_l + m_l per module)")
        return _greedy(scores, costs, budget, r_min, r_max, score)  # type: ignore[arg-type]
    if rule == "proportional":
        return _proportional(scores, budget, r_min, r_max)  # type: ignore[arg-type]
    if rule == "uniform":
        if budget < 0:
            raise ValueError(f"uniform allocation: budget (rank per module) must be >= 0, got {budget}")
        return {name: min(max(budget, r_min), r_max) for name in scores}
    raise ValueError(f"unknown allocation rule {rule!r}; choose one of {list(RULES)}")


def total_utility(ranks: Mapping[str, int], scores: Mapping[str, Sequence[float]]) -> float:
    """``Σ_l Σ_{k<=r_l} u_{l,k}``: the modelled loss decrease of an allocation (greedy scores)."""
    total = 0.0
    for name, rank in ranks.items():
        utilities = scores[name]
        if rank > len(utilities):
            raise ValueError(
                f"module {name!r} has rank {rank} but only {len(utilities)} utilities were scored"
            )
        total += sum(utilities[:rank])
    return total


def allocation_params(ranks: Mapping[str, int], costs: Mapping[str, int]) -> int:
    """Trainable LoRA parameters ``Σ_l r_l (n_l + m_l)`` of an allocation."""
    return sum(rank * costs[name] for name, rank in ranks.items())


def reallocate(
    current: Mapping[str, int],
    scores: Mapping[str, Sequence[float]],
    costs: Mapping[str, int],
    budget: int,
    r_min: int,
    r_max: int,
    hysteresis: float = 0.10,
    score: str = "per_param",
) -> dict[str, int]:
    """Greedy re-allocation for refreshed utilities, adopted only when it clearly gains.

    With ``U(r) = total_utility(r, scores)`` the greedy optimum ``r*`` replaces ``current`` iff
    ``U(r*) > (1 + hysteresis) · U(current)``; otherwise ``current`` is returned unchanged, so
    small fluctuations of the estimates never move rank units (each move resets optimizer
    moments and perturbs training).
    """
    if hysteresis < 0:
        raise ValueError(f"hysteresis must be >= 0 (a relative utility gain), got {hysteresis}")
    if set(current) != set(scores):
        raise ValueError(
            f"current allocation and scores name different modules: "
            f"only in current {sorted(set(current) - set(scores))}, "
            f"only in scores {sorted(set(scores) - set(current))}"
        )
    candidate = allocate_ranks(scores, costs, budget, r_min, r_max, "greedy", score)
    if total_utility(candidate, scores) > (1.0 + hysteresis) * total_utility(current, scores):
        return candidate
    return dict(current)


def _check_bounds(r_min: int, r_max: int) -> None:
    if r_min < 0 or r_max < r_min:
        raise ValueError(f"rank bounds need 0 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")


def _greedy(
    scores: Mapping[str, Sequence[float]],
    costs: Mapping[str, int],
    budget: int,
    r_min: int,
    r_max: int,
    score: str,
) -> dict[str, int]:
    """Greedy marginal utility per parameter for the concave integer knapsack.

    Because each module's utilities are non-increasing (checked) and its unit cost is constant,
    its ratios ``u_{l,k}/c_l`` are non-increasing in k, so visiting candidates by decreasing key
    (ties: module order, then rank index) always meets a module's units in order k = 1, 2, ...
    and the result is a valid rank vector.

    A candidate that does not fit is skipped and the scan goes on, rather than stopping: every
    later unit of that module costs the same and can never fit again (the remaining budget only
    shrinks), so the module is closed, but a cheaper module's unit may still fit. Skipping only
    adds non-negative utility to what stopping would give, and leaves the allocation maximal
    (no module could grow by one unit). Optimality: with equal costs the greedy takes the
    ``floor(budget / c)`` largest utilities, which is the exact optimum. With unequal costs
    it is the classic ratio greedy: its stop-at-first-misfit prefix plus a fraction of the
    first misfit is the optimum of the fractional relaxation, so
    ``OPT - greedy <= u`` of that first misfit (a unit of a closed module). It is not always the
    0/1 optimum (e.g. costs 3 and 2, utilities [10] and [6, 6], budget 4: greedy 10, optimum 12).
    Candidates with zero utility are taken last, so the budget is still spent when some modules
    have no measured signal. Utilities must be non-negative.
    """
    if score not in SCORES:
        raise ValueError(f"unknown greedy score {score!r}; choose one of {list(SCORES)}")
    if set(scores) != set(costs):
        raise ValueError(
            f"scores and costs name different modules: only in scores {sorted(set(scores) - set(costs))}, "
            f"only in costs {sorted(set(costs) - set(scores))}"
        )
    names = list(scores)
    for name in names:
        _check_utilities(name, scores[name], r_min)
        if costs[name] <= 0:
            raise ValueError(f"module {name!r}: cost per rank unit must be > 0, got {costs[name]}")
    ranks = {name: r_min for name in names}
    floor_params = allocation_params(ranks, costs)
    if floor_params > budget:
        raise ValueError(
            f"budget of {budget} parameters cannot give every module r_min={r_min}: "
            f"that alone takes {floor_params} parameters"
        )
    remaining = budget - floor_params
    candidates = [
        (-(float(u) / costs[name] if score == "per_param" else float(u)), index, k)
        for index, name in enumerate(names)
        for k, u in enumerate(scores[name][:r_max])
        if k >= r_min
    ]
    closed: set[int] = set()
    for _, index, k in sorted(candidates):
        name = names[index]
        if index in closed:
            continue
        assert k == ranks[name], "non-increasing utilities visit a module's units in order"
        if costs[name] > remaining:
            closed.add(index)
            continue
        ranks[name] += 1
        remaining -= costs[name]
    return ranks


def _check_utilities(name: str, utilities: Sequence[float], r_min: int) -> None:
    if len(utilities) < r_min:
        raise ValueError(f"module {name!r} has {len(utilities)} scored rank units, fewer than r_min={r_min}")
    for k, u in enumerate(utilities):
        if not u >= 0 or math.isinf(u):
            raise ValueError(f"module {name!r}: utility {k} is {u}; utilities must be finite and >= 0")
        if k and u > utilities[k - 1]:
            raise ValueError(
                f"module {name!r}: utilities must be non-increasing, but u[{k}]={u} > u[{k - 1}]="
                f"{utilities[k - 1]}"
            )


def _proportional(scores: Mapping[str, float], total: int, r_min: int, r_max: int) -> dict[str, int]:
    """``r_l = clip(c·θ_l, r_min, r_max)`` with ``c`` such that ``Σ r_l = total``, then rounded.

    This water-filling solution is the fixed point of "clamp to the bounds and redistribute the
    surplus (or deficit) in proportion to θ over the unclamped modules until stable": free
    modules get ``c θ_l`` inside the bounds, clamped ones sit at the bound ``c θ_l`` crossed.
    ``f(c) = Σ_l clip(c θ_l, r_min, r_max)`` is continuous, non-decreasing and
    piecewise linear, so ``c`` is found exactly (rational arithmetic) on the segment between
    its breakpoints ``r_min/θ_l, r_max/θ_l`` where ``f`` crosses ``total``. The real quotas are
    then rounded by largest remainder (ties: module order); a quota inside ``[r_min, r_max]``
    rounds to a value inside it since the bounds are integers, so the total stays exact.
    If every θ is 0 there is no preference between modules and the shares are equal (the limit
    of a constant θ); if only some are 0 they stay at ``r_min``.
    """
    names = list(scores)
    for name in names:
        if not 0 <= float(scores[name]) < math.inf:
            raise ValueError(
                f"module {name!r}: proportional score must be finite and >= 0, got {scores[name]}"
            )
    thetas = [Fraction(float(scores[name])) for name in names]
    count = len(names)
    if not r_min * count <= total <= r_max * count:
        raise ValueError(
            f"total rank {total} cannot be split over {count} modules within [r_min={r_min}, "
            f"r_max={r_max}]: it must lie in [{r_min * count}, {r_max * count}]"
        )
    if all(theta == 0 for theta in thetas):
        thetas = [Fraction(1)] * count
    reachable = sum(r_max if theta > 0 else r_min for theta in thetas)
    if reachable < total:
        zero = [name for name, theta in zip(names, thetas, strict=True) if theta == 0]
        raise ValueError(
            f"total rank {total} is out of reach: modules with score 0 stay at r_min={r_min} "
            f"({zero}) and the others reach at most {reachable} in total"
        )
    quotas = _water_fill(thetas, Fraction(total), r_min, r_max)
    ranks = [math.floor(q) for q in quotas]
    leftover = total - sum(ranks)
    by_remainder = sorted(range(count), key=lambda i: (-(quotas[i] - ranks[i]), i))
    for i in by_remainder[:leftover]:
        ranks[i] += 1
    return dict(zip(names, ranks, strict=True))


def _water_fill(thetas: list[Fraction], total: Fraction, lo: int, hi: int) -> list[Fraction]:
    def filled(c: Fraction) -> list[Fraction]:
        return [min(max(c * theta, Fraction(lo)), Fraction(hi)) for theta in thetas]

    breakpoints = sorted({Fraction(bound) / theta for theta in thetas if theta > 0 for bound in (lo, hi)})
    start = Fraction(0)
    if sum(filled(start)) >= total:
        return filled(start)
    for end in breakpoints:
        if sum(filled(end)) >= total:
            break
        start = end
    middle = (start + end) / 2
    free = {i for i, theta in enumerate(thetas) if lo < middle * theta < hi}
    at_middle = filled(middle)
    fixed = sum(at_middle[i] for i in range(len(thetas)) if i not in free)
    scale = (total - fixed) / sum(thetas[i] for i in free)
    return filled(scale)
