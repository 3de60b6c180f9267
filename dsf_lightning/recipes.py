"""The logic of the runnable recipes (``recipes/*.py`` only parse arguments and call in here).

* :func:`resnet20_main` -- ``recipes/resnet20_cifar10.py``: train a CIFAR ResNet-20 densely (or load
  ``--dense-ckpt``), one-shot prune every layer but the first and the last with ``--method`` at
  ``--density`` (data-free projection by default, as in the paper's fine-tuning experiments),
  fine-tune with a linear decay to zero, and log dense / pre- / post-fine-tuning accuracy.
* :func:`resnet50_main` -- ``recipes/resnet50_imagenet.py``: the same for torchvision's ResNet-50 with
  ImageNet weights on ImageNet folders (20 epochs, SGD lr 0.01 linear to zero, momentum 0.9).

Both log to Weights & Biases (project ``dsf-lightning``, group ``<model>-<dataset>``, tags
``[model, method, "density=D"]``, run name ``<model>-<method>-d<D>-s<seed>``; offline by itself when
no W&B credentials exist), store every argument in the run config, save checkpoints (with the pruned
structure, see :func:`~dsf_lightning.callbacks.load_pruned_checkpoint`) and a ``results.json`` with
the metrics under ``--output-dir``. Every input is checked before any training: data directories,
weights files (strict load), methods and their options.
"""

from __future__ import annotations

import argparse
import json
import netrc
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from torch import nn

from dsf_lightning.callbacks import DSFPruneCallback
from dsf_lightning.factorization import FACTORIZERS
from dsf_lightning.surgery import NEEDS_CALIBRATION

__all__ = [
    "WANDB_PROJECT",
    "build_prune_callback",
    "load_weights_file",
    "make_trainer",
    "make_wandb_logger",
    "prune_and_finetune",
    "resnet20_main",
    "resnet20_parser",
    "resnet50_main",
    "resnet50_parser",
    "run_name",
    "run_resnet20",
    "run_resnet50",
    "train_dense",
    "wandb_has_credentials",
]

WANDB_PROJECT = "dsf-lightning"
METHODS = ("dsf", "magnitude", "wanda", "admm")
assert set(METHODS) <= set(FACTORIZERS)


# ------------------------------------------------------------------------------------------------
# argument parsing
# ------------------------------------------------------------------------------------------------
class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description's paragraphs."""


def _density(s: str) -> float:
    d = float(s)
    if not 0 < d <= 1:
        raise argparse.ArgumentTypeError(f"density must be in (0, 1], got {s}")
    return d


def _json_dict(s: str) -> dict[str, Any]:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {s!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"outer_iters\": 10}}', got {s!r}")
    return v


def _add_common(p: argparse.ArgumentParser, *, lr: float, epochs: int, batch_size: int, num_workers: int,
                weight_decay: float) -> None:
    g = p.add_argument_group("pruning")
    g.add_argument("--method", choices=METHODS, default="dsf",
                   help="dsf: double sparse factorization W ~= S @ F; magnitude / wanda / admm: single-mask "
                        "pruning baselines with the same per-layer budget")
    g.add_argument("--density", type=_density, default=0.1,
                   help="fraction of weights kept in every pruned layer (both DSF factors together)")
    g.add_argument("--calibration-batches", type=int, default=0,
                   help="0: data-free weight projection (the paper's fine-tuning setting); N > 0: layer-wise "
                        "pruning with input Grams of N training batches (wanda needs this)")
    g.add_argument("--bn-recalibration-batches", type=int, default=0,
                   help="N > 0: after pruning, re-estimate BatchNorm statistics on N training batches "
                        "(logged as bn_recalibrated/*)")
    g.add_argument("--factorization-options", type=_json_dict, default={},
                   help="JSON object of method options, e.g. '{\"outer_iters\": 10}' (see dsf_lightning.factorization)")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--max-epochs", type=int, default=epochs, help="fine-tuning epochs after pruning")
    g.add_argument("--lr", type=float, default=lr, help="initial fine-tuning learning rate (linear decay to zero)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float, default=weight_decay, help="SGD weight decay (all parameters)")
    g.add_argument("--batch-size", type=int, default=batch_size, help="batch size per device")
    g = p.add_argument_group("hardware and run")
    g.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ...")
    g.add_argument("--devices", default="1", help="devices per node (an int, or 'auto')")
    g.add_argument("--num-nodes", type=int, default=1, help="number of nodes")
    g.add_argument("--strategy", default=None,
                   help="Lightning strategy; default: 'ddp' with more than one device or node, else 'auto'")
    g.add_argument("--precision", default=None,
                   help="Lightning precision; default: '16-mixed' (AMP) when CUDA is available, else '32'")
    g.add_argument("--num-workers", type=int, default=num_workers, help="dataloader workers per process")
    g.add_argument("--seed", type=int, default=0, help="seed of initialization, data order and pruning")
    g.add_argument("--fast-dev-run", action="store_true",
                   help="run one batch of each stage to check the setup (Lightning disables loggers and "
                        "checkpoints for it)")
    g.add_argument("--limit-batches", type=int, default=None,
                   help="use at most N train and N val batches per epoch (quick real runs)")
    g.add_argument("--output-dir", default=None,
                   help="checkpoints and results.json; default: lightning_logs/<group>/<run name>")
    g.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto",
                   help="W&B logging: auto = online when credentials exist (WANDB_API_KEY or a netrc entry), "
                        "else offline (runs under ./wandb, upload later with `wandb sync`)")
    g.add_argument("--wandb-project", default=WANDB_PROJECT, help="W&B project")
    g.add_argument("--wandb-dir", default=".", help="W&B save_dir (runs go to <dir>/wandb)")
    g.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=True,
                   help="show Lightning's progress bar")


