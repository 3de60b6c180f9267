"""Spreading a model-wide nonzero budget over the target layers: the per-layer densities of a prune.

Every rule scores a weight by ``s_ij = |W_ij| * ||X_j||`` (Wanda's metric; ``|W_ij|`` without
calibration Grams), the same for every method, so that methods compared at one budget also share one
allocation. With ``N = sum(out * fan_in)`` over the allocated layers, the layers' nonzero budgets sum
exactly to ``floor(density * N)``; each layer's density stays within ``[min_ratio * density,
max_ratio * density]`` (capped at 1, and at least what the method needs for that layer).

* ``"uniform"``: every layer at ``density`` (the paper's setting; each layer rounds down on its own).
* ``"global"``: equal marginal error per nonzero. A layer's error-vs-density curve is taken as the
  relative score energy pruning drops (``sum of dropped s^2 / sum of s^2``); keeping, across the model,
  the weights with the largest ``s^2 / sum_layer s^2`` equalizes the slope of those curves.
* ``"owl"``: outlier-weighted (Yin et al., OWL, 2024): a layer's outlier ratio is the share of its
  scores above ``m`` times their mean; densities are ``density + lam * (2 r - 1)`` with ``r`` the ratio
  min-max normalized over the layers, shifted to meet the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "ALLOCATIONS",
    "Allocation",
    "allocate",
    "budget_bounds",
    "check_allocation_options",
    "layer_scores",
    "to_density",
]

Allocation = Literal["uniform", "global", "owl"]
ALLOCATIONS: tuple[Allocation, ...] = ("uniform", "global", "owl")
#: Quantile resolution of a layer's score distribution in ``"global"``: counts are exact to ``numel / 4096``.
_QUANTILES = 4096


def layer_scores(weight: Tensor, gram: Tensor | None = None) -> Tensor:
    """``(out, fan_in)`` scores ``|W_ij| * ||X_j||`` (``||X_j||^2`` is the Gram's diagonal; ``gram`` may be
    that diagonal ``(fan_in,)`` alone), or ``|W_ij|``."""
    w = weight.detach().float().abs()
    if gram is None:
        return w
    diag = gram if gram.dim() == 1 else gram.diagonal()
    return w * diag.float().clamp_min(0).sqrt().to(w.device)[None, :]


def to_density(count: int, numel: int) -> float:
    """The density whose budget ``floor(density * numel)`` is exactly ``count`` (half a weight of slack
    absorbs the rounding of ``count / numel * numel``)."""
    return 1.0 if count >= numel else (count + 0.5) / numel


def _fix_total(counts: dict[str, int], target: int, lower: Mapping[str, int], upper: Mapping[str, int],
               priority: Mapping[str, float]) -> dict[str, int]:
    """Add or remove single weights, highest / lowest ``priority`` first within the bounds, until the counts
    sum to ``target``."""
    counts = dict(counts)
    diff = target - sum(counts.values())
    order = sorted(counts, key=lambda n: priority[n], reverse=diff > 0)
    while diff:
        moved = False
        for n in order:
            step = 1 if diff > 0 else -1
            if lower[n] <= counts[n] + step <= upper[n]:
                counts[n] += step
                diff -= step
                moved = True
                if not diff:
                    break
        if not moved:
            raise RuntimeError("allocation bounds do not admit the budget")  # checked by the caller
    return counts


def _global(scores: Mapping[str, Tensor], target: int, lower: Mapping[str, int],
            upper: Mapping[str, int]) -> dict[str, int]:
    """Greedy over quantile chunks of every layer's normalized squared scores, largest first."""
    names = list(scores)
    values, sizes, owners = [], [], []
    for i, name in enumerate(names):
        v = scores[name].flatten().float().square()
        v = (v / v.sum().clamp_min(1e-30)).sort(descending=True).values
        edges = torch.linspace(0, v.numel(), _QUANTILES + 1, device=v.device).round().long()
        start, stop = edges[:-1].clamp(min=lower[name]), edges[1:].clamp(max=upper[name])
        keep = stop > start  # the part of each chunk beyond the lower bound and within the upper one
        mid = ((start + stop - 1) // 2).clamp(0, v.numel() - 1)
        values.append(v[mid][keep].cpu())
        sizes.append((stop - start)[keep].cpu())
        owners.append(torch.full((int(keep.sum()),), i))
    values, sizes, owners = torch.cat(values), torch.cat(sizes), torch.cat(owners)
    order = values.argsort(descending=True, stable=True)
    sizes, owners, values = sizes[order], owners[order], values[order]
    left = target - sum(lower.values())
    taken = (left - (sizes.cumsum(0) - sizes)).clamp(min=0).minimum(sizes)  # whole chunks, then part of one
    per_layer = torch.zeros(len(names), dtype=torch.long).index_add_(0, owners, taken)
    counts = {n: lower[n] + int(per_layer[i]) for i, n in enumerate(names)}
    last = torch.zeros(len(names)).index_reduce_(0, owners[taken > 0], values[taken > 0], "amin",
                                                 include_self=False)
    return _fix_total(counts, target, lower, upper, {n: float(last[i]) for i, n in enumerate(names)})


def _owl(scores: Mapping[str, Tensor], numels: Mapping[str, int], density: float, target: int,
         lower: Mapping[str, int], upper: Mapping[str, int], *, lam: float, m: float) -> dict[str, int]:
    ratio = {n: float((s > m * s.mean()).float().mean()) for n, s in scores.items()}
    lo, hi = min(ratio.values()), max(ratio.values())
    shift = {n: lam * (2 * (r - lo) / (hi - lo) - 1) if hi > lo else 0.0 for n, r in ratio.items()}

    def counts_at(c: float) -> dict[str, float]:
        return {n: min(max((density + c + shift[n]) * numels[n], lower[n]), upper[n]) for n in numels}

    a, b = -1.0 - lam, 1.0 + lam  # every density is clamped to [0, 1], so the root is in here
    for _ in range(100):
        c = (a + b) / 2
        a, b = (c, b) if sum(counts_at(c).values()) < target else (a, c)
    real = counts_at(b)
    counts = {n: min(max(math.floor(x), lower[n]), upper[n]) for n, x in real.items()}
    return _fix_total(counts, target, lower, upper, {n: real[n] - math.floor(real[n]) for n in real})


_RULES: dict[str, Callable[..., dict[str, int]]] = {"global": _global, "owl": _owl}
_OPTIONS: dict[str, dict[str, float]] = {
    "uniform": {},
    "global": {"min_ratio": 0.25, "max_ratio": 4.0},
    "owl": {"lam": 0.08, "m": 5.0, "min_ratio": 0.25, "max_ratio": 4.0},
}


def check_allocation_options(rule: str, options: Mapping[str, Any]) -> dict[str, float]:
    """The rule's options with defaults filled in; ``ValueError`` for an unknown rule or option or a
    bad value."""
    if rule not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {rule!r}")
    unknown = sorted(set(options) - set(_OPTIONS[rule]))
    if unknown:
        raise ValueError(f"allocation {rule!r} has no option(s) {unknown}; valid options: {sorted(_OPTIONS[rule])}")
    opts = {**_OPTIONS[rule], **options}
    for k, v in opts.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"allocation option {k!r} must be a number >= 0, got {v!r}")
    if opts.get("min_ratio", 0) > 1 or opts.get("max_ratio", 1) < 1:
        raise ValueError(f"allocation needs min_ratio <= 1 <= max_ratio, got {opts['min_ratio']}, {opts['max_ratio']}")
    return opts


