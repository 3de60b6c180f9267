"""``DSFPruneCallback``: one-shot prune a LightningModule when ``fit`` starts, then fine-tune it.

>>> trainer = Trainer(callbacks=[DSFPruneCallback(density=0.1)], logger=WandbLogger())
>>> trainer.fit(module, datamodule)        # prune in setup, evaluate, fine-tune, evaluate

Lightning 2.x calls, for ``fit``: callback/module ``setup`` -> ``configure_model`` -> restore from
``ckpt_path`` -> ``strategy.setup`` (device move, DDP wrap, optimizers) -> ``on_fit_start`` ->
sanity check -> train. The callback therefore

* ``setup(stage="fit")``: checks its arguments against the model, optionally evaluates the dense
  model (``dense/<metric>``), records calibration Grams, factorizes and swaps the pruned modules
  in -- before optimizers and DDP exist. On resume (``fit(ckpt_path=...)``) it instead rebuilds
  the pruned structure from the checkpoint's ``"dsf_structure"`` and lets Lightning load weights.
* ``on_fit_start``: evaluates the pruned model (``pre_finetune/<metric>``), then optionally
  recalibrates BatchNorm statistics (``bn_recalibrated/<metric>``). Skipped on resume.
* ``on_train_end``: evaluates the fine-tuned model (``post_finetune/<metric>``).
* ``on_save_checkpoint``: stores the structure spec in ``checkpoint["dsf_structure"]``.

Device: in ``setup`` the module may still be on the CPU. The callback moves it to
``trainer.strategy.root_device`` (what ``strategy.setup`` would do next anyway) and calibrates,
factorizes and evaluates there; batches go through ``trainer.strategy.batch_to_device`` (the
module's batch transfer hooks included).

Evaluation runs the module's own ``validation_step`` over the trainer's validation dataloaders
(``limit_val_batches`` respected) outside Lightning's loops, with ``pl_module.log`` temporarily
replaced by a recorder, so no validation hooks, checkpoints or early stopping are triggered.
Logged values are reduced as Lightning reduces epoch-level metrics (batch-size weighted mean by
default; ``reduce_fx`` ``"sum"``/``"max"``/``"min"`` too; torchmetrics ``Metric`` objects are
``compute``-d) and, under DDP, over all ranks. The names are the module's own validation names
with a prefix, logged through ``trainer.loggers`` on rank zero (W&B, CSV, TensorBoard alike).

DDP: every rank records Grams on its own shard of the calibration data (a ``DistributedSampler``
is injected as Lightning does for training); the Grams are all-reduced as count-weighted sums;
layers are split across ranks by cost (``out * fan_in * min(out, fan_in)``, greedy largest first)
and every rank factorizes its share; each layer's factors and masks are broadcast from their owner,
so every rank builds bit-identical modules.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dsf_lightning.calibration import GramAccumulator, InputGramRecorder
from dsf_lightning.factorization import FACTORIZERS, Factorization
from dsf_lightning.surgery import (
    NEEDS_CALIBRATION,
    LayerJob,
    LayerResult,
    PruneReport,
    _check_density,
    _check_options,
    _same_structure,
    apply_structure_spec,
    default_forward,
    plan_prune,
    prune,
    structure_spec,
)

__all__ = ["DSFPruneCallback", "load_pruned_checkpoint"]

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "dsf_structure"


class DSFPruneCallback(Callback):
    """One-shot prune the LightningModule at the start of ``fit`` and log before/after metrics.

    Args:
        density: kept fraction in ``(0, 1]`` of every target layer (both DSF factors together).
        method: ``"dsf"`` (double sparse factorization), ``"magnitude"``, ``"wanda"`` (needs
            calibration), ``"admm"`` (or any :data:`~dsf_lightning.factorization.FACTORIZERS` name).
        calibration_batches: ``0``: data-free projection (``G = I``); ``n > 0``: layer-wise pruning
            with input Grams over ``n`` batches (per rank under DDP).
        calibration_loader: where calibration batches come from; default: the trainer's train
            dataloader (from the datamodule or ``fit(train_dataloaders=...)``).
        calibration_forward: ``forward(pl_module, batch)`` running one (device-moved) batch for
            calibration and BatchNorm recalibration; default
            :func:`~dsf_lightning.surgery.default_forward` (``pl_module(batch[0])`` for a tuple,
            ``pl_module(**batch)`` for a mapping, ``pl_module(batch)`` otherwise).
        include, exclude, preset: target selection (:func:`~dsf_lightning.surgery.find_targets`),
            names as in ``pl_module.named_modules()`` (e.g. ``"model.layer1.0.conv1"``).
        densities: per-layer density overrides ``{layer name: density}``.
        factorization_options: keyword options of the method (e.g. ``{"outer_iters": 10}``).
        fixed_mask: DSF's "one mask fix" (``factorization_options["fixed_mask"] = True``).
        seed: seeds the RNG during calibration/factorization (isolated: the training RNG stream is
            left as it was) and is DSF's ``seed`` option (of the fixed mask) unless set there.
        forward_mode, balance_norms: of the pruned modules (:func:`~dsf_lightning.surgery.prune`).
        bn_recalibration_batches: ``n > 0``: after the pre-fine-tuning evaluation, reset every
            BatchNorm's running stats and re-estimate them (cumulative average) over ``n`` train
            batches in train mode without grad; then evaluate again as ``bn_recalibrated/<metric>``.
        evaluate: log ``pre_finetune/<metric>`` and ``post_finetune/<metric>``.
        log_dense: also log the dense model's metrics (``dense/<metric>``) before pruning.
        log_layer_scalars: for loggers other than W&B (which get the ``dsf/layers`` table), log
            per-layer scalars ``dsf/layers/<name>/<field>``; off by default (many columns).
        progress: tqdm bar over layers (rank zero only).
    """

    def __init__(
        self,
        density: float,
        method: str = "dsf",
        *,
        calibration_batches: int = 0,
        calibration_loader: Iterable | None = None,
        calibration_forward: Callable[[pl.LightningModule, Any], Any] | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        preset: Literal["vision", "llm"] | None = None,
        densities: dict[str, float] | None = None,
        factorization_options: dict[str, Any] | None = None,
        fixed_mask: bool = False,
        seed: int = 0,
        forward_mode: Literal["auto", "fused", "sequential"] = "auto",
        balance_norms: bool = True,
        bn_recalibration_batches: int = 0,
        evaluate: bool = True,
        log_dense: bool = False,
        log_layer_scalars: bool = False,
        progress: bool = True,
    ) -> None:
        super().__init__()
        self.density = _check_density(density, "density")
        if method not in FACTORIZERS:
            raise ValueError(f"unknown method {method!r}; valid methods: {sorted(FACTORIZERS)}")
        self.method = method
        for what, n in (("calibration_batches", calibration_batches),
                        ("bn_recalibration_batches", bn_recalibration_batches)):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{what} must be an int >= 0, got {n!r}")
        if method in NEEDS_CALIBRATION and calibration_batches == 0:
            raise ValueError(f"method {method!r} needs calibration data: set calibration_batches > 0")
        if calibration_loader is not None and calibration_batches == 0:
            raise ValueError("calibration_loader is given but calibration_batches=0 (data-free); "
                             "set calibration_batches > 0 to use it")
        for n, d in (densities or {}).items():
            _check_density(d, f"densities[{n!r}]")
        opts = dict(factorization_options or {})
        if fixed_mask:
            if method != "dsf":
                raise ValueError(f"fixed_mask applies to method 'dsf' only, not {method!r}")
            opts["fixed_mask"] = True
        if method == "dsf":
            opts.setdefault("seed", seed)
        _check_options(method, opts)
        if forward_mode not in ("auto", "fused", "sequential"):
            raise ValueError(f"forward_mode must be 'auto', 'fused' or 'sequential', got {forward_mode!r}")
        self.calibration_batches = calibration_batches
        self.calibration_loader = calibration_loader
        self.calibration_forward = calibration_forward
        self.include, self.exclude, self.preset = include, exclude, preset
        self.densities = dict(densities or {})
        self.factorization_options = opts
        self.seed = seed
        self.forward_mode, self.balance_norms = forward_mode, balance_norms
        self.bn_recalibration_batches = bn_recalibration_batches
        self.evaluate, self.log_dense, self.log_layer_scalars = evaluate, log_dense, log_layer_scalars
        self.progress = progress
        # results (read them after fit)
        self.report: PruneReport | None = None
        self.layer_rows: list[dict[str, Any]] = []
        self.metrics: dict[str, float] = {}
        self.owned_layers: list[str] = []  # layers this rank factorized (all of them without DDP)
        self.factorization_runs = 0
        self.resumed = False
        self._pruned = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, density=self.density)

    # ------------------------------------------------------------------------------------------
    # hooks
    # ------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """``stage="fit"``: prune (or, resuming, rebuild the pruned structure of the checkpoint)."""
        if stage != "fit":
            return
        spec_now = structure_spec(pl_module)
        if self._pruned and spec_now["modules"]:
            rank_zero_info("DSFPruneCallback: the module is already pruned by this callback; not pruning again")
            return
        ckpt_path, weights_only = _pending_ckpt_path(trainer)
        if ckpt_path:
            self._restore_structure(trainer, pl_module, ckpt_path, weights_only)
            return
        self._prune(trainer, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate the pruned model (``pre_finetune/``); BatchNorm recalibration (``bn_recalibrated/``)."""
        if self.resumed or not self._pruned or getattr(self, "_fit_started", False):
            return
        self._fit_started = True
        if self.evaluate:
            self._log_eval(trainer, pl_module, "pre_finetune")
        if self.bn_recalibration_batches > 0:
            self._recalibrate_bn(trainer, pl_module)
            if self.evaluate:
                self._log_eval(trainer, pl_module, "bn_recalibrated")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate the fine-tuned model (``post_finetune/``)."""
        if self.evaluate and self._pruned:
            self._log_eval(trainer, pl_module, "post_finetune")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Store the pruned structure spec in ``checkpoint["dsf_structure"]``."""
        if self._pruned:
            checkpoint[CHECKPOINT_KEY] = structure_spec(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self._pruned, "method": self.method, "density": self.density,
                "totals": self.report.totals() if self.report is not None else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_state = dict(state_dict)

    # ------------------------------------------------------------------------------------------
    # pruning and resume
    # ------------------------------------------------------------------------------------------
    def _restore_structure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: Any,
                           weights_only: bool | None) -> None:
        checkpoint = pl_load(path, map_location="cpu", weights_only=weights_only)
        spec = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, Mapping) else None
        if spec is None:
            raise ValueError(f"checkpoint {str(path)!r} has no {CHECKPOINT_KEY!r} entry: it was not saved by a run "
                             f"pruned with DSFPruneCallback. To prune a dense checkpoint, load its weights into the "
                             f"module and call trainer.fit without ckpt_path")
        if not _same_structure(pl_module, spec["modules"]):
            apply_structure_spec(pl_module, spec)
        self._pruned = self.resumed = True
        rank_zero_info(f"DSFPruneCallback: rebuilt {len(spec['modules'])} pruned layers from {str(path)!r}; "
                       f"Lightning loads their weights (no factorization)")

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # (1) every check that needs the model, before any data is touched
        plan = plan_prune(pl_module, self.density, self.method, with_calibration=self.calibration_batches > 0,
                          include=self.include, exclude=self.exclude, preset=self.preset,
                          densities=self.densities, forward_mode=self.forward_mode,
                          factorization_options=self.factorization_options)
        unsupported = {n: r for n, r in plan.skipped.items() if "not a supported layer type" in r}
        if unsupported:
            rank_zero_warn(f"DSFPruneCallback: skipping {len(unsupported)} unsupported layer(s) matched by the "
                           f"targets: {unsupported}")
        loader = self._calibration_source(trainer) if self.calibration_batches > 0 else None

        device = trainer.strategy.root_device
        pl_module.to(device)
        if self.log_dense and self.evaluate:
            self._log_eval(trainer, pl_module, "dense")

        with isolate_rng():
            torch.manual_seed(self.seed)
            grams = None
            counts: dict[str, int] = {}
            if loader is not None:
                grams, counts = self._record_grams(trainer, pl_module, plan.targets, loader)
            world = trainer.world_size if _dist_ready() else 1
            executor = self._distributed_executor(trainer, device) if world > 1 else None
            if executor is None:
                self.owned_layers = list(plan.targets)
            report = prune(pl_module, self.density, self.method, grams=grams, include=self.include,
                           exclude=self.exclude, preset=self.preset, densities=self.densities,
                           forward_mode=self.forward_mode, balance_norms=self.balance_norms,
                           progress=self.progress and trainer.is_global_zero and executor is None,
                           factorization_options=self.factorization_options, executor=executor)
        report.calibration_tokens = counts
        self.factorization_runs += 1
        self.report = report
        self._pruned = True
        self.layer_rows = self._layer_rows(pl_module, report)
        self._log_report(trainer, report)

    def _calibration_source(self, trainer: pl.Trainer) -> Iterable:
        if self.calibration_loader is not None:
            loader = self.calibration_loader
        else:
            from lightning.pytorch.trainer.connectors.data_connector import _request_dataloader

            source = trainer.fit_loop._data_source
            if not source.is_defined():
                raise ValueError("calibration_batches > 0 but there is no train dataloader to calibrate on: "
                                 "pass calibration_loader=... or give fit() training data")
            loader = _request_dataloader(source)
        if isinstance(loader, DataLoader) and _dist_ready() and trainer.world_size > 1:
            from lightning.pytorch.trainer.states import RunningStage
            from lightning.pytorch.utilities.data import _is_dataloader_shuffled

            loader = trainer._data_connector._prepare_dataloader(
                loader, shuffle=_is_dataloader_shuffled(loader), mode=RunningStage.TRAINING)
        return loader

    def _forward(self, pl_module: pl.LightningModule, batch: Any) -> Any:
        return (self.calibration_forward or default_forward)(pl_module, batch)

    def _record_grams(self, trainer: pl.Trainer, pl_module: pl.LightningModule, targets: Mapping[str, nn.Module],
                      loader: Iterable) -> tuple[dict[str, Tensor], dict[str, int]]:
        """Mean input Grams over ``calibration_batches`` batches (eval mode, no grad), all-reduced
        across ranks as count-weighted sums."""
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        seen = 0
        try:
            with torch.no_grad(), InputGramRecorder(pl_module, targets) as rec:
                for batch in loader:
                    if seen >= self.calibration_batches:
                        break
                    batch = trainer.strategy.batch_to_device(batch)
                    self._forward(pl_module, batch)
                    seen += 1
        finally:
            for m, mode in modes.items():
                m.training = mode
        accs = rec.accumulators
        if _dist_ready() and trainer.world_size > 1:
            device = trainer.strategy.root_device
            merged = {}
            for name in targets:  # same order on every rank
                total, count = accs[name].to_sum()
                total = total.to(device)
                n = torch.tensor([count], dtype=torch.float64, device=device)
                dist.all_reduce(total)
                dist.all_reduce(n)
                merged[name] = GramAccumulator.from_sum(total, int(n.item()), device=device)
            accs = merged
        counts = {n: a.count for n, a in accs.items()}
        empty = [n for n, c in counts.items() if c == 0]
        if empty:
            raise ValueError(f"the calibration loader yielded no input for layer(s) {empty[:5]} "
                             f"({seen} batch(es) on this rank): is it empty, or does the forward skip them?")
        return {n: a.gram for n, a in accs.items()}, counts

    def _distributed_executor(self, trainer: pl.Trainer, device: torch.device) -> Callable:
        rank, world = trainer.global_rank, trainer.world_size
        comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")

        def run(jobs: Sequence[LayerJob]) -> dict[str, LayerResult]:
            owners = balance_layers([j.cost for j in jobs], world)
            self._owners = {j.name: o for j, o in zip(jobs, owners)}
            self.owned_layers = [j.name for j, o in zip(jobs, owners) if o == rank]
            mine: dict[str, LayerResult] = {}
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self.owned_layers), desc=f"prune {self.method} (rank {rank}: "
                       f"{len(self.owned_layers)}/{len(jobs)} layers)", unit="layer",
                       disable=not (self.progress and rank == 0))
            for j, o in zip(jobs, owners):
                if o == rank:
                    mine[j.name] = j.run()
                    bar.update()
            bar.close()
            results = {}
            for j, o in zip(jobs, owners):
                results[j.name] = _broadcast_result(mine.get(j.name), o, rank, comm_device, j.weight.device)
            return results

        return run

    # ------------------------------------------------------------------------------------------
    # evaluation, BN recalibration
    # ------------------------------------------------------------------------------------------
    def _log_eval(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> dict[str, float]:
        metrics = evaluate_module(trainer, pl_module)
        if not metrics:
            rank_zero_debug(f"DSFPruneCallback: no validation metrics to log as {prefix}/ (no val data, "
                            f"limit_val_batches=0 or nothing logged in validation_step)")
            return {}
        out = {f"{prefix}/{k}": v for k, v in metrics.items()}
        self.metrics.update(out)
        _log_metrics(trainer, out, step=trainer.global_step)
        return out

    def _recalibrate_bn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bns = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats]
        if not bns:
            rank_zero_debug("DSFPruneCallback: no BatchNorm with running stats; nothing to recalibrate")
            return
        from lightning.pytorch.trainer.connectors.data_connector import _request_dataloader

        source = trainer.fit_loop._data_source
        loader = _request_dataloader(source) if source.is_defined() else None
        if loader is None:
            rank_zero_warn("DSFPruneCallback: bn_recalibration_batches > 0 but there is no train dataloader")
            return
        if isinstance(loader, DataLoader) and _dist_ready() and trainer.world_size > 1:
            from lightning.pytorch.trainer.states import RunningStage

            loader = trainer._data_connector._prepare_dataloader(loader, shuffle=False, mode=RunningStage.TRAINING)
        modes = {m: m.training for m in pl_module.modules()}
        momenta = {m: m.momentum for m in bns}
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the recalibration batches
        pl_module.train()
        try:
            with torch.no_grad(), isolate_rng():
                for i, batch in enumerate(loader):
                    if i >= self.bn_recalibration_batches:
                        break
                    self._forward(pl_module, trainer.strategy.batch_to_device(batch))
        finally:
            for m, mode in modes.items():
                m.training = mode
            for m, mom in momenta.items():
                m.momentum = mom

    # ------------------------------------------------------------------------------------------
    # reporting
    # ------------------------------------------------------------------------------------------
    def _layer_rows(self, pl_module: pl.LightningModule, report: PruneReport) -> list[dict[str, Any]]:
        rows = []
        owners = getattr(self, "_owners", {})
        for r in report.layers:
            m = pl_module.get_submodule(r.name)
            factors = m.masked_parameters()
            fd = [int(mask.sum()) / mask.numel() for _, mask in factors]
            out, fan_in = r.shape
            rows.append({
                "layer": r.name, "type": r.layer_type, "pruned_type": r.pruned_type, "out": out, "fan_in": fan_in,
                "shape": f"{out}x{fan_in}", "density": r.density, "achieved_density": r.nnz / (out * fan_in),
                "first_density": fd[0], "second_density": fd[1] if len(fd) > 1 else None,
                "nnz": r.nnz, "budget": r.budget, "relative_error": r.relative_error,
                "magnitude_relative_error": r.magnitude_relative_error,
                "error_vs_magnitude": r.error_vs_magnitude, "seconds": r.seconds,
                **({"owner_rank": owners[r.name]} if r.name in owners else {}),
            })
        return rows

    def _log_report(self, trainer: pl.Trainer, report: PruneReport) -> None:
        # "layers"/"skipped" are counts; renamed so they do not collide with the "dsf/layers" table
        renamed = {"layers": "layers_pruned", "skipped": "layers_skipped"}
        totals = {f"dsf/{renamed.get(k, k)}": float(v) for k, v in report.totals().items()}
        self.metrics.update(totals)
        _log_metrics(trainer, totals, step=trainer.global_step)
        rank_zero_info(f"DSFPruneCallback: pruned {len(report.layers)} layers with {self.method!r} at density "
                       f"{self.density} in {report.seconds:.1f}s; mean error vs magnitude "
                       f"{totals['dsf/mean_error_vs_magnitude']:.3f}")
        if not trainer.is_global_zero or not self.layer_rows:
            return
        columns = list(self.layer_rows[0])
        data = [[row.get(c) for c in columns] for row in self.layer_rows]
        for lg in trainer.loggers:
            if hasattr(lg, "log_table") and type(lg).__name__ == "WandbLogger":
                lg.log_table(key="dsf/layers", columns=columns, data=data)
            elif self.log_layer_scalars:
                scalars = {f"dsf/layers/{row['layer']}/{k}": float(row[k]) for row in self.layer_rows
                           for k in ("achieved_density", "first_density", "second_density", "relative_error",
                                     "error_vs_magnitude", "seconds") if row.get(k) is not None}
                lg.log_metrics(scalars, step=trainer.global_step)
            else:
                log.debug("DSFPruneCallback: %s gets no per-layer table (log_layer_scalars=False)", type(lg).__name__)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _pending_ckpt_path(trainer: pl.Trainer) -> tuple[Any, bool | None]:
    """The ``ckpt_path`` the running ``fit`` will restore, seen from ``setup``.

    Lightning sets ``trainer.ckpt_path`` only when it restores, after ``setup``; the resolved path
    is a local of ``Trainer._run`` (it is ``_fit_impl``'s ``_select_ckpt_path`` result), so it is
    read from that frame. A path the user set with ``trainer.ckpt_path = ...`` is used first.
    """
    if trainer.ckpt_path:
        return trainer.ckpt_path, None
    code = pl.Trainer._run.__code__
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code is code and frame.f_locals.get("self") is trainer:
                return frame.f_locals.get("ckpt_path"), frame.f_locals.get("weights_only")
            frame = frame.f_back
    finally:
        del frame
    return None, None


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


