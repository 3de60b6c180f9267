"""What the recipes do alike: W&B, the Trainer, weights files, the training stages, results, the main wrapper.

Every recipe is split in two: ``prepare(config)`` makes every input check and builds the data module,
prune callback and model (nothing trains), and the run trains. :func:`recipe_main` prints the errors of
parsing and ``prepare`` as ``prog: error: ...`` (exit status 2) and leaves those of training alone.
"""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

from dsf_lightning import __version__
from dsf_lightning.callbacks import DSFPruneCallback, FiniteLossGuard, TrainingMemory
from dsf_lightning.persistence.files import read_torch_file, save_torch_file, write_json, write_text
from dsf_lightning.recipes.cli import ConfigParser
from dsf_lightning.recipes.sections import RecipeConfig
from dsf_lightning.runs.records import method_label, run_identity, run_name

__all__ = [
    "Prepared",
    "build_prune_callback",
    "identity",
    "finish_wandb",
    "load_weights_file",
    "make_trainer",
    "memory_figures",
    "make_wandb_logger",
    "prune_and_finetune",
    "recipe_main",
    "run_name",
    "summary",
    "train_dense",
    "wandb_has_credentials",
    "wandb_summary",
    "with_output_dir",
    "write_config",
    "write_results",
]

C = TypeVar("C")