def budget_bounds(numels: Mapping[str, int], density: float, minimum: Mapping[str, float], total: int,
                  min_ratio: float, max_ratio: float) -> tuple[dict[str, int], dict[str, int]]:
    """Each layer's least and most nonzeros: at least the method's ``minimum`` density and ``min_ratio *
    density``, at most ``max_ratio * density`` (and 1). ``ValueError`` when they cannot sum to ``total``."""
    lo = {n: math.ceil(max(minimum[n], min_ratio * density) * numels[n]) for n in numels}
    hi = {n: max(lo[n], math.floor(min(1.0, max_ratio * density) * numels[n])) for n in numels}
    if sum(lo.values()) > total or sum(hi.values()) < total:
        raise ValueError(f"the per-layer density bounds admit {sum(lo.values())} to {sum(hi.values())} nonzeros, "
                         f"the budget is {total} (density {density}); widen min_ratio/max_ratio or raise the density")
    return lo, hi


def allocate(rule: Allocation, scores: Mapping[str, Tensor], density: float, minimum: Mapping[str, float],
             total: int | None = None, **options: float) -> dict[str, float]:
    """Per-layer densities under ``rule`` for layers with ``scores`` (``(out, fan_in)``, :func:`layer_scores`).

    ``minimum`` is each layer's smallest density the method can spend; the rule's ``min_ratio`` /
    ``max_ratio`` bound the rest (:func:`budget_bounds`). The budgets ``floor(d * numel)`` of the result sum
    to ``total`` (default ``floor(density * sum(numel))``) exactly; ``"uniform"`` puts every layer at
    ``density``. Raises ``ValueError`` when the bounds cannot hold that total.
    """
    opts = check_allocation_options(rule, options)
    if rule == "uniform":
        return {n: density for n in scores}
    numels = {n: s.numel() for n, s in scores.items()}
    target = math.floor(density * sum(numels.values())) if total is None else total
    lo, hi = budget_bounds(numels, density, minimum, target, opts.pop("min_ratio"), opts.pop("max_ratio"))
    args = (scores, numels, density, target, lo, hi) if rule == "owl" else (scores, target, lo, hi)
    counts = _RULES[rule](*args, **opts)
    return {n: to_density(c, numels[n]) for n, c in counts.items()}
