"""Pruning across processes: all-reduced Grams, layers split across ranks by cost, factors broadcast.

Every rank records Grams on its own shard of the calibration data; :func:`all_reduce_grams` sums them
as count-weighted sums, so every rank holds the Grams of all the data. :func:`distributed_executor`
splits the layer jobs across ranks (:func:`balance_layers`, greedy by ``out * fan_in * min(out, fan_in)``,
per job), every rank solves its share (small layers of one shape in batches within the share, as the
serial executor does: :func:`~dsf_lightning.pipeline.jobs.batch_groups`), and each result is broadcast from its
owner (:func:`broadcast_result`), so every rank builds bit-identical modules.

Plain ``torch.distributed`` collectives on the default process group: the same code serves Lightning
strategies (DDP, one process per device) and ``torchrun`` scripts. Nothing here runs without an
initialized process group of more than one process (:func:`world`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from dsf_lightning.factorization import Factorization
from dsf_lightning.pipeline.calibration import GramAccumulator
from dsf_lightning.pipeline.jobs import Executor, LayerJob, LayerResult, batch_groups, solve_group

__all__ = ["all_reduce_grams", "balance_layers", "broadcast_result", "collective", "distributed_executor",
           "is_sharded", "world"]

_FACTOR_FIELDS = ("first", "first_mask", "second", "second_mask")


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def comm_device(device: torch.device | None = None) -> torch.device:
    """Where collectives of the default group run: the CPU for gloo; for NCCL ``device`` if it is a CUDA
    device, else the current CUDA device."""
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    return device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Collectives of the prune: a failure (a peer that raised, was killed or lost its connection: gloo
    notices at once; NCCL only at the process group's timeout) becomes an error naming this rank and the
    step, so the surviving ranks exit with the cause instead of a bare transport error."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed.DistError is one too
        rank, size = world()
        raise RuntimeError(f"rank {rank} of {size}: {what} failed: another rank stopped (it raised, was killed or "
                           f"lost its connection; its own output has the cause) [{type(e).__name__}: "
                           f"{str(e)[:200]}]") from e


def all_reduce_grams(accumulators: Mapping[str, GramAccumulator], device: torch.device) -> dict[str, GramAccumulator]:
    """The accumulators of all ranks merged (count-weighted): every rank gets the same Grams.

    Names are reduced in the order of ``accumulators``, which must be the same on every rank."""
    comm = comm_device(device)
    merged = {}
    for name, acc in accumulators.items():
        total, count = acc.to_sum()
        total = total.to(comm)
        n = torch.tensor([count], dtype=torch.float64, device=comm)
        with collective(f"the all-reduce of layer {name!r}'s calibration Gram"):
            dist.all_reduce(total)
            dist.all_reduce(n)
        merged[name] = GramAccumulator.from_sum(total, int(n.item()), device=device)
    return merged


def is_sharded(loader: object) -> bool:
    """Whether a ``DataLoader`` already gives each rank its own shard (a ``DistributedSampler``)."""
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    return isinstance(sampler, DistributedSampler) or isinstance(getattr(batch_sampler, "sampler", None),
                                                                 DistributedSampler)


def balance_layers(costs: Sequence[int], world_size: int) -> list[int]:
    """Owner rank of each job: greedy longest-processing-time (largest cost first to the least
    loaded rank; ties to the lower rank), deterministic so every rank computes the same split."""
    load = [0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def broadcast_result(result: LayerResult | None, src: int, device: torch.device) -> LayerResult:
    """``src``'s :class:`~dsf_lightning.pipeline.jobs.LayerResult` on every rank: metadata as an object, tensors by
    ``dist.broadcast`` (bool masks as uint8), bit for bit. ``result`` is only read on ``src``."""
    rank, _ = world()
    comm = comm_device(device)
    if rank == src:
        f = result.factorization
        tensors = {n: getattr(f, n) for n in _FACTOR_FIELDS}
        meta = {"shapes": {n: None if t is None else (tuple(t.shape), str(t.dtype)) for n, t in tensors.items()},
                "method": f.method, "error": f.error, "relative_error": f.relative_error,
                "info": {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in f.info.items()},
                "magnitude": (result.magnitude_error, result.magnitude_relative_error), "seconds": result.seconds}
    box = [meta if rank == src else None]
    with collective(f"the broadcast of a layer's factors from rank {src}"):
        dist.broadcast_object_list(box, src=src, device=comm if comm.type != "cpu" else None)
    meta = box[0]
    out: dict[str, Tensor | None] = {}
    for n in _FACTOR_FIELDS:
        if meta["shapes"][n] is None:
            out[n] = None
            continue
        shape, dtype_s = meta["shapes"][n]
        dtype = getattr(torch, dtype_s.removeprefix("torch."))
        wire = torch.uint8 if dtype == torch.bool else dtype
        if rank == src:
            t = tensors[n].detach().to(device=comm, dtype=wire).contiguous()
        else:
            t = torch.empty(shape, dtype=wire, device=comm)
        with collective(f"the broadcast of a layer's {n} from rank {src}"):
            dist.broadcast(t, src=src)
        out[n] = t.to(device=device, dtype=dtype)
    if rank == src:  # the owner keeps its own tensors: identical values, no copy needed
        fact = result.factorization
    else:
        fact = Factorization(**out, method=meta["method"], error=meta["error"],
                             relative_error=meta["relative_error"], info=meta["info"])
    mag, mag_rel = meta["magnitude"]
    return LayerResult(fact, mag, mag_rel, meta["seconds"], rank=src)


def distributed_executor(progress: bool = True) -> Executor:
    """An executor for :func:`~dsf_lightning.pipeline.entry.prune` that splits the jobs across the ranks of the
    default process group and broadcasts every result to every rank (progress bar on rank zero).

    The split is per job (:func:`balance_layers`); each rank then solves its share in the groups of
    :func:`~dsf_lightning.pipeline.jobs.batch_groups`, so equal-shape small layers that land on one rank share a
    batch call."""
    rank, world_size = world()

    def run(jobs: Sequence[LayerJob]) -> dict[str, LayerResult]:
        owners = balance_layers([j.cost for j in jobs], world_size)
        mine = [j for j, o in zip(jobs, owners) if o == rank]
        solved: dict[str, LayerResult] = {}
        bar = tqdm(total=len(mine), desc=f"prune {jobs[0].method if jobs else ''} (rank {rank}: {len(mine)}/"
                   f"{len(jobs)} layers)", unit="layer", disable=not (progress and rank == 0))
        for group in batch_groups(mine):
            solved.update(solve_group(group))
            bar.update(len(group))
        bar.close()
        return {j.name: broadcast_result(solved.get(j.name), o, j.weight.device) for j, o in zip(jobs, owners)}

    return run