def resnet20_parser() -> argparse.ArgumentParser:
    """Arguments of ``recipes/resnet20_cifar10.py``."""
    p = argparse.ArgumentParser(
        prog="resnet20_cifar10.py", formatter_class=_Formatter,
        description="""\
Prune a CIFAR ResNet-20 with Double Sparse Factorization (or a baseline) and fine-tune it
(paper section 5.4, Table 3).

1. dense: train from scratch (paper: 160 epochs, SGD lr 0.1, momentum 0.9, lr x0.1 at epochs
   80 and 120; weight decay 1e-4, which the paper does not state: the He et al. CIFAR value),
   or load --dense-ckpt;
2. prune every conv/linear layer except the first conv and the last linear to --density with
   --method (data-free weight projection unless --calibration-batches > 0);
3. fine-tune (paper: 50 epochs, SGD lr 0.1 decaying linearly to zero);
logging dense/*, pre_finetune/*, post_finetune/* (val_acc, val_acc5, val_loss) to W&B.

--dataset digits (the default) is an offline stand-in that needs no download: scikit-learn's
1,797 real 8x8 digits, upsampled to 3x32x32 (--image-size), stratified 80/20 split (seeded).
--dataset cifar10 reads --data-dir/cifar-10-batches-py (or fetches it with --download).""",
        epilog="example: python recipes/resnet20_cifar10.py --dataset cifar10 --data-dir data --download "
               "--width 32 --method dsf --density 0.1 --devices 2")
    g = p.add_argument_group("model and data")
    g.add_argument("--dataset", choices=("digits", "cifar10"), default="digits",
                   help="digits: offline embedded default; cifar10: torchvision CIFAR-10")
    g.add_argument("--data-dir", default="data", help="CIFAR-10 root (holding cifar-10-batches-py)")
    g.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir if missing")
    g.add_argument("--image-size", type=int, default=32,
                   help="digits only: side the 8x8 digits are upsampled to (CIFAR-10 images are 32x32)")
    g.add_argument("--width", type=int, choices=(16, 32), default=16,
                   help="ResNet-20 base width (16: original network; 32: the paper's wider one)")
    g = p.add_argument_group("dense training")
    g.add_argument("--dense-ckpt", default=None,
                   help="skip dense training: load this ResNet-20 state dict (or a Lightning checkpoint of an "
                        "ImageClassifier); strict, must match --width")
    g.add_argument("--dense-epochs", type=int, default=160, help="dense training epochs")
    g.add_argument("--dense-lr", type=float, default=0.1, help="dense initial learning rate")
    g.add_argument("--dense-milestones", type=int, nargs="+", default=None,
                   help="epochs where the dense lr is multiplied by 0.1; default: 50%% and 75%% of --dense-epochs "
                        "(80 120 for 160)")
    _add_common(p, lr=0.1, epochs=50, batch_size=128, num_workers=4, weight_decay=1e-4)
    return p


