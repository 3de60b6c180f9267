"""One-shot pruning of a model: plan, calibrate, solve each layer, put the pruned modules in place.

>>> report = prune(model, 0.3, "dsf", calibration=loader)             # plain PyTorch entry point
>>> report = prune(model, PruneConfig(density=0.3, exclude=["fc"]))    # the same, from a config

The steps are separate so that the Lightning callback and distributed runs reuse them:

1. :func:`plan_prune` -- every check that needs the model (targets, per-layer budgets), before any
   data is touched;
2. :func:`build_structure` (optional) -- put the pruned modules in place first, holding the dense
   weights exactly, so optimizers and checkpoints see the final structure before any factorization;
3. :func:`record_grams` -- mean input Grams of every target over the calibration batches;
4. :func:`layer_jobs` + an *executor* -- solve every layer (here, :func:`~dsf_lightning.jobs.solve_serially`:
   small layers of one shape in batches, the rest one after the other; or split across processes,
   :mod:`dsf_lightning.distributed`);
5. :func:`install` -- fill the pruned modules (or replace the dense layers) and describe each one; under
   :func:`all_or_nothing` a prune that fails or is interrupted (Ctrl-C) leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from dsf_lightning.allocation import allocate, budget_bounds, layer_scores
from dsf_lightning.calibration import InputGramRecorder
from dsf_lightning.config import PruneConfig
from dsf_lightning.factorization import get_method, nnz_budget
from dsf_lightning.jobs import Executor, LayerJob, LayerResult, solve_serially
from dsf_lightning.layers import SUPPORTED, hf_conv1d_type, layer_kind, weight_matrix
from dsf_lightning.modules import MaskedLayer, is_pruned_module, pruned_module
from dsf_lightning.report import LayerRecord, PruneReport
from dsf_lightning.structure import PRUNE_INFO_ATTR, replace_module
from dsf_lightning.targets import Family, detect_family, find_targets

__all__ = [
    "PrunePlan",
    "Undo",
    "all_or_nothing",
    "allocate_densities",
    "build_structure",
    "unbuild_structure",
    "default_forward",
    "install",
    "layer_jobs",
    "plan_prune",
    "prune",
    "record_grams",
]


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


def target_matrix(layer: nn.Module) -> Tensor:
    """``(out, fan_in)`` weight a target holds: a dense layer's, or the product of a pruned one."""
    return layer.merged_weight().flatten(1) if is_pruned_module(layer) else weight_matrix(layer)


def plan_prune(model: nn.Module, config: PruneConfig, *, with_calibration: bool | None = None) -> PrunePlan:
    """Every check :func:`prune` makes before it touches data or the model, as a :class:`PrunePlan`.

    ``with_calibration``: whether Grams will be given (default: ``config.calibrated``); a method
    that needs them raises otherwise. Raises ``ValueError`` naming the layer.
    """
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
                     densities=densities, options=options, minimum=minimum)


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


@torch.no_grad()
def build_structure(model: nn.Module, plan: PrunePlan) -> PrunePlan:
    """Replace every target by its pruned module holding the dense weight exactly (full masks), in place.

    The model computes the same function until :func:`install` fills the modules; optimizers and DDP
    created in between hold the final parameters. Returns the plan with the new modules as targets.
    """
    targets = {}
    for name, layer in plan.targets.items():
        new = pruned_module(layer, plan.config.two_factor, forward_mode=plan.config.forward_mode,
                            storage=plan.config.storage)
        replace_module(model, name, new)
        targets[name] = new
    return dataclasses.replace(plan, targets=targets)


