"""Layer jobs and their solving: one layer's problem, its result, equal-shape batches, the serial executor.

An executor (``executor(jobs) -> {name: LayerResult}``) solves the :class:`LayerJob` s that
:func:`~dsf_lightning.pipeline.plan.layer_jobs` builds. Small layers of one shape pay more in per-operation
overhead than in arithmetic, so :func:`batch_groups` puts jobs that can share one call together (same
method, shape, density, options and Gram presence; the method has a batch function; the layer's cost and
the stack below their caps) and :func:`solve_group` runs each group in one call of the method's
``batch_fn`` (:mod:`dsf_lightning.factorization`). Results are per layer and equal one call per layer
(to float rounding; see the method's batch function); a group's seconds are split evenly over its
layers. Measurements in benchmarks/RESULTS.md, "Batching layers of one shape".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from dsf_lightning.factorization import Factorization, factorize, factorize_batch, get_method

__all__ = [
    "BATCH_MAX_COST",
    "BATCH_MAX_STACK",
    "Executor",
    "LayerJob",
    "LayerResult",
    "batch_groups",
    "solve_group",
    "solve_serially",
]

#: Layers whose :attr:`LayerJob.cost` (``out * fan_in * min(out, fan_in)``, the arithmetic of one GEMM of
#: the factorization) is at most this are batched: 128x256 and 64x576 gained, 256x256, 128x576 and
#: 128x1152 did not (their GEMMs dominate; benchmarks/RESULTS.md, "Batching layers of one shape").
BATCH_MAX_COST = 1 << 22
#: A batch stacks at most this many weights (1 MiB of float32); more layers start another batch. Stacks
#: past it gained nothing in the measurements: their elementwise passes leave the CPU's caches.
BATCH_MAX_STACK = 1 << 18


@dataclass
class LayerJob:
    """One layer's factorization problem, as an executor receives it.

    ``weight`` is the ``(out, fan_in)`` float32 matrix on the layer's device, ``gram`` the mean input
    Gram (float32, same device) or ``None`` (data-free). :meth:`run` solves it; ``cost`` is a relative
    work estimate (``out * fan_in * min(out, fan_in)``) for balancing jobs across workers.
    """

    name: str
    method: str
    weight: Tensor
    density: float
    gram: Tensor | None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def cost(self) -> int:
        out, fan_in = self.weight.shape
        return out * fan_in * min(out, fan_in)

    def batch_key(self) -> tuple | None:
        """Jobs with equal keys can be solved in one batch call; ``None``: this one runs alone (the method
        has no batch function, or the layer's :attr:`cost` is above :data:`BATCH_MAX_COST`)."""
        if get_method(self.method).batch_fn is None or self.cost > BATCH_MAX_COST:
            return None
        w = self.weight
        return (self.method, tuple(w.shape), w.dtype, w.device, self.density, self.gram is not None,
                repr(sorted(self.options.items())))

    def run(self) -> LayerResult:
        """Factorize with ``method`` and with magnitude pruning (the error baseline), timed."""
        t0 = time.perf_counter()
        with torch.no_grad():
            fact = factorize(self.method, self.weight, self.density, self.gram, name=self.name, **self.options)
            mag = self.magnitude(fact)
        return LayerResult(fact, mag.error, mag.relative_error, time.perf_counter() - t0)

    def magnitude(self, fact: Factorization) -> Factorization:
        """Magnitude pruning of this layer at its density (the error baseline); ``fact`` itself if that is
        this job's method."""
        return fact if self.method == "magnitude" else factorize("magnitude", self.weight, self.density, self.gram,
                                                                 name=self.name)


@dataclass
class LayerResult:
    """A solved :class:`LayerJob`: the factorization, magnitude pruning's error (absolute and relative) at
    the same density, the seconds it took (a batch's seconds split evenly over its layers), and the process
    that solved it (``None``: this one)."""

    factorization: Factorization
    magnitude_error: float
    magnitude_relative_error: float
    seconds: float
    rank: int | None = None


#: ``executor(jobs) -> {name: LayerResult}``: solves every job (e.g. split across ranks and broadcast).
Executor = Callable[[Sequence[LayerJob]], Mapping[str, LayerResult]]


def batch_groups(jobs: Sequence[LayerJob]) -> list[list[LayerJob]]:
    """``jobs`` split into groups to solve in one call each, ordered by their first job: jobs with equal
    :meth:`LayerJob.batch_key` share a group of at most ``max(1, BATCH_MAX_STACK // numel)`` layers (a
    full group starts the next one); every other job is a group of one."""
    groups: list[list[LayerJob]] = []
    open_groups: dict[tuple, list[LayerJob]] = {}
    for job in jobs:
        key = job.batch_key()
        group = None if key is None else open_groups.get(key)
        if group is None or (len(group) + 1) * job.weight.numel() > BATCH_MAX_STACK:
            group = []
            groups.append(group)
            if key is not None:
                open_groups[key] = group
        group.append(job)
    return groups


def solve_group(group: Sequence[LayerJob]) -> dict[str, LayerResult]:
    """Solve one group of :func:`batch_groups`: a single job by :meth:`LayerJob.run`, several by one call of
    their method's batch function (``factorize_batch``) on the stacked weights (and Grams), then magnitude
    pruning per layer."""
    if len(group) == 1:
        return {group[0].name: group[0].run()}
    head = group[0]
    t0 = time.perf_counter()
    with torch.no_grad():
        grams = None if head.gram is None else torch.stack([j.gram for j in group])
        facts = factorize_batch(head.method, torch.stack([j.weight for j in group]), head.density, grams,
                                names=[j.name for j in group], **head.options)
        mags = [j.magnitude(f) for j, f in zip(group, facts)]
    seconds = (time.perf_counter() - t0) / len(group)
    return {j.name: LayerResult(f, m.error, m.relative_error, seconds) for j, f, m in zip(group, facts, mags)}


def solve_serially(jobs: Sequence[LayerJob], progress: bool = True) -> dict[str, LayerResult]:
    """Solve ``jobs`` in this process, group by group (:func:`batch_groups`), with a progress bar over layers;
    the results come back in the order of ``jobs``."""
    solved: dict[str, LayerResult] = {}
    bar = tqdm(total=len(jobs), desc=f"prune {jobs[0].method if jobs else ''}", unit="layer", disable=not progress)
    for group in batch_groups(jobs):
        bar.set_postfix_str(group[0].name if len(group) == 1 else f"{group[0].name} +{len(group) - 1}",
                            refresh=False)
        solved.update(solve_group(group))
        bar.update(len(group))
    bar.close()
    return {j.name: solved[j.name] for j in jobs}