def resnet50_parser() -> argparse.ArgumentParser:
    """Arguments of ``recipes/resnet50_imagenet.py``."""
    p = argparse.ArgumentParser(
        prog="resnet50_imagenet.py", formatter_class=_Formatter,
        description="""\
Prune torchvision's ImageNet ResNet-50 with Double Sparse Factorization (or a baseline) and
fine-tune it (paper section 5.4, Table 4): prune every conv/linear layer except the first conv
and the last linear to --density (data-free weight projection unless --calibration-batches > 0),
fine-tune 20 epochs with SGD, lr 0.01 decaying linearly to zero, momentum 0.9, batch 256, AMP on
GPU; log dense/*, pre_finetune/*, post_finetune/* (val_acc, val_acc5, val_loss) to W&B.

Data: --data-dir with train/ and val/ ImageFolder subfolders (one folder per class).
Weights: 'imagenet' = torchvision's ResNet50_Weights.IMAGENET1K_V1 (downloaded on first use into
the torch hub cache); without network access pass --weights PATH, a local state-dict file (for
example that cached resnet50-0676ba61.pth), or --weights none for a random initialization.""",
        epilog="example: python recipes/resnet50_imagenet.py --data-dir /data/imagenet --density 0.1 --devices 8")
    g = p.add_argument_group("model and data")
    g.add_argument("--data-dir", default="data/imagenet", help="ImageNet root holding train/ and val/")
    g.add_argument("--weights", default="imagenet",
                   help="'imagenet' (torchvision IMAGENET1K_V1, needs a download or the hub cache), a path to a "
                        "ResNet-50 state-dict file (strict load), or 'none'")
    g.add_argument("--num-classes", type=int, default=1000, help="classifier outputs")
    _add_common(p, lr=0.01, epochs=20, batch_size=256, num_workers=8, weight_decay=1e-4)
    return p


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


def run_name(model: str, method: str, density: float, seed: int) -> str:
    """``<model>-<method>-d<density>-s<seed>``, e.g. ``resnet20-16-dsf-d0.1-s0``."""
    return f"{model}-{method}-d{density:g}-s{seed}"


def make_wandb_logger(args: argparse.Namespace, *, model: str, dataset: str, name: str, tags: Sequence[str],
                      job_type: str) -> Any:
    """A ``WandbLogger`` (project ``args.wandb_project``, group ``<model>-<dataset>``) or ``None`` when
    ``--wandb off`` or ``--fast-dev-run``. ``auto``: offline unless W&B credentials exist (or
    ``WANDB_MODE=offline`` is set)."""
    if args.wandb == "off" or args.fast_dev_run:
        return None
    from lightning.pytorch.loggers import WandbLogger

    if args.wandb == "auto":
        offline = not wandb_has_credentials() or os.environ.get("WANDB_MODE") in ("offline", "dryrun")
    else:
        offline = args.wandb == "offline"
    os.makedirs(args.wandb_dir, exist_ok=True)
    logger = WandbLogger(project=args.wandb_project, group=f"{model}-{dataset}", name=name, tags=list(tags),
                         job_type=job_type, offline=offline, save_dir=args.wandb_dir, log_model=False)
    logger.log_hyperparams({k: v for k, v in vars(args).items() if not k.startswith("_")})
    return logger


def _finish_wandb(logger: Any) -> None:
    if logger is None:
        return
    import wandb

    if wandb.run is not None:
        wandb.finish()


def _devices(value: str) -> int | str:
    return value if value == "auto" else int(value)