def _broadcast_result(result: LayerResult | None, src: int, rank: int, comm_device: torch.device,
                      device: torch.device) -> LayerResult:
    """Send ``src``'s :class:`LayerResult` to every rank: metadata as an object, tensors by
    ``dist.broadcast`` (bool masks as uint8), bit for bit."""
    names = ("first", "first_mask", "second", "second_mask")
    if rank == src:
        f = result.factorization
        tensors = {n: getattr(f, n) for n in names}
        meta = {"shapes": {n: None if t is None else (tuple(t.shape), str(t.dtype)) for n, t in tensors.items()},
                "method": f.method, "error": f.error, "relative_error": f.relative_error,
                "info": {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in f.info.items()},
                "mag": (result.magnitude_error, result.magnitude_relative_error), "seconds": result.seconds}
    else:
        meta = None
    box = [meta]
    dist.broadcast_object_list(box, src=src, device=comm_device if comm_device.type != "cpu" else None)
    meta = box[0]
    out: dict[str, Tensor | None] = {}
    for n in names:
        if meta["shapes"][n] is None:
            out[n] = None
            continue
        shape, dtype_s = meta["shapes"][n]
        dtype = getattr(torch, dtype_s.removeprefix("torch."))
        wire = torch.uint8 if dtype == torch.bool else dtype
        if rank == src:
            t = tensors[n].detach().to(device=comm_device, dtype=wire).contiguous()
        else:
            t = torch.empty(shape, dtype=wire, device=comm_device)
        dist.broadcast(t, src=src)
        out[n] = t.to(device=device, dtype=dtype)
    if rank == src:  # keep the owner's own tensors: identical values, no copy needed
        fact = result.factorization
    else:
        fact = Factorization(first=out["first"], second=out["second"], first_mask=out["first_mask"],
                             second_mask=out["second_mask"], method=meta["method"], error=meta["error"],
                             relative_error=meta["relative_error"], info=meta["info"])
    mag, mag_rel = meta["mag"]
    return LayerResult(fact, mag, mag_rel, meta["seconds"])