@torch.no_grad()
def unbuild_structure(model: nn.Module, plan: PrunePlan) -> None:
    """Undo :func:`build_structure` before :func:`install`: put plain layers holding the same weights back
    (``to_dense``; an HF ``Conv1D`` target comes back as a ``Conv1D``), so a failed prune leaves the
    model as it was."""
    for name, layer in plan.targets.items():
        dense = layer.to_dense()
        if plan.layer_types[name] == "Conv1D":
            conv1d = hf_conv1d_type()(dense.out_features, dense.in_features).to(dense.weight)
            conv1d.weight.copy_(dense.weight.T)
            conv1d.bias.copy_(dense.bias)
            dense = conv1d
        dense.train(layer.training)
        dense.requires_grad_(all(p.requires_grad for p in layer.parameters()))
        replace_module(model, name, dense)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Calibration forward used when none is given: moves tensors to the model's device, then
    ``model(**batch)`` for a mapping (HF tokenizer output), ``model(batch[0])`` for a tuple/list (an
    ``(inputs, targets)`` pair from a DataLoader), ``model(batch)`` otherwise."""
    from lightning.fabric.utilities.apply_func import move_data_to_device

    p = next(model.parameters(), None)
    if p is not None:
        batch = move_data_to_device(batch, p.device)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def record_grams(model: nn.Module, targets: Mapping[str, nn.Module], batches: Iterable,
                 forward: Callable[[nn.Module, Any], Any] | None = None, *,
                 limit: int | None = None, diagonal: bool = False) -> InputGramRecorder:
    """Input Grams of every target over ``batches`` (at most ``limit``), in eval mode without grad; every
    module's training flag is restored afterwards. Returns the recorder (``grams``, ``counts``,
    ``accumulators``); a target that saw no input is a ``ValueError``. ``diagonal``: only the Grams'
    diagonals (the allocation's input norms)."""
    forward = forward or default_forward
    modes = {m: m.training for m in model.modules()}
    model.eval()
    seen = 0
    try:
        with torch.no_grad(), InputGramRecorder(model, targets, diagonal=diagonal) as rec:
            for batch in islice(batches, limit):
                forward(model, batch)
                seen += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
    unseen = [n for n, c in rec.counts.items() if c == 0]
    if unseen:
        raise ValueError(f"layer(s) {unseen[:5]} saw no calibration input in {seen} batch(es) (is the calibration "
                         f"data empty, or does the forward skip them?); exclude them or fix the forward")
    return rec


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


class Undo:
    """What :func:`install` changed in a model, to put back when the prune does not finish (an error, a
    ``KeyboardInterrupt``): replaced dense layers (the original modules, kept on ``store``) and pruned
    modules filled in place (their state before, copied to ``store``)."""

    def __init__(self, store: torch.device | str = "cpu") -> None:
        self.store = torch.device(store)
        self._entries: list[tuple[str, nn.Module, torch.device, dict[str, Tensor] | None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, name: str, layer: nn.Module) -> None:
        """Remember ``layer`` (at ``name``) as it is now, before :func:`install` changes it."""
        device = next(layer.parameters()).device
        if isinstance(layer, MaskedLayer):  # filled in place: its values change, the module stays
            saved = {k: v.detach().to(self.store, copy=True) for k, v in layer.state_dict().items()}
            self._entries.append((name, layer, device, saved))
        else:  # replaced: the module itself is the way back (install moves it to ``store`` once replaced)
            self._entries.append((name, layer, device, None))

    @torch.no_grad()
    def restore(self, model: nn.Module) -> int:
        """Put every remembered layer back as it was (newest first); returns how many."""
        for name, layer, device, saved in reversed(self._entries):
            if saved is None:
                replace_module(model, name, layer.to(device))
            else:
                layer.load_state_dict(saved)
        n = len(self._entries)
        self._entries.clear()
        return n


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, store: torch.device | str = "cpu") -> Iterator[Undo]:
    """The prune inside the block changes ``model`` completely or not at all: on any exception
    (``KeyboardInterrupt`` too) the layers :func:`install` changed are put back (:class:`Undo`), and the
    exception leaves with a note saying so."""
    undo = Undo(store)
    try:
        yield undo
    except BaseException as e:
        n = undo.restore(model)
        e.add_note(f"dsf-lightning: the prune did not finish ({type(e).__name__}); the model is unchanged "
                   f"({n} layer(s) put back as they were before the prune)")
        raise


@torch.no_grad()
def install(model: nn.Module, plan: PrunePlan, results: Mapping[str, LayerResult],
            undo: Undo | None = None) -> list[LayerRecord]:
    """Put every solved layer in place, in module order, and describe it: a pruned module built by
    :func:`build_structure` is filled in place (its parameters stay the same objects); a dense layer is
    replaced by a new pruned module. ``undo`` remembers each layer first (:func:`all_or_nothing`)."""
    cfg = plan.config
    records = []
    for name, layer in plan.targets.items():
        t0 = time.perf_counter()
        result = results[name]
        fact = result.factorization
        out, fan_in = target_matrix(layer).shape
        if undo is not None:
            undo.keep(name, layer)
        if isinstance(layer, MaskedLayer):
            new = layer.load_factorization_(fact)
        else:
            new = pruned_module(layer, cfg.two_factor, fact, forward_mode=cfg.forward_mode, storage=cfg.storage)
            replace_module(model, name, new)
            if undo is not None:  # out of the model now: off the accelerator until the prune is done
                layer.to(undo.store)
        if cfg.balance_norms and fact.second is not None:
            new.balance_norms_()
        density = plan.densities[name]
        setattr(new, PRUNE_INFO_ATTR, {"method": cfg.method, "density": density})
        nnz = [int(mask.sum()) for _, mask in new.masked_parameters()]
        records.append(LayerRecord(
            name=name, layer_type=plan.layer_types[name], shape=(out, fan_in), method=cfg.method,
            density=density, nnz=sum(nnz), budget=nnz_budget(density, out * fan_in), error=fact.error,
            relative_error=fact.relative_error, magnitude_relative_error=result.magnitude_relative_error,
            error_vs_magnitude=fact.error / result.magnitude_error if result.magnitude_error > 0 else math.nan,
            seconds=result.seconds + time.perf_counter() - t0, pruned_type=type(new).__name__,
            first_nnz=nnz[0], second_nnz=nnz[1] if len(nnz) > 1 else None, rank=result.rank))
    return records


def prune(
    model: nn.Module,
    config: PruneConfig | float | None = None,
    method: str | None = None,
    *,
    calibration: Iterable | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    grams: Mapping[str, Tensor] | None = None,
    executor: Executor | None = None,
    progress: bool = True,
    **config_fields: Any,
) -> PruneReport:
    """One-shot prune ``model`` in place: every target layer becomes a masked pruned module.

    Args:
        model: any ``nn.Module`` (torchvision/timm CNNs and ViTs, HF causal LMs, ...).
        config: a :class:`~dsf_lightning.config.PruneConfig`, or its ``density`` (positional or
            ``density=``): then ``method`` (default ``"dsf"``) and any other ``PruneConfig`` field as keyword
            arguments (``include``, ``exclude``, ``family``, ``densities``, ``factorization_options``,
            ``forward_mode``, ``storage``, ...): ``prune(model, 0.3)``, ``prune(model, density=0.3,
            method="wanda", calibration=...)`` and ``prune(model, PruneConfig(0.3))`` are the same call.
        calibration: batches for layer-wise pruning (all of them, or ``config.calibration_batches``);
            input Grams of all targets are recorded in one pass (eval mode, no grad). ``None``:
            data-free projection (``G = I``).
        forward: ``forward(model, batch)`` running one batch; default :func:`default_forward`.
        grams: precomputed mean input Grams ``{target name: (fan_in, fan_in)}`` instead of ``calibration``
            (e.g. recorded per rank and all-reduced); must cover every target.
        executor: solves all :class:`LayerJob` s at once (e.g. split across ranks); default: one after the
            other, here, with a progress bar (``progress``).

    Returns:
        :class:`~dsf_lightning.report.PruneReport`. The structure is readable with
        :func:`~dsf_lightning.structure.structure_spec`.

    Raises:
        ValueError: bad arguments, no targets, an already pruned layer, a method needing calibration
            without it, a density too small for some layer: all before the model changes.
    """
    if calibration is not None and grams is not None:
        raise ValueError("pass either calibration or grams, not both")
    given = calibration is not None or grams is not None
    if isinstance(config, PruneConfig):
        if method is not None or config_fields:
            raise ValueError("pass either a PruneConfig or density/method/keyword fields, not both")
    else:
        if "density" in config_fields:
            if config is not None:
                raise ValueError(f"density given twice: {config!r} (positional) and density="
                                 f"{config_fields['density']!r}")
            config = config_fields.pop("density")
        if config is None:
            raise ValueError("prune needs a density: prune(model, 0.5), prune(model, density=0.5) or "
                             "prune(model, PruneConfig(density=0.5, ...))")
        config_fields.setdefault("calibration_batches", None if given else 0)
        config = PruneConfig(density=config, method=method or "dsf", **config_fields)
    if given != config.calibrated:
        raise ValueError(f"calibration_batches={config.calibration_batches} but calibration data was "
                         f"{'given' if given else 'not given'}: 0 means data-free, None or N > 0 layer-wise")
    plan = plan_prune(model, config)
    start = time.perf_counter()
    report = PruneReport(method=config.method, family=plan.family, density=config.density, skipped=plan.skipped)
    if config.sequential:
        if calibration is None:
            raise ValueError("sequential=True records Grams block by block: pass calibration=<batches>, not grams")
        from dsf_lightning.sequential import prune_blocks  # imports Lightning's batch mover

        with all_or_nothing(model) as undo:
            report.layers, report.calibration_tokens, report.working_set_bytes = prune_blocks(
                model, plan, islice(calibration, config.calibration_batches), forward=forward, executor=executor,
                progress=progress, undo=undo)
        report.seconds = time.perf_counter() - start
        return report
    if calibration is not None:
        rec = record_grams(model, plan.targets, calibration, forward, limit=config.calibration_batches)
        grams, report.calibration_tokens = rec.grams, rec.counts
    plan = allocate_densities(plan, grams)
    jobs = layer_jobs(plan, grams)
    try:
        results = executor(jobs) if executor is not None else solve_serially(jobs, progress)
    finally:
        jobs.clear()  # the float32 copies of the weights
    with all_or_nothing(model) as undo:
        report.layers = install(model, plan, results, undo)
    report.seconds = time.perf_counter() - start
    return report
