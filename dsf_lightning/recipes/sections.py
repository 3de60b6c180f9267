"""The config sections and flags the vision recipes share: fine-tuning, hardware and run, logging, pruning flags."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from dsf_lightning.config import PruneConfig
from dsf_lightning.distill import DistillConfig
from dsf_lightning.dtypes import DTYPES
from dsf_lightning.factorization import check_density
from dsf_lightning.modules import STORAGES
from dsf_lightning.pipeline.allocation import ALLOCATIONS
from dsf_lightning.recipes.cli import Flag, flag, group

__all__ = [
    "RECIPE_METHODS",
    "WANDB_MODES",
    "FinetuneConfig",
    "LoggingConfig",
    "RecipeConfig",
    "RunConfig",
    "at_least",
    "check_distill",
    "distill_flags",
    "shared_flags",
]

#: The methods the recipes' ``--method`` offers (a config file may name any registered one: ``prune.method``).
RECIPE_METHODS: tuple[str, ...] = ("dsf", "magnitude", "wanda", "admm", "sparsegpt")
WandbMode = Literal["auto", "online", "offline", "off"]
WANDB_MODES: tuple[WandbMode, ...] = ("auto", "online", "offline", "off")


def at_least(obj: Any, name: str, minimum: int, *, allow_none: bool = False) -> None:
    """A config field check: ``obj.name`` is an int >= ``minimum`` (or ``None`` if allowed), else ``ValueError``."""
    value = getattr(obj, name)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


# ------------------------------------------------------------------------------------------------
# config sections
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning after the prune: SGD, learning rate decaying linearly to zero. The dense training of
    the ResNet-20 recipe uses the same momentum, Nesterov, weight decay and batch size.

    Args:
        max_epochs: fine-tuning epochs.
        lr: initial learning rate.
        batch_size: per device.
        momentum, nesterov, weight_decay: of SGD (weight decay on every parameter).
        bn_recalibration_batches: ``N > 0``: re-estimate the BatchNorm statistics on ``N`` train
            batches after the prune (logged as ``bn_recalibrated/*``).
        lr_schedule: the decay to zero over the fine-tuning steps: ``linear`` (the paper's) or ``cosine``.
    """

    max_epochs: int
    lr: float
    batch_size: int
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    bn_recalibration_batches: int = 0
    lr_schedule: Literal["linear", "cosine"] = "linear"

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("linear", "cosine"):
            raise ValueError(f"lr_schedule must be 'linear' or 'cosine', got {self.lr_schedule!r}")
        at_least(self, "max_epochs", 1)
        at_least(self, "batch_size", 1)
        at_least(self, "bn_recalibration_batches", 0)


@dataclass(frozen=True)
class RunConfig:
    """Hardware and run settings.

    Args:
        num_workers: dataloader workers per process.
        accelerator: Lightning's (``"auto"``, ``"cpu"``, ``"gpu"``, ...).
        devices: devices per node, an int or ``"auto"``.
        num_nodes: number of nodes.
        strategy: Lightning's; ``None``: ``"ddp"`` with more than one device or node, else ``"auto"``.
        precision: Lightning's; ``None``: ``"16-mixed"`` when CUDA is available, else ``"32"``.
        seed: of initialization and data order (the prune's seed is ``prune.seed``).
        fast_dev_run: one batch of each stage (Lightning disables loggers and checkpoints).
        limit_batches: at most this many train and val batches per epoch; ``None``: all.
        limit_train_batches: at most this many train batches per epoch, over ``limit_batches`` for training
            only (short fine-tunes still validated on the whole validation set); ``None``: ``limit_batches``.
        progress_bar: Lightning's progress bar (and the prune's progress over layers).
    """

    num_workers: int
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str | None = None
    precision: str | None = None
    seed: int = 0
    fast_dev_run: bool = False
    limit_batches: int | None = None
    limit_train_batches: int | None = None
    progress_bar: bool = True

    def __post_init__(self) -> None:
        at_least(self, "num_workers", 0)
        if self.devices != "auto":
            at_least(self, "devices", 1)
        at_least(self, "num_nodes", 1)
        at_least(self, "seed", 0)
        at_least(self, "limit_batches", 1, allow_none=True)
        at_least(self, "limit_train_batches", 1, allow_none=True)