# ------------------------------------------------------------------------------------------------
# W&B, trainer
# ------------------------------------------------------------------------------------------------
def wandb_has_credentials() -> bool:
    """True when ``WANDB_API_KEY`` is set or a netrc file has an entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def identity(config: RecipeConfig, model: str) -> dict[str, Any]:
    """The run's :func:`~dsf_lightning.runs.records.run_identity` from its prune section and seed; a distilling
    fine-tune is a variant of its own (``distill`` among the options: ``dsf+distill=logits`` in dsf-compare)."""
    p = config.prune
    options = dict(p.factorization_options)
    if config.distill.kind != "none":
        options["distill"] = config.distill.kind
    return run_identity(model, p.method, p.density, config.run.seed, p.allocation, options)


def make_wandb_logger(config: RecipeConfig, *, task: str, group: str, job_type: str,
                      run: Mapping[str, Any] | None = None, name: str | None = None) -> Any:
    """A ``WandbLogger`` with the conventions of every recipe, or ``None`` with ``wandb: off`` or ``fast_dev_run``.

    Project ``logging.wandb_project`` (default ``dsf-<task>``), group ``logging.wandb_group`` (default
    ``group``, the experiment), run name ``<model>-<method>-d<density>-s<seed>`` (:func:`run_name` of the
    ``run`` identity, or ``name``), tags model / method / ``density=`` / ``allocation=`` (and the method
    label of a variant with options), and as the run
    config the full recipe config plus ``identity`` and ``version``. ``auto``: offline unless W&B
    credentials exist (or ``WANDB_MODE=offline`` is set); no run at all with ``WANDB_MODE=disabled``."""
    log = config.logging
    if log.wandb == "off" or config.run.fast_dev_run:
        return None
    if log.wandb == "auto" and os.environ.get("WANDB_MODE") == "disabled":  # the user's explicit environment
        return None
    from lightning.pytorch.loggers import WandbLogger

    if log.wandb == "auto":
        offline = not wandb_has_credentials() or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    else:
        offline = log.wandb == "offline"
    tags = ([run["model"], run["method"], f"density={run['density']:g}", f"allocation={run['allocation']}"]
            if run is not None else [])
    if run is not None and run.get("options"):  # a variant: its own tag, e.g. dsf+finalize=second
        tags.append(method_label(run["method"], run["options"]))
    os.makedirs(log.wandb_dir, exist_ok=True)
    logger = WandbLogger(project=log.wandb_project or f"dsf-{task}", group=log.wandb_group or group,
                         name=name or run_name(dict(run or {})), tags=tags, job_type=job_type, offline=offline,
                         save_dir=log.wandb_dir, log_model=False)
    logger.log_hyperparams({**config.to_dict(), **({"identity": dict(run)} if run is not None else {}),
                            "version": __version__})
    return logger


def wandb_summary(logger: Any, values: Mapping[str, Any]) -> None:
    """Put ``values`` (``dense/...``, ``pre_finetune/...``, ``post_finetune/...``, prune time, nnz) in the W&B
    run summary, where dashboards and the runs table read them; nothing without a logger (rank zero)."""
    if logger is not None and rank_zero_only.rank == 0:
        logger.experiment.summary.update({**values, "version": __version__})


def finish_wandb(logger: Any) -> None:
    """End the W&B run of ``logger`` (a ``WandbLogger`` or ``None``) so the next stage starts its own."""
    if logger is None:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()


def make_trainer(config: RecipeConfig, *, max_epochs: int, callbacks: Sequence[Callback], logger: Any,
                 checkpoint_dir: str | None) -> pl.Trainer:
    """The Lightning ``Trainer`` of a recipe stage (DDP by default on more than one device/node), with a
    :class:`~dsf_lightning.callbacks.TrainingMemory` (:func:`memory_figures` reads it)."""
    run = config.run
    multi = (isinstance(run.devices, int) and run.devices > 1) or run.num_nodes > 1
    strategy = run.strategy or ("ddp" if multi else "auto")
    precision = run.precision or ("16-mixed" if torch.cuda.is_available() else "32")
    checkpoints = checkpoint_dir is not None and not run.fast_dev_run
    cbs = [*callbacks, FiniteLossGuard(), TrainingMemory()]
    if checkpoints:
        cbs.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="{epoch}-{val_acc:.4f}", monitor="val_acc",
                                   mode="max", save_top_k=1, save_last=True))
    if logger is not None:
        cbs.append(LearningRateMonitor(logging_interval="epoch"))
    limit_train = run.limit_batches if run.limit_train_batches is None else run.limit_train_batches
    return pl.Trainer(
        accelerator=run.accelerator, devices=run.devices, num_nodes=run.num_nodes, strategy=strategy,
        precision=precision, max_epochs=max_epochs, logger=logger if logger is not None else False,
        callbacks=cbs, enable_checkpointing=checkpoints, fast_dev_run=run.fast_dev_run, num_sanity_val_steps=0,
        log_every_n_steps=10, limit_train_batches=limit_train, limit_val_batches=run.limit_batches,
        enable_progress_bar=run.progress_bar, enable_model_summary=False, default_root_dir=config.logging.output_dir)


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
def load_weights_file(model: nn.Module, path: str | os.PathLike, what: str = "--weights") -> None:
    """Load a state dict file into ``model`` strictly; ``what`` names the input in errors.

    Accepts a plain state dict, ``{"state_dict": ...}`` or ``{"model": ...}`` (e.g. a Lightning
    checkpoint of :class:`~dsf_lightning.models.ImageClassifier`: its ``backbone.`` prefix is
    stripped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or keys/shapes that do not fit the model (named in the message).
    """
    path = str(path)
    obj = read_torch_file(path, what)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{what}: {path!r} does not hold a state dict (a mapping of names to tensors)")
    sd = dict(obj)
    if sd and all(k.startswith("backbone.") for k in sd):
        sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in set(sd) & set(own)
                    if sd[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:6]) + (f", ... ({len(xs)} in all)" if len(xs) > 6 else "")

        parts = [f"{len(xs)} {what_}: {few(xs)}" for what_, xs in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if xs]
        raise ValueError(f"{what}: the weights in {path!r} do not fit the {type(model).__name__} model: "
                         + "; ".join(parts))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{what}: the weights in {path!r} do not fit the {type(model).__name__} model: {e}") from e


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A checked recipe run, ready to train: its config (output directory resolved) and built parts."""

    config: Any
    datamodule: pl.LightningDataModule
    callback: DSFPruneCallback
    backbone: nn.Module
    model: str  # e.g. "resnet20-16": W&B group prefix, run names
    dataset: str


def build_prune_callback(config: RecipeConfig, **overrides: Any) -> DSFPruneCallback:
    """The :class:`DSFPruneCallback` of ``config.prune`` (logging dense metrics too); ``ValueError`` for
    bad method/option combinations."""
    kw: dict[str, Any] = dict(bn_recalibration_batches=config.finetune.bn_recalibration_batches, log_dense=True,
                              progress=config.run.progress_bar)
    kw.update(overrides)
    return DSFPruneCallback(config=config.prune, **kw)


def with_output_dir(config: C, model: str, dataset: str) -> C:
    """``config`` with ``logging.output_dir`` resolved (default ``lightning_logs/<group>/<run name>``)."""
    if config.logging.output_dir is not None:
        return config
    out = os.path.join("lightning_logs", f"{model}-{dataset}", run_name(identity(config, model)))
    return replace(config, logging=replace(config.logging, output_dir=out))


def train_dense(config: RecipeConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule, *,
                model: str, dataset: str, epochs: int, save_to: str | None) -> dict[str, float]:
    """Train ``module`` densely (its own optimizer/schedule); logs a ``<model>-dense-s<seed>`` W&B run;
    saves the backbone's state dict to ``save_to`` (global rank 0). Returns the final val metrics."""
    logger = make_wandb_logger(config, task=dataset, group=f"{model}-{dataset}", job_type="dense",
                               name=f"{model}-dense-s{config.run.seed}")
    trainer = make_trainer(config, max_epochs=epochs, callbacks=[], logger=logger, checkpoint_dir=None)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        finish_wandb(logger)
    if save_to and trainer.is_global_zero and not config.run.fast_dev_run:
        save_torch_file(module.backbone.state_dict(), save_to)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}


