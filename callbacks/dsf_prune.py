"""``DSFPruneCallback``: one-shot prune a LightningModule when ``fit`` starts, then fine-tune it.

>>> trainer = Trainer(callbacks=[DSFPruneCallback(density=0.1)], logger=WandbLogger())
>>> trainer.fit(module, datamodule)        # prune, evaluate, fine-tune, evaluate

The structure of a pruned layer depends only on the dense layer and the method, so the prune is split
between two hooks (why, and Lightning's hook order: docs/ARCHITECTURE.md):

* ``setup(stage="fit")``: checks the config against the model and swaps every target for its pruned
  module holding the dense weight exactly (:func:`~dsf_lightning.pipeline.install.build_structure`): the model
  computes the same function, and the restore and the optimizers see the final parameter objects.
* ``on_fit_start``: on a fresh run, evaluates the dense model (``dense/``), records calibration Grams,
  factorizes (split across ranks under DDP), fills the pruned modules in place (compressed values take
  their nonzero count; DDP is wrapped again), evaluates (``pre_finetune/``), optionally recalibrates
  BatchNorm (``bn_recalibrated/``). After Lightning restored a pruned run's checkpoint, nothing is
  factorized again.
* ``on_train_end``: proves the masks (``dsf/nonzeros_outside_masks``: 0) and evaluates (``post_finetune/``).
* ``on_save_checkpoint``: stores the structure spec in ``checkpoint["dsf_structure"]`` for inference
  loading (:func:`~dsf_lightning.callbacks.checkpoint.load_pruned_checkpoint`).

Metric names are the module's own validation names with a prefix, logged through ``trainer.loggers`` on
rank zero (W&B, CSV, TensorBoard alike); W&B also gets the per-layer table ``dsf/layers``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from typing_extensions import override

from dsf_lightning.callbacks.batchnorm import recalibrate_batchnorm
from dsf_lightning.callbacks.evaluation import evaluate_module
from dsf_lightning.callbacks.prune_logging import log_report, report_totals
from dsf_lightning.callbacks.strategies import check_resizable, rewrap_ddp
from dsf_lightning.config import PruneConfig, check_count
from dsf_lightning.persistence.structure import CHECKPOINT_KEY, nonzeros_outside_masks, structure_spec, to_dense
from dsf_lightning.pipeline.calibration import default_forward
from dsf_lightning.pipeline.distributed import is_sharded, world
from dsf_lightning.pipeline.entry import run_prune
from dsf_lightning.pipeline.install import build_structure
from dsf_lightning.pipeline.plan import PrunePlan, plan_prune
from dsf_lightning.pipeline.report import PruneReport
from dsf_lightning.pipeline.targets import unsupported

__all__ = ["DSFPruneCallback"]

Forward = Callable[[pl.LightningModule, Any], Any]


class DSFPruneCallback(Callback):
    """One-shot prune the LightningModule at the start of ``fit`` and log before/after metrics.

    Args:
        density: kept fraction in ``(0, 1]`` of every target layer (both DSF factors together); or
            pass ``config`` instead of ``density``, ``method`` and the prune fields below.
        method: ``"dsf"``, ``"magnitude"``, ``"wanda"``, ``"sparsegpt"`` (need calibration), ``"admm"``, ``"svd"``.
        config: a :class:`~dsf_lightning.config.PruneConfig` describing the whole prune.
        calibration_batches, include, exclude, family, densities, factorization_options, seed,
            forward_mode, balance_norms, storage: the :class:`~dsf_lightning.config.PruneConfig` fields.
            ``calibration_batches`` counts batches per rank under DDP.
        calibration_loader: where calibration batches come from; default: the trainer's train
            dataloader. Under DDP a loader without a ``DistributedSampler`` is sharded by batch index.
        calibration_forward: ``forward(pl_module, batch)`` running one (device-moved) batch for
            calibration and BatchNorm recalibration; default
            :func:`~dsf_lightning.pipeline.calibration.default_forward`.
        bn_recalibration_batches: ``n > 0``: after the pre-fine-tuning evaluation, re-estimate every
            BatchNorm's running statistics over ``n`` train batches (``torch.optim.swa_utils.update_bn``),
            then evaluate again as ``bn_recalibrated/<metric>``.
        evaluate: log ``pre_finetune/<metric>`` and ``post_finetune/<metric>``.
        log_dense: also log the dense model's metrics (``dense/<metric>``) before pruning.
        log_layer_scalars: for loggers other than W&B (which get the ``dsf/layers`` table), log
            per-layer scalars ``dsf/layers/<name>/<field>``; off by default (many columns).
        progress: progress bar over layers (rank zero only).
    """

    def __init__(self, density: float | None = None, method: str = "dsf", *, config: PruneConfig | None = None,
                 calibration_loader: Iterable | None = None, calibration_forward: Forward | None = None,
                 bn_recalibration_batches: int = 0, evaluate: bool = True, log_dense: bool = False,
                 log_layer_scalars: bool = False, progress: bool = True, **prune_fields: Any) -> None:
        super().__init__()
        if config is None:
            if density is None:
                raise ValueError("DSFPruneCallback needs a density (or config=PruneConfig(...))")
            config = PruneConfig(density=density, method=method, **prune_fields)
        elif density is not None or prune_fields or method != "dsf":
            raise ValueError("pass either config=PruneConfig(...) or density/method/prune fields, not both")
        check_count(bn_recalibration_batches, "bn_recalibration_batches")
        if calibration_loader is not None and not config.calibrated:
            raise ValueError("calibration_loader is given but calibration_batches=0 (data-free); "
                             "set calibration_batches > 0 to use it")
        if config.calibrated and config.calibration_batches is None and calibration_loader is None:
            raise ValueError("calibration_batches=None (every batch) needs a calibration_loader; "
                             "set calibration_batches to a number of train batches instead")
        self.config = config
        self.calibration_loader = calibration_loader
        self.calibration_forward = calibration_forward or default_forward
        self.bn_recalibration_batches = bn_recalibration_batches
        self.evaluate, self.log_dense, self.log_layer_scalars = evaluate, log_dense, log_layer_scalars
        self.progress = progress
        # results (read them after fit)
        self.report: PruneReport | None = None
        self.metrics: dict[str, float] = {}
        self.owned_layers: list[str] = []  # layers this rank factorized (all of them without DDP)
        self.factorization_runs = 0
        self.resumed = False
        self._plan: PrunePlan | None = None
        self._pruned = False
        self._restore_check: Any = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.config.method, density=self.config.density)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """``stage="fit"``: check the config against the model and put the pruned structure in place."""
        if stage != "fit" or (self._plan is not None and structure_spec(pl_module)["modules"]):
            return  # not fitting, or this module was already pruned by this callback (fit called again)
        if self.config.storage == "compressed":
            check_resizable(trainer.strategy, "DSFPruneCallback")
        plan = plan_prune(pl_module, self.config)
        other_types = unsupported(pl_module, plan.skipped)
        if other_types:
            rank_zero_warn(f"DSFPruneCallback: skipping {len(other_types)} unsupported layer(s) matched by the "
                           f"targets: {other_types}")
        if self.config.calibrated:  # no calibration data: fail now, before the model changes
            loader = self.calibration_loader if self.calibration_loader is not None else self._train_loader(trainer)
            if hasattr(loader, "__len__") and len(loader) == 0:
                raise ValueError("DSFPruneCallback: the calibration data is empty")
        self._plan = build_structure(pl_module, plan)
        self._restore_check = pl_module.register_load_state_dict_pre_hook(self._check_restored_state)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fresh run: evaluate, calibrate, factorize, fill the pruned modules, evaluate, recalibrate BN."""
        self._remove_restore_check()
        if self._plan is None or self._pruned:
            return
        if self.resumed:
            self._pruned = True
            rank_zero_info(f"DSFPruneCallback: resumed {len(self._plan.targets)} pruned layers from the checkpoint "
                           f"(no factorization)")
            return
        try:
            if self.log_dense and self.evaluate:
                self._log_eval(trainer, pl_module, "dense")
            self._prune(trainer, pl_module)
        except BaseException as e:
            # a prune that did not finish put every layer back (all_or_nothing): dense layers again, as it was
            state = "fully pruned" if self._pruned else "unchanged (the dense layers are back)"
            if not self._pruned:
                to_dense(pl_module, self._plan.layer_types)
                self._plan = None
            if trainer.is_global_zero:  # stderr: Lightning turns Ctrl-C into sys.exit(1), printing no exception
                print(f"DSFPruneCallback: the prune stopped with {type(e).__name__}; the model is {state}",
                      file=sys.stderr, flush=True)
            raise
        if self.evaluate:
            self._log_eval(trainer, pl_module, "pre_finetune")
        if self.bn_recalibration_batches > 0:
            self._recalibrate_bn(trainer, pl_module)
            if self.evaluate:
                self._log_eval(trainer, pl_module, "bn_recalibrated")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Count the nonzeros outside the masks (0 while the pattern holds) and evaluate (``post_finetune/``)."""
        if self._pruned:
            self._log(trainer, {"dsf/nonzeros_outside_masks": float(nonzeros_outside_masks(pl_module))})
        if self.evaluate and self._pruned:
            self._log_eval(trainer, pl_module, "post_finetune")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_restore_check()

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Store the pruned structure spec in ``checkpoint["dsf_structure"]``."""
        if self._pruned:
            checkpoint[CHECKPOINT_KEY] = structure_spec(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self._pruned, "config": self.config.to_dict(),
                "totals": self.report.totals() if self.report is not None else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Called when ``fit`` restores a checkpoint of a pruned run: its weights are the pruned ones."""
        self.resumed = bool(state_dict.get("pruned"))

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The one entry point on the structure :meth:`setup` built: seeded, split across ranks under DDP."""
        calibration = self._batches(trainer) if self.config.calibrated else None
        report = run_prune(pl_module, self._plan, calibration=calibration, forward=self._forward(trainer),
                           progress=self.progress)
        self._pruned = True
        if self.config.storage == "compressed":
            rewrap_ddp(trainer)
        self.owned_layers = [r.name for r in report.layers if r.rank in (None, world()[0])]
        self.factorization_runs += 1
        self.report = report
        self._log_report(trainer, report, model=type(pl_module).__name__)

    def _batches(self, trainer: pl.Trainer) -> Iterable:
        """This rank's calibration batches (a loader without a ``DistributedSampler`` is sharded: rank r takes
        batches r, r + W, ...); the entry point takes the first ``calibration_batches``."""
        if self.calibration_loader is not None:
            return _this_ranks_share(self.calibration_loader)
        return self._train_loader(trainer)

    def _forward(self, trainer: pl.Trainer) -> Callable[[nn.Module, Any], Any]:
        """``calibration_forward`` on batches moved by the strategy (the module's transfer hooks included)."""
        return lambda module, batch: self.calibration_forward(module, trainer.strategy.batch_to_device(batch))

    def _train_loader(self, trainer: pl.Trainer) -> Iterable:
        """The trainer's train dataloader, prepared as Lightning prepares it (DDP sampler included).

        Loaded through public Trainer API: ``estimated_stepping_batches`` loads the train dataloader to count
        the steps (as ``configure_optimizers`` schedules do), then ``train_dataloader`` returns it. With
        ``max_epochs=-1`` it loads nothing; then the datamodule's or the module's ``train_dataloader`` hook
        (a rank takes every W-th batch under DDP)."""
        if trainer.train_dataloader is None:
            _ = trainer.estimated_stepping_batches
        loader = trainer.train_dataloader
        if loader is None:
            source = trainer.datamodule if trainer.datamodule is not None else trainer.lightning_module
            if is_overridden("train_dataloader", source):
                loader = _this_ranks_share(source.train_dataloader())
        if loader is None:
            raise ValueError("DSFPruneCallback needs training data here (calibration_batches > 0 or "
                             "bn_recalibration_batches > 0) but the trainer has no train dataloader: pass "
                             "calibration_loader=... or give fit() training data")
        if isinstance(loader, (list, tuple, dict)):
            raise ValueError("DSFPruneCallback: the trainer has several train dataloaders; pass calibration_loader=")
        return loader

    def _check_restored_state(self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str,
                              *args: Any) -> None:
        """``load_state_dict`` pre-hook while the structure is built but not filled: the state Lightning
        restores must be of that structure, else a clear error instead of a key mismatch."""
        for name, layer in self._plan.targets.items():
            key = f"{prefix}{name}."
            mine = sorted(k.removeprefix(key) for k in layer.state_dict())
            theirs = sorted(k.removeprefix(key) for k in state_dict if k.startswith(key))
            if theirs and theirs != mine:
                raise ValueError(
                    f"layer {name!r}: the checkpoint holds {theirs} but DSFPruneCallback(method="
                    f"{self.config.method!r}, storage={self.config.storage!r}) built {type(layer).__name__} {mine} "
                    f"before the restore. Resume with the method, storage and targets of the run that saved it (its "
                    f"optimizer state is of those parameters); to prune a dense checkpoint, load its weights into "
                    f"the module and call fit without ckpt_path")

    def _remove_restore_check(self) -> None:
        if self._restore_check is not None:
            self._restore_check.remove()
            self._restore_check = None

    def _log_eval(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str) -> dict[str, float]:
        metrics = evaluate_module(trainer, pl_module)
        if not metrics:
            rank_zero_debug(f"DSFPruneCallback: no validation metrics to log as {prefix}/ (no val data, "
                            f"limit_val_batches=0 or nothing logged in validation_step)")
            return {}
        return self._log(trainer, {f"{prefix}/{k}": v for k, v in metrics.items()})

    def _log(self, trainer: pl.Trainer, metrics: dict[str, float]) -> dict[str, float]:
        self.metrics.update(metrics)
        _log_metrics(trainer, metrics, step=trainer.global_step)
        return metrics

    def _recalibrate_bn(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def batches() -> Iterable:  # the train loader is only set up when there is a BatchNorm
            yield from self._train_loader(trainer)

        with isolate_rng():
            if not recalibrate_batchnorm(pl_module, batches(), self._forward(trainer), self.bn_recalibration_batches):
                rank_zero_debug("DSFPruneCallback: no BatchNorm; nothing to recalibrate")

    def _log_report(self, trainer: pl.Trainer, report: PruneReport, model: str) -> None:
        totals = report_totals(report)
        self.metrics.update(totals)
        rank_zero_info(f"DSFPruneCallback: pruned {len(report.layers)} layers with {self.config.method!r} at density "
                       f"{self.config.density} in {report.seconds:.1f}s; mean error vs magnitude "
                       f"{totals['dsf/mean_error_vs_magnitude']:.3f}; density over all weight matrices "
                       f"{report.model_density:.3f}, {len(report.skipped)} left dense (the report's skipped says why)")
        log_report(trainer.loggers, report, trainer.global_step, self.log_layer_scalars)
        if trainer.is_global_zero and report.layers:
            for lg in trainer.loggers:  # the prune's config as hyperparameters: filters on W&B, dsf-compare's key
                lg.log_hyperparams({"dsf": {**self.config.to_dict(), "model": model}})


def _this_ranks_share(loader: Iterable) -> Iterable:
    """``loader`` as is when it has a ``DistributedSampler`` or there is one process; else rank r's batches
    r, r + W, ... of the W processes."""
    rank, world_size = world()
    return islice(loader, rank, None, world_size) if world_size > 1 and not is_sharded(loader) else loader


@rank_zero_only
def _log_metrics(trainer: pl.Trainer, metrics: Mapping[str, float], step: int) -> None:
    for lg in trainer.loggers:
        lg.log_metrics(dict(metrics), step=step)
