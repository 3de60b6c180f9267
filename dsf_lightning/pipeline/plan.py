"""What a prune will do, resolved before any data is touched: targets, per-layer densities, method options, jobs.

:func:`plan_prune` makes every check that needs the model (targets, per-layer budgets, the allocation's
bounds); :func:`allocate_densities` spreads the budget once the scores are known; :func:`layer_jobs` turns
the plan and the Grams into one :class:`~dsf_lightning.pipeline.jobs.LayerJob` per target.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dsf_lightning.config import PruneConfig
from dsf_lightning.factorization import get_method, nnz_budget
from dsf_lightning.layers import SUPPORTED, layer_kind, weight_matrix
from dsf_lightning.modules import is_pruned_module
from dsf_lightning.modules.attention import Exposure, expose_attention
from dsf_lightning.pipeline.allocation import allocate, budget_bounds, layer_scores
from dsf_lightning.pipeline.jobs import LayerJob
from dsf_lightning.pipeline.report import PruneReport
from dsf_lightning.pipeline.targets import Family, detect_family, find_targets

__all__ = ["PrunePlan", "allocate_densities", "layer_jobs", "plan_prune", "target_matrix", "weights_outside"]


@dataclass
class PrunePlan:
    """What :func:`plan_prune` resolved, before any work: the targets in module order (and the class of the
    dense layer each replaces), skipped layers with reasons, the density of every target and the method's
    options for this model."""

    config: PruneConfig
    family: Family
    targets: dict[str, nn.Module]
    layer_types: dict[str, str]
    skipped: dict[str, str]
    densities: dict[str, float]
    options: dict[str, Any]
    #: the smallest density the method can spend on each layer the allocation spreads the budget over
    minimum: dict[str, float] = field(default_factory=dict)
    #: ``(nonzeros, dense elements)`` of every weight of 2+ dims outside the targets (pruned ones count
    #: their nonzeros), for the model-level density
    outside: tuple[int, int] = (0, 0)
    #: the attention weights this plan exposed as layers (:mod:`~dsf_lightning.modules.attention`), to undo
    #: when the prune does not finish
    exposure: Exposure = field(default_factory=Exposure)

    def new_report(self) -> PruneReport:
        """The empty report of this plan's prune: what is skipped and what lies outside the targets."""
        return PruneReport(method=self.config.method, family=self.family, density=self.config.density,
                           skipped=self.skipped, outside_nnz=self.outside[0], outside_numel=self.outside[1])


def weights_outside(model: nn.Module, targets: Mapping[str, nn.Module]) -> tuple[int, int]:
    """``(nonzeros, dense elements)`` of the weights of 2+ dims outside ``targets``: a pruned module counts its
    nonzeros over its dense ``(out, fan_in)``, any other parameter of 2+ dims all of its elements."""
    nnz = numel = 0
    pruned = dict((n, m) for n, m in model.named_modules() if is_pruned_module(m) and n not in targets)
    for m in pruned.values():
        nnz, numel = nnz + m.nnz, numel + m.out_dim * m.fan_in
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if p.dim() >= 2 and owner not in targets and owner not in pruned:
            nnz, numel = nnz + p.numel(), numel + p.numel()
    return nnz, numel


def target_matrix(layer: nn.Module) -> Tensor:
    """``(out, fan_in)`` weight a target holds: a dense layer's, or the product of a pruned one."""
    return layer.merged_weight().flatten(1) if is_pruned_module(layer) else weight_matrix(layer)


def plan_prune(model: nn.Module, config: PruneConfig, *, with_calibration: bool | None = None) -> PrunePlan:
    """Every check :func:`prune` makes before it touches data or the model, as a :class:`PrunePlan`.

    ``with_calibration``: whether Grams will be given (default: ``config.calibrated``); a method
    that needs them raises otherwise. Raises ``ValueError`` naming the layer.

    The one change it makes computes what the model computed: the weights ``nn.MultiheadAttention`` reads
    directly become layers first (:func:`~dsf_lightning.modules.attention.expose_attention`), so they can be
    targets; the exposures no target is in are undone at once, and all of them when a check fails.
    """
    exposure = expose_attention(model)
    try:
        plan = _plan(model, config, with_calibration)
    except BaseException:
        exposure.undo()
        raise
    if exposure.keep_only(plan.targets):  # weights put back: plan again, for their reasons in ``skipped``
        plan = _plan(model, config, with_calibration)
    return dataclasses.replace(plan, exposure=exposure)


