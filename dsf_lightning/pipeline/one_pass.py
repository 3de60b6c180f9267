"""The one-pass runner: every target's input Gram recorded in one pass over the data, then every layer solved.

The Grams are those of the model as it was before the prune (dense inputs), as in the paper's vision
experiments; decoder-block models are usually pruned block by block instead (:mod:`.blocks`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from dsf_lightning.pipeline.calibration import Reduce, no_reduce, record_grams
from dsf_lightning.pipeline.install import Undo, install
from dsf_lightning.pipeline.jobs import Executor
from dsf_lightning.pipeline.plan import PrunePlan, allocate_densities, layer_jobs
from dsf_lightning.pipeline.report import PruneReport

__all__ = ["run_one_pass"]


def run_one_pass(model: nn.Module, plan: PrunePlan, batches: Iterable | None, *,
                 forward: Callable[[nn.Module, Any], Any], executor: Executor, reduce: Reduce = no_reduce,
                 grams: Mapping[str, Tensor] | None = None, undo: Undo | None = None) -> PruneReport:
    """Prune ``plan``'s targets in place: Grams over ``batches`` (merged over processes by ``reduce``), or the
    given ``grams``, or none (data-free); the allocation; every layer solved by ``executor``; installed."""
    report = plan.new_report()
    if batches is not None:
        rec = record_grams(model, plan.targets, batches, forward)
        accs = reduce(rec.accumulators, next(model.parameters()).device)
        grams = {n: a.gram for n, a in accs.items()}
        report.calibration_tokens = {n: a.count for n, a in accs.items()}
    plan = allocate_densities(plan, grams)
    jobs = layer_jobs(plan, grams)
    try:
        results = executor(jobs)
    finally:
        jobs.clear()  # the float32 copies of the weights
    report.layers = install(model, plan, results, undo)
    return report