def make_trainer(args: argparse.Namespace, *, max_epochs: int, callbacks: Sequence[Callback], logger: Any,
                 checkpoint_dir: str | None) -> pl.Trainer:
    """The Lightning ``Trainer`` of a recipe stage (DDP by default on more than one device/node)."""
    devices = _devices(str(args.devices))
    multi = (isinstance(devices, int) and devices > 1) or args.num_nodes > 1
    strategy = args.strategy or ("ddp" if multi else "auto")
    precision = args.precision or ("16-mixed" if torch.cuda.is_available() else "32")
    cbs = list(callbacks)
    if checkpoint_dir is not None and not args.fast_dev_run:
        cbs.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="{epoch}-{val_acc:.4f}", monitor="val_acc",
                                   mode="max", save_top_k=1, save_last=True))
    if logger is not None:
        cbs.append(LearningRateMonitor(logging_interval="epoch"))
    limit = args.limit_batches
    return pl.Trainer(
        accelerator=args.accelerator, devices=devices, num_nodes=args.num_nodes, strategy=strategy,
        precision=precision, max_epochs=max_epochs, logger=logger if logger is not None else False,
        callbacks=cbs, enable_checkpointing=checkpoint_dir is not None and not args.fast_dev_run,
        fast_dev_run=args.fast_dev_run, num_sanity_val_steps=0, log_every_n_steps=10,
        limit_train_batches=limit, limit_val_batches=limit, enable_progress_bar=args.progress_bar,
        enable_model_summary=False, default_root_dir=args.output_dir)


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------
def load_weights_file(model: nn.Module, path: str | os.PathLike, what: str = "--weights") -> None:
    """Load a state dict file into ``model`` strictly.

    Accepts a plain state dict, ``{"state_dict": ...}`` or ``{"model": ...}`` (e.g. a Lightning
    checkpoint of :class:`~dsf_lightning.models.ImageClassifier`: its ``backbone.`` prefix is
    stripped).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or keys/shapes that do not fit the model (named in the message).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable file is a bad input
        raise ValueError(f"{what}: could not read {path!r} as a PyTorch state dict ({type(e).__name__}: {e})") from e
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


def load_torchvision_resnet50(weights: str, num_classes: int = 1000) -> nn.Module:
    """torchvision ResNet-50 with ``weights``: ``"imagenet"`` (IMAGENET1K_V1 via the hub cache or a
    download), ``"none"``, or a state-dict file (strict)."""
    import torchvision

    model = torchvision.models.resnet50(weights=None, num_classes=num_classes)
    if weights.lower() == "none":
        return model
    if weights.lower() in ("imagenet", "imagenet1k_v1", "default"):
        w = torchvision.models.ResNet50_Weights.IMAGENET1K_V1
        if num_classes != 1000:
            raise ValueError(f"--weights imagenet has 1000 classes, not --num-classes {num_classes}")
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(30)
        try:
            sd = w.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # noqa: BLE001 -- no network, proxy, hash, ...: all say the same thing
            cache = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
            raise RuntimeError(
                f"--weights imagenet: could not get torchvision's ResNet50_Weights.IMAGENET1K_V1 "
                f"({type(e).__name__}: {e}). It is downloaded from {w.url} into {cache} on first use. "
                f"Without network access pass --weights PATH (a local ResNet-50 state-dict file, e.g. that "
                f".pth copied from a machine with access) or --weights none (random initialization).") from e
        finally:
            socket.setdefaulttimeout(old)
        model.load_state_dict(sd, strict=True)
        return model
    load_weights_file(model, weights, "--weights")
    return model


# ------------------------------------------------------------------------------------------------
# stages
# ------------------------------------------------------------------------------------------------
def build_prune_callback(args: argparse.Namespace, **overrides: Any) -> DSFPruneCallback:
    """The :class:`DSFPruneCallback` of ``args`` (vision preset: every conv/linear but the first
    conv and the last linear). Raises ``ValueError`` for bad method/option combinations."""
    if args.method in NEEDS_CALIBRATION and args.calibration_batches == 0:
        raise ValueError(f"--method {args.method} needs calibration data: pass --calibration-batches N (N > 0)")
    kw: dict[str, Any] = dict(
        calibration_batches=args.calibration_batches, preset="vision",
        factorization_options=dict(args.factorization_options) or None, seed=args.seed,
        bn_recalibration_batches=args.bn_recalibration_batches, log_dense=True,
        progress=args.progress_bar)
    kw.update(overrides)
    return DSFPruneCallback(args.density, args.method, **kw)


def train_dense(args: argparse.Namespace, module: pl.LightningModule, datamodule: pl.LightningDataModule, *,
                model: str, dataset: str, epochs: int, save_to: str | None) -> dict[str, float]:
    """Train ``module`` densely (its own optimizer/schedule); logs a ``<model>-dense-s<seed>`` W&B run;
    saves the backbone's state dict to ``save_to`` (global rank 0). Returns the final val metrics."""
    logger = make_wandb_logger(args, model=model, dataset=dataset, name=f"{model}-dense-s{args.seed}",
                               tags=[model, "dense"], job_type="dense")
    trainer = make_trainer(args, max_epochs=epochs, callbacks=[], logger=logger, checkpoint_dir=None)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        _finish_wandb(logger)
    if save_to and trainer.is_global_zero and not args.fast_dev_run:
        os.makedirs(os.path.dirname(os.path.abspath(save_to)), exist_ok=True)
        torch.save(module.backbone.state_dict(), save_to)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}