@dataclass(frozen=True)
class LoggingConfig:
    """Where results go.

    Args:
        output_dir: checkpoints, ``config.yaml`` and ``results.json``; ``None``:
            ``lightning_logs/<group>/<run name>``.
        wandb: ``"auto"`` (online when W&B credentials exist, else offline), ``"online"``, ``"offline"``
            or ``"off"``.
        wandb_project: the W&B project; ``None``: ``dsf-<task>`` (``dsf-cifar10``, ``dsf-imagenet``,
            ``dsf-digits``, ``dsf-llm``).
        wandb_group: the W&B group, one per experiment (a sweep); ``None``: ``<model>-<dataset>``.
        wandb_dir: W&B's ``save_dir`` (runs go to ``<dir>/wandb``).
    """

    output_dir: str | None = None
    wandb: WandbMode = "auto"
    wandb_project: str | None = None
    wandb_group: str | None = None
    wandb_dir: str = "."

    def __post_init__(self) -> None:
        if self.wandb not in WANDB_MODES:
            raise ValueError(f"wandb must be one of {WANDB_MODES}, got {self.wandb!r}")


class RecipeConfig(Protocol):
    """The sections every recipe config has (``ResNet20Config``, ``ResNet50Config``)."""

    prune: PruneConfig
    finetune: FinetuneConfig
    run: RunConfig
    logging: LoggingConfig
    distill: DistillConfig

    def to_dict(self) -> dict[str, Any]: ...

    def to_yaml(self) -> str: ...


# ------------------------------------------------------------------------------------------------
# flags of the shared sections
# ------------------------------------------------------------------------------------------------
def _density(s: str) -> float:
    try:
        return check_density(float(s), "density")
    except ValueError:
        raise argparse.ArgumentTypeError(f"density must be a number in (0, 1], got {s!r}") from None


def _json_dict(s: str) -> dict[str, Any]:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {s!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"outer_iters\": 10}}', got {s!r}")
    return v


def _devices(s: str) -> int | str:
    if s == "auto":
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or 'auto', got {s!r}") from None


