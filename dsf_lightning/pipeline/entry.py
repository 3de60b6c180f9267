"""The one entry point of a prune: validate the arguments, seed, pick the executor, the all-reduce and the runner.

>>> report = prune(model, 0.3, "dsf", calibration=loader)             # plain PyTorch
>>> report = prune(model, density=0.3, method="wanda", calibration=loader)
>>> report = prune(model, PruneConfig(density=0.3, exclude=["fc"]))    # the same, from a config

The steps, in order: :func:`~dsf_lightning.pipeline.plan.plan_prune` (every check that needs the model,
before any data is touched), then one runner -- :func:`~dsf_lightning.pipeline.one_pass.run_one_pass` or,
with ``sequential=True``, :func:`~dsf_lightning.pipeline.blocks.run_blocks` -- which records Grams
(:mod:`~dsf_lightning.pipeline.calibration`), spreads the budget, solves the
:class:`~dsf_lightning.pipeline.jobs.LayerJob` s and installs the pruned modules
(:mod:`~dsf_lightning.pipeline.install`), all or nothing. ``DSFPruneCallback`` builds the structure
first and calls :func:`run_prune` from its hook; the LLM recipe and the benchmarks call :func:`prune`.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dsf_lightning.config import PruneConfig
from dsf_lightning.pipeline.blocks import run_blocks
from dsf_lightning.pipeline.calibration import default_forward, no_reduce
from dsf_lightning.pipeline.distributed import all_reduce_grams, distributed_executor, world
from dsf_lightning.pipeline.install import all_or_nothing
from dsf_lightning.pipeline.jobs import Executor, solve_serially
from dsf_lightning.pipeline.one_pass import run_one_pass
from dsf_lightning.pipeline.plan import PrunePlan, plan_prune
from dsf_lightning.pipeline.report import PruneReport

__all__ = ["prune", "run_prune", "seeded"]


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
        forward: ``forward(model, batch)`` running one batch; default
            :func:`~dsf_lightning.pipeline.calibration.default_forward`.
        grams: precomputed mean input Grams ``{target name: (fan_in, fan_in)}`` instead of ``calibration``
            (e.g. recorded per rank and all-reduced); must cover every target.
        executor: solves a list of :class:`~dsf_lightning.pipeline.jobs.LayerJob` s; default: split across the
            ranks under ``torch.distributed``, else one group after the other here, with a progress bar
            (``progress``).

    Returns:
        :class:`~dsf_lightning.pipeline.report.PruneReport`. The structure is readable with
        :func:`~dsf_lightning.persistence.structure.structure_spec`.

    Raises:
        ValueError: bad arguments, no targets, an already pruned layer, a method needing calibration
            without it, a density too small for some layer: all before the model changes.
    """
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
    given = calibration is not None or grams is not None
    if given != config.calibrated:
        raise ValueError(f"calibration_batches={config.calibration_batches} but calibration data was "
                         f"{'given' if given else 'not given'}: 0 means data-free, None or N > 0 layer-wise")
    return run_prune(model, plan_prune(model, config), calibration=calibration, forward=forward, grams=grams,
                     executor=executor, progress=progress)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | None = None) -> Iterator[None]:
    """Inside the block torch's RNG (the CPU's, and ``device``'s if it is CUDA) starts from ``seed``; on leaving,
    torch's, Python's and NumPy's RNGs are as they were, so a prune does not shift the training's randomness."""
    devices = [device] if device is not None and device.type == "cuda" else []
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def run_prune(model: nn.Module, plan: PrunePlan, *, calibration: Iterable | None = None,
              forward: Callable[[nn.Module, Any], Any] | None = None, grams: Mapping[str, Tensor] | None = None,
              executor: Executor | None = None, progress: bool = True) -> PruneReport:
    """Run ``plan`` on ``model`` in place (the arguments as in :func:`prune`): seeded by ``config.seed``; under
    ``torch.distributed`` the Grams all-reduced and the layers split across the ranks (progress on rank zero);
    the runner ``config.sequential`` asks for; all or nothing."""
    cfg = plan.config
    if calibration is not None and grams is not None:
        raise ValueError("pass either calibration or grams, not both")
    if cfg.sequential and calibration is None:
        raise ValueError("sequential=True records Grams block by block: pass calibration=<batches>, not grams")
    rank, size = world()
    progress = progress and rank == 0
    if executor is None:  # by block, the bar is over blocks
        executor = distributed_executor(progress) if size > 1 else \
            functools.partial(solve_serially, progress=progress and not cfg.sequential)
    reduce = all_reduce_grams if size > 1 else no_reduce
    forward = forward or default_forward
    batches = None if calibration is None else islice(calibration, cfg.calibration_batches)
    device = next(model.parameters()).device
    start = time.perf_counter()
    with seeded(cfg.seed, device), all_or_nothing(model, exposure=plan.exposure) as undo:
        if cfg.sequential:
            report = run_blocks(model, plan, batches, forward=forward, executor=executor, reduce=reduce, undo=undo,
                                progress=progress)
        else:
            report = run_one_pass(model, plan, batches, forward=forward, executor=executor, reduce=reduce,
                                  grams=grams, undo=undo)
    report.seconds = time.perf_counter() - start
    return report