def prune_and_finetune(args: argparse.Namespace, module: pl.LightningModule, datamodule: pl.LightningDataModule,
                       callback: DSFPruneCallback, *, model: str, dataset: str,
                       checkpoint_dir: str | None) -> tuple[dict[str, float], pl.Trainer]:
    """One W&B run: prune ``module`` in ``fit``'s setup (``callback``), evaluate, fine-tune ``args.max_epochs``
    epochs, evaluate. Returns the callback's metrics (``dense/``, ``pre_finetune/``, ``post_finetune/``...)."""
    name = run_name(model, args.method, args.density, args.seed)
    logger = make_wandb_logger(args, model=model, dataset=dataset, name=name,
                               tags=[model, args.method, f"density={args.density:g}"], job_type="prune-finetune")
    trainer = make_trainer(args, max_epochs=args.max_epochs, callbacks=[callback], logger=logger,
                           checkpoint_dir=checkpoint_dir)
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        _finish_wandb(logger)
    return dict(callback.metrics), trainer


def _output_dir(args: argparse.Namespace, model: str, dataset: str) -> str:
    if args.output_dir is None:
        args.output_dir = os.path.join("lightning_logs", f"{model}-{dataset}",
                                       run_name(model, args.method, args.density, args.seed))
    return args.output_dir


def _write_results(args: argparse.Namespace, trainer: pl.Trainer, result: dict[str, Any]) -> None:
    if not trainer.is_global_zero:
        return
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)


def _summary(model: str, metrics: Mapping[str, float]) -> str:
    def pct(k: str) -> str:
        v = metrics.get(k)
        return "  n/a " if v is None else f"{100 * v:6.2f}"

    rows = [("dense", "dense/val_acc"), ("pruned, before fine-tuning", "pre_finetune/val_acc"),
            ("after BN recalibration", "bn_recalibrated/val_acc"), ("after fine-tuning", "post_finetune/val_acc")]
    return "\n".join([f"{model}: val top-1 accuracy (%)"] +
                     [f"  {label:<28}{pct(k)}" for label, k in rows if k in metrics])