@rank_zero_only
def _log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    for lg in trainer.loggers:
        lg.log_metrics(dict(metrics), step=step)


class _LogRecorder:
    """Stands in for ``LightningModule.log`` during :func:`evaluate_module`; reduces per name."""

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
        if logger is False or on_epoch is False:
            return
        key = name + (self.suffix if add_dataloader_idx else "")
        fx = getattr(reduce_fx, "__name__", reduce_fx)
        fx = {"mean": "mean", "sum": "sum", "max": "max", "min": "min", "amax": "max", "amin": "min"}.get(str(fx))
        if fx is None:
            rank_zero_debug(f"DSFPruneCallback: metric {name!r} has an unsupported reduce_fx; using mean")
            fx = "mean"
        if batch_size is None:
            try:
                batch_size = extract_batch_size(self.batch)
            except Exception:  # noqa: BLE001 -- Lightning falls back to 1 as well
                batch_size = 1
        self.reduce[key] = fx
        self.values.setdefault(key, []).append((value, float(batch_size)))

    def result(self, world: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for key in sorted(self.values):  # same order on every rank: collectives below
            entries, fx = self.values[key], self.reduce[key]
            last = entries[-1][0]
            if _is_metric(last):
                out[key] = float(last.compute())
                last.reset()
                continue
            vals = torch.tensor([float(v.detach().float().mean()) if isinstance(v, Tensor) else float(v)
                                 for v, _ in entries], dtype=torch.float64)
            w = torch.tensor([b for _, b in entries], dtype=torch.float64)
            if fx == "mean":
                agg = torch.stack([(vals * w).sum(), w.sum()])
            elif fx == "sum":
                agg = torch.stack([vals.sum(), torch.tensor(1.0, dtype=torch.float64)])
            else:
                agg = torch.stack([vals.max() if fx == "max" else vals.min(), torch.tensor(1.0, dtype=torch.float64)])
            if world > 1:
                agg = agg.to(_comm_device())
                op = {"max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}.get(fx, dist.ReduceOp.SUM)
                if fx in ("max", "min"):
                    dist.all_reduce(agg[:1], op=op)
                else:
                    dist.all_reduce(agg, op=op)
                agg = agg.cpu()
            out[key] = float(agg[0] / agg[1]) if fx == "mean" else float(agg[0])
        return out


def _is_metric(v: Any) -> bool:
    return hasattr(v, "compute") and hasattr(v, "reset") and hasattr(v, "update")


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _val_loaders(trainer: pl.Trainer) -> tuple[list[Any], list[int | float]]:
    """The trainer's validation dataloaders, processed as Lightning does (DDP sampler), and their
    batch limits (``limit_val_batches``)."""
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    val_loop.setup_data()
    combined = val_loop._combined_loader
    if combined is None:
        return [], []
    return list(combined.flattened), list(val_loop.max_batches)


def evaluate_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
    """Run the module's ``validation_step`` over the trainer's validation data (eval mode, no grad,
    the precision plugin's val context) and return what it logged, reduced per name as Lightning
    reduces epoch metrics (and across ranks). RNG state is left untouched."""
    from lightning.pytorch.utilities.model_helpers import is_overridden

    if not is_overridden("validation_step", pl_module):
        return {}
    loaders, limits = _val_loaders(trainer)
    if not loaders:
        return {}
    rec = _LogRecorder()
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
                    args = (batch, b, i) if len(loaders) > 1 else (batch, b)
                    pl_module.validation_step(*args)
    finally:
        if had_log:
            pl_module.log = old_log  # type: ignore[method-assign]
        else:
            del pl_module.log
        for m, mode in modes.items():
            m.training = mode
    world = trainer.world_size if _dist_ready() else 1
    return rec.result(world)


def load_pruned_checkpoint(module: type[pl.LightningModule] | pl.LightningModule, path: str | os.PathLike,
                           map_location: Any = "cpu", weights_only: bool | None = None,
                           **kwargs: Any) -> pl.LightningModule:
    """Load a checkpoint of a run pruned by :class:`DSFPruneCallback` for inference.

    ``module`` is the LightningModule class (instantiated from the checkpoint's hyperparameters,
    like ``Cls.load_from_checkpoint(path, **kwargs)``) or a dense instance (loaded in place). The
    pruned structure in ``checkpoint["dsf_structure"]`` is applied before the strict state-dict
    load, so the result holds the same masked modules and weights as the trained one.
    """
    if isinstance(module, type):
        cls = module

        class _WithStructure(cls):  # type: ignore[valid-type, misc]
            def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
                spec = checkpoint.get(CHECKPOINT_KEY)
                if spec is None:
                    raise ValueError(f"checkpoint has no {CHECKPOINT_KEY!r} entry (not saved by DSFPruneCallback)")
                apply_structure_spec(self, spec)
                super().on_load_checkpoint(checkpoint)

        _WithStructure.__name__ = _WithStructure.__qualname__ = cls.__name__
        obj = _WithStructure.load_from_checkpoint(path, map_location=map_location, weights_only=weights_only,
                                                  **kwargs)
        obj.__class__ = cls
        return obj
    checkpoint = pl_load(path, map_location=map_location, weights_only=weights_only)
    spec = checkpoint.get(CHECKPOINT_KEY)
    if spec is None:
        raise ValueError(f"checkpoint {str(path)!r} has no {CHECKPOINT_KEY!r} entry (not saved by DSFPruneCallback)")
    from dsf_lightning.surgery import load_pruned

    module.on_load_checkpoint(checkpoint)
    load_pruned(module, checkpoint["state_dict"], spec=spec)
    return module