def _plan(model: nn.Module, config: PruneConfig, with_calibration: bool | None) -> PrunePlan:
    method = get_method(config.method)
    calibrated = config.calibrated if with_calibration is None else with_calibration
    if method.needs_gram and not calibrated:
        raise ValueError(f"method {config.method!r} needs calibration data: pass calibration=<iterable of batches>")
    family = config.family or detect_family(model)
    options = config.method_options(family)
    targets, skipped = find_targets(model, include=config.include, exclude=config.exclude, family=family)
    if not targets:
        supported = sum(layer_kind(m) is not None for m in model.modules())
        raise ValueError(
            f"no layer to prune in {type(model).__name__}: searched {supported} supported layers ({SUPPORTED}) "
            f"with family={family!r}, include={config.to_dict()['include']!r}, "
            f"exclude={config.to_dict()['exclude']!r}; skipped: "
            f"{dict(list(skipped.items())[:5])}")
    densities = {n: config.density for n in targets}
    for n, d in config.densities.items():
        if n not in targets:
            close = difflib.get_close_matches(str(n), list(targets), n=5, cutoff=0.5)
            why = f" (skipped: {skipped[n]})" if n in skipped else ""
            raise ValueError(f"densities names {n!r}, which is not a target layer{why}; "
                             f"close target names: {close or sorted(targets)[:5]}")
        densities[n] = d
    shapes = {n: tuple(target_matrix(layer).shape) for n, layer in targets.items()}
    minimum = {}
    for n, (out, fan_in) in shapes.items():
        method.check_layer(out, fan_in, densities[n], options, n)
        if config.allocation != "uniform" and n not in config.densities:
            minimum[n] = _minimum_density(config.method, out, fan_in, options, n)
    if minimum:  # the allocation's bounds must admit the budget: fail before any data is touched
        opts = config.allocation_options
        budget_bounds({n: math.prod(shapes[n]) for n in minimum}, config.density, minimum,
                      _free_budget(config, shapes), opts["min_ratio"], opts["max_ratio"])
    return PrunePlan(config=config, family=family, targets=targets,
                     layer_types={n: type(m).__name__ for n, m in targets.items()}, skipped=skipped,
                     densities=densities, options=options, minimum=minimum, outside=weights_outside(model, targets))


def _minimum_density(method: str, out: int, fan_in: int, options: Mapping[str, Any], name: str) -> float:
    """The smallest density (to 1e-9) whose budget the method can spend on an ``(out, fan_in)`` layer."""
    check = get_method(method).check_layer
    check(out, fan_in, 1.0, options, name)  # a layer the method cannot prune at all fails here
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-9:
        mid = (lo + hi) / 2
        try:
            check(out, fan_in, mid, options, name)
            hi = mid
        except ValueError:
            lo = mid
    return hi


def _free_budget(config: PruneConfig, shapes: Mapping[str, tuple[int, int]]) -> int:
    """The model budget ``floor(density * sum(numel))`` less what the per-layer overrides keep."""
    total = nnz_budget(config.density, sum(math.prod(s) for s in shapes.values()))
    return total - sum(nnz_budget(d, math.prod(shapes[n])) for n, d in config.densities.items())


def allocate_densities(plan: PrunePlan, grams: Mapping[str, Tensor] | None = None) -> PrunePlan:
    """The plan with the layers' densities spread by ``config.allocation`` (scores from the weights and, if
    given, the Grams); every other layer keeps its density. Unchanged for ``"uniform"``."""
    cfg = plan.config
    if not plan.minimum:
        return plan
    grams = grams or {}
    scores = {n: layer_scores(target_matrix(plan.targets[n]), grams.get(n)) for n in plan.minimum}
    shapes = {n: tuple(target_matrix(m).shape) for n, m in plan.targets.items()}
    allocated = allocate(cfg.allocation, scores, cfg.density, plan.minimum, _free_budget(cfg, shapes),
                         **cfg.allocation_options)
    method = get_method(cfg.method)
    for n, d in allocated.items():
        method.check_layer(*shapes[n], d, plan.options, n)
    return dataclasses.replace(plan, densities={**plan.densities, **allocated})


def layer_jobs(plan: PrunePlan, grams: Mapping[str, Tensor] | None = None) -> list[LayerJob]:
    """One :class:`LayerJob` per target, in module order: float32 weights and Grams on the layer's device
    (the math is not stable in half precision; the modules copy the factors back into their dtype)."""
    grams = grams or {}
    missing = [n for n in plan.targets if plan.config.calibrated and n not in grams]
    if missing:
        raise ValueError(f"no Gram for target layer(s) {missing[:5]}")
    jobs = []
    for name, layer in plan.targets.items():
        w32 = target_matrix(layer).float()
        g = grams.get(name)
        jobs.append(LayerJob(name, plan.config.method, w32, plan.densities[name],
                             None if g is None else g.to(device=w32.device, dtype=torch.float32), dict(plan.options)))
    return jobs