def shared_flags() -> list[Flag]:
    """The flags of the ``prune``, ``finetune``, ``run`` and ``logging`` sections."""
    return [
        *group(
            "pruning",
            flag("--method", to="prune.method", choices=RECIPE_METHODS,
                 help="dsf: double sparse factorization W ~= S @ F; the others: single-mask pruning baselines "
                      "with the same per-layer budget"),
            flag("--density", to="prune.density", type=_density,
                 help="fraction of weights kept in every pruned layer (both DSF factors together)"),
            flag("--calibration-batches", to="prune.calibration_batches", type=int,
                 help="0: data-free weight projection (the paper's fine-tuning setting); N > 0: layer-wise pruning "
                      "with input Grams of N training batches (wanda and sparsegpt need this)"),
            flag("--bn-recalibration-batches", to="finetune.bn_recalibration_batches", type=int,
                 help="N > 0: after pruning, re-estimate BatchNorm statistics on N training batches "
                      "(logged as bn_recalibrated/*)"),
            flag("--factorization-options", to="prune.factorization_options", type=_json_dict,
                 help="JSON object of method options, e.g. '{\"outer_iters\": 10}' (see dsf_lightning.factorization)"),
            flag("--allocation", to="prune.allocation", choices=ALLOCATIONS,
                 help="how --density is spread over the layers: uniform (every layer at --density), global (the "
                      "model-wide budget, equal marginal error per nonzero) or owl (outlier-weighted)"),
            flag("--allocation-options", to="prune.allocation_options", type=_json_dict,
                 help="JSON object of the allocation's options, e.g. '{\"max_ratio\": 2}' "
                      "(see dsf_lightning.pipeline.allocation)"),
            flag("--storage", to="prune.storage", choices=STORAGES,
                 help="how the pruned layers hold their factors while fine-tuning: compressed (the nonzeros are the "
                      "parameters: gradients and AdamW state scale with them) or masked (full-size parameters "
                      "times masks)"),
        ),
        *group(
            "fine-tuning",
            flag("--max-epochs", to="finetune.max_epochs", type=int, help="fine-tuning epochs after pruning"),
            flag("--lr", to="finetune.lr", type=float, help="initial fine-tuning learning rate (decaying to zero)"),
            flag("--lr-schedule", to="finetune.lr_schedule", choices=("linear", "cosine"),
                 help="the decay to zero over the fine-tuning steps: linear (the paper's) or cosine"),
            flag("--momentum", to="finetune.momentum", type=float, help="SGD momentum"),
            flag("--nesterov", to="finetune.nesterov", action="store_true", help="Nesterov momentum"),
            flag("--weight-decay", to="finetune.weight_decay", type=float, help="SGD weight decay (all parameters)"),
            flag("--batch-size", to="finetune.batch_size", type=int, help="batch size per device"),
        ),
        *group(
            "hardware and run",
            flag("--accelerator", to="run.accelerator", help="Lightning accelerator: auto, cpu, gpu, ..."),
            flag("--devices", to="run.devices", type=_devices, help="devices per node (an int, or 'auto')"),
            flag("--num-nodes", to="run.num_nodes", type=int, help="number of nodes"),
            flag("--strategy", to="run.strategy",
                 help="Lightning strategy; default: 'ddp' with more than one device or node, else 'auto'"),
            flag("--precision", to="run.precision",
                 help="Lightning precision; default: '16-mixed' (AMP) when CUDA is available, else '32'"),
            flag("--num-workers", to="run.num_workers", type=int, help="dataloader workers per process"),
            flag("--seed", to=("run.seed", "prune.seed"), type=int,
                 help="seed of initialization, data order and pruning"),
            flag("--fast-dev-run", to="run.fast_dev_run", action="store_true",
                 help="run one batch of each stage to check the setup (Lightning disables loggers and checkpoints "
                      "for it)"),
            flag("--limit-batches", to="run.limit_batches", type=int,
                 help="use at most N train and N val batches per epoch (quick real runs)"),
            flag("--limit-train-batches", to="run.limit_train_batches", type=int,
                 help="use at most N train batches per epoch (over --limit-batches for training only: short "
                      "fine-tunes scored on the whole validation set)"),
            flag("--output-dir", to="logging.output_dir",
                 help="checkpoints, config.yaml and results.json; default: lightning_logs/<group>/<run name>"),
            flag("--wandb", to="logging.wandb", choices=WANDB_MODES,
                 help="W&B logging: auto = online when credentials exist (WANDB_API_KEY or a netrc entry), else "
                      "offline (runs under ./wandb, upload later with `wandb sync`)"),
            flag("--wandb-project", to="logging.wandb_project",
                 help="W&B project; default: dsf-<task> (dsf-cifar10, dsf-imagenet, dsf-digits, dsf-llm)"),
            flag("--wandb-group", to="logging.wandb_group",
                 help="W&B group: one per experiment, e.g. a sweep; default: <model>-<dataset>"),
            flag("--wandb-dir", to="logging.wandb_dir", help="W&B save_dir (runs go to <dir>/wandb)"),
            flag("--progress-bar", to="run.progress_bar", action=argparse.BooleanOptionalAction,
                 help="show Lightning's progress bar"),
        ),
    ]


def distill_flags(kinds: tuple[str, ...]) -> list[Flag]:
    """The flags of the ``distill`` section (:class:`~dsf_lightning.distill.DistillConfig`); ``kinds``: the
    losses the recipe's model offers."""
    return group(
        "distillation from the dense model while fine-tuning (dsf_lightning.distill)",
        flag("--distill", to="distill.kind", choices=kinds,
             help="none (plain cross-entropy); logits: (1 - w) CE + w T^2 KL; "
                  + ("squarehead: CE + w x the per-block normalized hidden-state MSE" if "squarehead" in kinds
                     else "features: CE + w x the per-stage normalized feature MSE")),
        flag("--distill-weight", to="distill.weight", type=float,
             help="w: the KD share for logits (in [0, 1]), the layer terms' weight otherwise"),
        flag("--distill-temperature", to="distill.temperature", type=float, help="T of the logit term"),
        flag("--distill-logit-weight", to="distill.logit_weight", type=float,
             help="a logit term's weight beside the layer terms (default 0: none)"),
        flag("--teacher-dtype", to="distill.teacher_dtype", choices=tuple(DTYPES),
             help="dtype the dense teacher is held in (default: the model's)"),
    )


def check_distill(distill: DistillConfig, kinds: tuple[str, ...], finetunes: bool) -> None:
    """``ValueError`` unless ``distill.kind`` is one of the recipe's ``kinds`` and, when distilling, the run
    fine-tunes (``finetunes``)."""
    if distill.kind not in kinds:
        raise ValueError(f"--distill {distill.kind!r} is not offered by this recipe; use one of {kinds}")
    if distill.kind != "none" and not finetunes:
        raise ValueError(f"--distill {distill.kind} distills while fine-tuning, and this run does not fine-tune")