def prune_and_finetune(config: RecipeConfig, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                       callback: DSFPruneCallback, *, model: str, dataset: str,
                       checkpoint_dir: str | None) -> tuple[dict[str, float], pl.Trainer]:
    """One W&B run: prune ``module`` when ``fit`` starts (``callback``), evaluate, fine-tune
    ``finetune.max_epochs`` epochs, evaluate; the metrics, prune time and nnz go to the run summary.
    Returns the callback's metrics (``dense/``, ``pre_finetune/``, ``post_finetune/``...) and the trainer."""
    logger = make_wandb_logger(config, task=dataset, group=f"{model}-{dataset}", job_type="prune-finetune",
                               run=identity(config, model))
    trainer = make_trainer(config, max_epochs=config.finetune.max_epochs, callbacks=[callback], logger=logger,
                           checkpoint_dir=checkpoint_dir)
    try:
        trainer.fit(module, datamodule=datamodule)
        if callback.report is not None:
            wandb_summary(logger, {**callback.metrics, "prune_seconds": callback.report.seconds,
                                   "nnz": callback.report.nnz, "dense_numel": callback.report.dense_numel,
                                   "finetune_memory": memory_figures(trainer)})
    finally:
        finish_wandb(logger)
    return dict(callback.metrics), trainer


def memory_figures(trainer: pl.Trainer) -> dict[str, Any]:
    """The fine-tune's storage, training-state bytes and peak memory (``TrainingMemory.figures``) of
    ``trainer``, or ``{}`` when it has no :class:`~dsf_lightning.callbacks.TrainingMemory`."""
    return next((dict(c.figures) for c in trainer.callbacks if isinstance(c, TrainingMemory)), {})


# ------------------------------------------------------------------------------------------------
# results, main
# ------------------------------------------------------------------------------------------------
@rank_zero_only
def write_config(config: RecipeConfig, output_dir: str) -> None:
    """``output_dir/config.yaml``: the resolved run config, loadable with ``--config`` (rank zero)."""
    write_text(os.path.join(output_dir, "config.yaml"), config.to_yaml())


def write_results(trainer: pl.Trainer, output_dir: str, result: Mapping[str, Any]) -> None:
    """``output_dir/results.json`` (global rank zero)."""
    if not trainer.is_global_zero:
        return
    write_json(os.path.join(output_dir, "results.json"), result)


def summary(name: str, metrics: Mapping[str, float]) -> str:
    """The accuracy table printed at the end of a run."""
    def pct(k: str) -> str:
        v = metrics.get(k)
        return "  n/a " if v is None else f"{100 * v:6.2f}"

    rows = [("dense", "dense/val_acc"), ("pruned, before fine-tuning", "pre_finetune/val_acc"),
            ("after BN recalibration", "bn_recalibrated/val_acc"), ("after fine-tuning", "post_finetune/val_acc")]
    return "\n".join([f"{name}: val top-1 accuracy (%)"] +
                     [f"  {label:<28}{pct(k)}" for label, k in rows if k in metrics])


def recipe_main(parser: ConfigParser[C], prepare: Callable[[C], Prepared], execute: Callable[[Prepared], Any],
                argv: Sequence[str] | None) -> int:
    """Parse, prepare, run; returns the exit status. Input errors (of parsing and ``prepare``) are printed
    without a traceback and give 2; errors while training propagate."""
    try:
        prepared = prepare(parser.parse(argv))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"{parser.parser.prog}: error: {e}", file=sys.stderr)
        return 2
    execute(prepared)
    return 0