def _check_common(args: argparse.Namespace) -> None:
    for name in ("max_epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.calibration_batches < 0 or args.bn_recalibration_batches < 0 or args.num_workers < 0:
        raise ValueError("--calibration-batches, --bn-recalibration-batches and --num-workers must be >= 0")
    if args.limit_batches is not None and args.limit_batches < 1:
        raise ValueError(f"--limit-batches must be >= 1, got {args.limit_batches}")


def run_resnet20(args: argparse.Namespace) -> dict[str, Any]:
    """The ResNet-20 recipe on parsed ``args`` (:func:`resnet20_parser`); returns the results dict."""
    from dsf_lightning.data import CIFAR10DataModule, DigitsDataModule
    from dsf_lightning.models import ImageClassifier, resnet20

    _check_common(args)
    if args.dense_ckpt is None and args.dense_epochs < 1:
        raise ValueError("--dense-epochs must be >= 1 (or pass --dense-ckpt)")
    if args.dataset == "cifar10" and args.image_size != 32:
        raise ValueError(f"--image-size {args.image_size} applies to --dataset digits only; CIFAR-10 images are 32x32")
    if args.image_size < 8:
        raise ValueError(f"--image-size must be >= 8 (the digits are 8x8), got {args.image_size}")
    # (1) inputs: data, method and options, dense weights -- all before any training
    if args.dataset == "cifar10":
        dm = CIFAR10DataModule(args.data_dir, download=args.download, batch_size=args.batch_size,
                               num_workers=args.num_workers)
    else:
        dm = DigitsDataModule(batch_size=args.batch_size, num_workers=args.num_workers, seed=args.seed,
                              image_size=args.image_size)
    callback = build_prune_callback(args)
    model, dataset = f"resnet20-{args.width}", args.dataset
    out = _output_dir(args, model, dataset)
    pl.seed_everything(args.seed, workers=True)
    backbone = resnet20(num_classes=dm.num_classes, width=args.width)
    if args.dense_ckpt is not None:
        load_weights_file(backbone, args.dense_ckpt, "--dense-ckpt")
    # (2) dense training
    result: dict[str, Any] = {"args": vars(args)}
    if args.dense_ckpt is None:
        milestones = args.dense_milestones or [round(0.5 * args.dense_epochs), round(0.75 * args.dense_epochs)]
        dense = ImageClassifier(backbone, dm.num_classes, lr=args.dense_lr, momentum=args.momentum,
                                nesterov=args.nesterov, weight_decay=args.weight_decay, lr_schedule="step",
                                milestones=milestones)
        t = time.perf_counter()
        result["dense"] = train_dense(args, dense, dm, model=model, dataset=dataset, epochs=args.dense_epochs,
                                      save_to=os.path.join(out, "dense.pt"))
        result["dense_seconds"] = time.perf_counter() - t
    # (3) prune + fine-tune
    pl.seed_everything(args.seed, workers=True)
    module = ImageClassifier(backbone, dm.num_classes, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                             weight_decay=args.weight_decay, lr_schedule="linear")
    t = time.perf_counter()
    metrics, trainer = prune_and_finetune(args, module, dm, callback, model=model, dataset=dataset,
                                          checkpoint_dir=os.path.join(out, "checkpoints"))
    result.update(metrics=metrics, finetune_seconds=time.perf_counter() - t, world_size=trainer.world_size)
    _write_results(args, trainer, result)
    if trainer.is_global_zero:
        print(_summary(run_name(model, args.method, args.density, args.seed), metrics))
    return result


def run_resnet50(args: argparse.Namespace) -> dict[str, Any]:
    """The ResNet-50 recipe on parsed ``args`` (:func:`resnet50_parser`); returns the results dict."""
    from dsf_lightning.data import ImageNetDataModule
    from dsf_lightning.models import ImageClassifier

    _check_common(args)
    dm = ImageNetDataModule(args.data_dir, batch_size=args.batch_size, num_workers=args.num_workers,
                            num_classes=args.num_classes)
    callback = build_prune_callback(args)
    model, dataset = "resnet50", "imagenet"
    out = _output_dir(args, model, dataset)
    pl.seed_everything(args.seed, workers=True)
    backbone = load_torchvision_resnet50(args.weights, args.num_classes)
    module = ImageClassifier(backbone, args.num_classes, lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                             weight_decay=args.weight_decay, lr_schedule="linear")
    t = time.perf_counter()
    metrics, trainer = prune_and_finetune(args, module, dm, callback, model=model, dataset=dataset,
                                          checkpoint_dir=os.path.join(out, "checkpoints"))
    result = {"args": vars(args), "metrics": metrics, "finetune_seconds": time.perf_counter() - t,
              "world_size": trainer.world_size}
    _write_results(args, trainer, result)
    if trainer.is_global_zero:
        print(_summary(run_name(model, args.method, args.density, args.seed), metrics))
    return result


def _main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], Any],
          argv: Sequence[str] | None) -> int:
    args = parser.parse_args(argv)
    try:
        run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if not _bad_input(e):
            raise
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def _bad_input(e: BaseException) -> bool:
    """Errors raised by the input checks (before training) are printed without a traceback."""
    tb = e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in ("fit", "_run"):  # raised inside training: keep the traceback
            return False
        tb = tb.tb_next
    return True


def resnet20_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``recipes/resnet20_cifar10.py``; returns the exit status (2 for bad input)."""
    return _main(resnet20_parser(), run_resnet20, argv)


def resnet50_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``recipes/resnet50_imagenet.py``; returns the exit status (2 for bad input)."""
    return _main(resnet50_parser(), run_resnet50, argv)
