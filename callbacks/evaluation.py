"""Validation metrics of a LightningModule outside Lightning's loops, reduced as Lightning reduces them.

:func:`evaluate_module` runs the module's own ``validation_step`` over the trainer's validation
dataloaders (``limit_val_batches`` respected) with ``pl_module.log`` temporarily replaced by a
:class:`LogRecorder`, so no validation hooks, checkpoints or early stopping are triggered. Logged
values are reduced as Lightning reduces epoch-level metrics: batch-size weighted mean by default,
``reduce_fx`` ``"sum"``/``"max"``/``"min"``, torchmetrics ``Metric`` objects ``compute``-d, and,
under DDP, over all ranks.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_debug
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from dsf_lightning.pipeline.distributed import comm_device, world

__all__ = ["LogRecorder", "evaluate_module"]

_REDUCE = {"mean": "mean", "sum": "sum", "max": "max", "min": "min", "amax": "max", "amin": "min"}


def _is_metric(v: Any) -> bool:
    return hasattr(v, "compute") and hasattr(v, "reset") and hasattr(v, "update")


class LogRecorder:
    """Stands in for ``LightningModule.log`` during :func:`evaluate_module`; keeps every value per name
    with its batch size and reduce function, and reduces them in :meth:`result`."""

    def __init__(self) -> None:
        self.values: dict[str, list[tuple[Any, float]]] = {}
        self.reduce: dict[str, str] = {}
        self.batch: Any = None
        self.suffix = ""

    def log(self, name: str, value: Any, prog_bar: bool = False, logger: bool | None = None,
            on_step: bool | None = None, on_epoch: bool | None = None, reduce_fx: Any = "mean",
            enable_graph: bool = False, sync_dist: bool = False, sync_dist_group: Any = None,
            add_dataloader_idx: bool = True, batch_size: int | None = None, metric_attribute: str | None = None,
            rank_zero_only: bool = False) -> None:
        """``LightningModule.log``'s signature; epoch-level values only (``on_epoch=False`` is skipped)."""
        if logger is False or on_epoch is False:
            return
        key = name + (self.suffix if add_dataloader_idx else "")
        fx = _REDUCE.get(str(getattr(reduce_fx, "__name__", reduce_fx)))
        if fx is None:
            rank_zero_debug(f"evaluate_module: metric {name!r} has an unsupported reduce_fx; using mean")
            fx = "mean"
        if batch_size is None:
            try:
                batch_size = extract_batch_size(self.batch)
            except Exception:  # noqa: BLE001 -- Lightning falls back to 1 as well
                batch_size = 1
        self.reduce[key] = fx
        self.values.setdefault(key, []).append((value, float(batch_size)))

    def result(self, world_size: int = 1) -> dict[str, float]:
        """Every name reduced over its values (and over the ranks of the default group if ``world_size > 1``)."""
        out: dict[str, float] = {}
        for key in sorted(self.values):  # same order on every rank: collectives below
            entries, fx = self.values[key], self.reduce[key]
            last = entries[-1][0]
            if _is_metric(last):
                out[key] = float(last.compute())  # torchmetrics syncs across ranks itself
                last.reset()
                continue
            vals = torch.tensor([float(v.detach().float().mean()) if isinstance(v, Tensor) else float(v)
                                 for v, _ in entries], dtype=torch.float64)
            w = torch.tensor([b for _, b in entries], dtype=torch.float64)
            one = torch.tensor(1.0, dtype=torch.float64)
            if fx == "mean":
                agg = torch.stack([(vals * w).sum(), w.sum()])
            elif fx == "sum":
                agg = torch.stack([vals.sum(), one])
            else:
                agg = torch.stack([vals.max() if fx == "max" else vals.min(), one])
            if world_size > 1:
                agg = agg.to(comm_device())
                if fx in ("max", "min"):
                    dist.all_reduce(agg[:1], op=dist.ReduceOp.MAX if fx == "max" else dist.ReduceOp.MIN)
                else:
                    dist.all_reduce(agg)
                agg = agg.cpu()
            out[key] = float(agg[0] / agg[1]) if fx == "mean" else float(agg[0])
        return out


def _val_loaders(trainer: pl.Trainer) -> tuple[list[Any], list[int | float]]:
    """The trainer's validation dataloaders, prepared as Lightning prepares them (DDP sampler, limits)."""
    trainer.fit_loop.epoch_loop.val_loop.setup_data()
    loaders = trainer.val_dataloaders
    if loaders is None:
        return [], []
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    return list(loaders), list(trainer.num_val_batches)


def evaluate_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    """Run the module's ``validation_step`` over the trainer's validation data (eval mode, no grad,
    the precision plugin's val context) and return what it logged, reduced per name as Lightning
    reduces epoch metrics (and across ranks). RNG state and training flags are left as they were."""
    if not is_overridden("validation_step", pl_module):
        return {}
    loaders, limits = _val_loaders(trainer)
    if not loaders:
        return {}
    rec = LogRecorder()
    modes = {m: m.training for m in pl_module.modules()}
    had_log = "log" in pl_module.__dict__
    old_log = pl_module.__dict__.get("log")
    pl_module.log = rec.log  # type: ignore[method-assign]
    pl_module.eval()
    try:
        with torch.no_grad(), isolate_rng(), trainer.precision_plugin.val_step_context():
            for i, loader in enumerate(loaders):
                rec.suffix = f"/dataloader_idx_{i}" if len(loaders) > 1 else ""
                limit = limits[i] if i < len(limits) else math.inf
                for b, batch in enumerate(loader):
                    if b >= limit:
                        break
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=i)
                    rec.batch = batch
                    pl_module.validation_step(*((batch, b, i) if len(loaders) > 1 else (batch, b)))
    finally:
        if had_log:
            pl_module.log = old_log  # type: ignore[method-assign]
        else:
            del pl_module.log
        for m, mode in modes.items():
            m.training = mode
    return rec.result(world()[1])
