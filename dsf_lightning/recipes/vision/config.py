"""The vision recipes' typed configs and flags: ResNet-20 (CIFAR-10 / digits) and ResNet-50 (ImageNet).

* ResNet-20 (paper Table 3): train a CIFAR ResNet-20 densely (or load ``dense.ckpt``), one-shot prune
  every layer but the first conv and the last linear, fine-tune with a linear decay to zero.
* ResNet-50 (paper Table 4): the same for torchvision's ResNet-50 with ImageNet weights on ImageNet
  folders.

Each run is one :class:`ResNet20Config` / :class:`ResNet50Config`: ``--print-config`` shows it as YAML,
``--config FILE`` reads it back, and it is the W&B run config and ``<output_dir>/config.yaml``;
:mod:`.run` checks and runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from dsf_lightning.config import PruneConfig
from dsf_lightning.distill import DistillConfig
from dsf_lightning.recipes.cli import Config, ConfigParser, flag, group
from dsf_lightning.recipes.sections import FinetuneConfig, LoggingConfig, RunConfig, distill_flags, shared_flags

__all__ = [
    "DISTILL_KINDS",
    "DATASETS",
    "DenseConfig",
    "ImageNetDataConfig",
    "ResNet20Config",
    "ResNet20DataConfig",
    "ResNet20ModelConfig",
    "ResNet50Config",
    "ResNet50ModelConfig",
    "resnet20_parser",
    "resnet50_parser",
]

#: the distillation losses of an image classifier (``--distill``)
DISTILL_KINDS: tuple[str, ...] = ("none", "logits", "features")

Dataset = Literal["digits", "cifar10"]
DATASETS: tuple[Dataset, ...] = ("digits", "cifar10")
WIDTHS = (16, 32)


def _vision_prune() -> PruneConfig:
    return PruneConfig(density=0.1, family="vision")


# ------------------------------------------------------------------------------------------------
# ResNet-20
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResNet20DataConfig:
    """Data of the ResNet-20 recipe.

    Args:
        dataset: ``"digits"`` (scikit-learn's 8x8 digits, offline) or ``"cifar10"`` (torchvision).
        data_dir: the CIFAR-10 root, holding ``cifar-10-batches-py``.
        download: fetch CIFAR-10 into ``data_dir`` if missing.
        image_size: digits only: the side the 8x8 digits are upsampled to.
    """

    dataset: Dataset = "digits"
    data_dir: str = "data"
    download: bool = False
    image_size: int = 32

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.dataset == "cifar10" and self.image_size != 32:
            raise ValueError(f"image_size {self.image_size} applies to dataset 'digits' only; CIFAR-10 images are "
                             f"32x32")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 8:
            raise ValueError(f"image_size must be an int >= 8 (the digits are 8x8), got {self.image_size!r}")


@dataclass(frozen=True)
class ResNet20ModelConfig:
    """``width``: the ResNet-20 base width, 16 (the original network) or 32 (the paper's wider one)."""

    width: Literal[16, 32] = 16

    def __post_init__(self) -> None:
        if self.width not in WIDTHS:
            raise ValueError(f"width must be one of {WIDTHS}, got {self.width!r}")


@dataclass(frozen=True)
class DenseConfig:
    """Dense training before the prune (step schedule; momentum, weight decay and batch size are the
    ``finetune`` section's).

    Args:
        ckpt: skip dense training and load this ResNet-20 state dict (or a Lightning checkpoint of an
            ``ImageClassifier``) instead; strict.
        epochs: dense training epochs.
        lr: initial learning rate.
        milestones: epochs where the learning rate is multiplied by 0.1; ``None``: 50% and 75% of
            ``epochs``.
    """

    ckpt: str | None = None
    epochs: int = 160
    lr: float = 0.1
    milestones: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.ckpt is None and (isinstance(self.epochs, bool) or not isinstance(self.epochs, int)
                                  or self.epochs < 1):
            raise ValueError(f"epochs must be an int >= 1 (or set ckpt), got {self.epochs!r}")
        if self.milestones is not None:
            object.__setattr__(self, "milestones", tuple(self.milestones))

    def schedule(self) -> list[int]:
        """The milestones, defaulting to 50% and 75% of the epochs (80 and 120 for 160)."""
        return list(self.milestones or [round(0.5 * self.epochs), round(0.75 * self.epochs)])


@dataclass(frozen=True)
class ResNet20Config(Config):
    """One run of the ResNet-20 recipe (defaults: the paper's CIFAR settings on the offline digits)."""

    data: ResNet20DataConfig = field(default_factory=ResNet20DataConfig)
    model: ResNet20ModelConfig = field(default_factory=ResNet20ModelConfig)
    dense: DenseConfig = field(default_factory=DenseConfig)
    prune: PruneConfig = field(default_factory=_vision_prune)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(max_epochs=50, lr=0.1, batch_size=128))
    run: RunConfig = field(default_factory=lambda: RunConfig(num_workers=4))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


RESNET20_DESCRIPTION = """\
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
--dataset cifar10 reads --data-dir/cifar-10-batches-py (or fetches it with --download).

A run is one config (sections data, model, dense, prune, finetune, run, logging): --print-config
shows it as YAML, --config FILE.yaml reads such a file (flags given too override it), and it is
written to --output-dir/config.yaml and logged as the W&B run config."""


def resnet20_parser() -> ConfigParser[ResNet20Config]:
    """The command line of ``recipes/resnet20_cifar10.py``: ``.parse(argv)`` gives a :class:`ResNet20Config`."""
    flags = [
        *group(
            "model and data",
            flag("--dataset", to="data.dataset", choices=DATASETS,
                 help="digits: offline embedded default; cifar10: torchvision CIFAR-10"),
            flag("--data-dir", to="data.data_dir", help="CIFAR-10 root (holding cifar-10-batches-py)"),
            flag("--download", to="data.download", action="store_true",
                 help="download CIFAR-10 into --data-dir if missing"),
            flag("--image-size", to="data.image_size", type=int,
                 help="digits only: side the 8x8 digits are upsampled to (CIFAR-10 images are 32x32)"),
            flag("--width", to="model.width", type=int, choices=WIDTHS,
                 help="ResNet-20 base width (16: original network; 32: the paper's wider one)"),
        ),
        *group(
            "dense training",
            flag("--dense-ckpt", to="dense.ckpt",
                 help="skip dense training: load this ResNet-20 state dict (or a Lightning checkpoint of an "
                      "ImageClassifier); strict, must match --width"),
            flag("--dense-epochs", to="dense.epochs", type=int, help="dense training epochs"),
            flag("--dense-lr", to="dense.lr", type=float, help="dense initial learning rate"),
            flag("--dense-milestones", to="dense.milestones", type=int, nargs="+",
                 help="epochs where the dense lr is multiplied by 0.1; default: 50%% and 75%% of --dense-epochs "
                      "(80 120 for 160)"),
        ),
        *shared_flags(),
        *distill_flags(DISTILL_KINDS),
    ]
    return ConfigParser(ResNet20Config, flags, prog="resnet20_cifar10.py", description=RESNET20_DESCRIPTION,
                        epilog="example: python recipes/resnet20_cifar10.py --dataset cifar10 --data-dir data "
                               "--download --width 32 --method dsf --density 0.1 --devices 2")


# ------------------------------------------------------------------------------------------------
# ResNet-50
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageNetDataConfig:
    """``data_dir``: the ImageNet root holding ``train/`` and ``val/`` ImageFolder subfolders."""

    data_dir: str = "data/imagenet"


@dataclass(frozen=True)
class ResNet50ModelConfig:
    """torchvision's ResNet-50.

    Args:
        weights: ``"imagenet"`` (torchvision ``IMAGENET1K_V1``), a ResNet-50 state-dict file (strict),
            or ``"none"`` (random initialization).
        num_classes: classifier outputs.
    """

    weights: str = "imagenet"
    num_classes: int = 1000

    def __post_init__(self) -> None:
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}")


@dataclass(frozen=True)
class ResNet50Config(Config):
    """One run of the ResNet-50 recipe (defaults: the paper's ImageNet fine-tuning settings)."""

    data: ImageNetDataConfig = field(default_factory=ImageNetDataConfig)
    model: ResNet50ModelConfig = field(default_factory=ResNet50ModelConfig)
    prune: PruneConfig = field(default_factory=_vision_prune)
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(max_epochs=20, lr=0.01, batch_size=256))
    run: RunConfig = field(default_factory=lambda: RunConfig(num_workers=8))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


RESNET50_DESCRIPTION = """\
Prune torchvision's ImageNet ResNet-50 with Double Sparse Factorization (or a baseline) and
fine-tune it (paper section 5.4, Table 4): prune every conv/linear layer except the first conv
and the last linear to --density (data-free weight projection unless --calibration-batches > 0),
fine-tune 20 epochs with SGD, lr 0.01 decaying linearly to zero, momentum 0.9, batch 256, AMP on
GPU; log dense/*, pre_finetune/*, post_finetune/* (val_acc, val_acc5, val_loss) to W&B.

Data: --data-dir with train/ and val/ ImageFolder subfolders (one folder per class).
Weights: 'imagenet' = torchvision's ResNet50_Weights.IMAGENET1K_V1 (downloaded on first use into
the torch hub cache); without network access pass --weights PATH, a local state-dict file (for
example that cached resnet50-0676ba61.pth), or --weights none for a random initialization.

A run is one config (sections data, model, prune, finetune, run, logging): --print-config shows
it as YAML, --config FILE.yaml reads such a file (flags given too override it), and it is
written to --output-dir/config.yaml and logged as the W&B run config."""


def resnet50_parser() -> ConfigParser[ResNet50Config]:
    """The command line of ``recipes/resnet50_imagenet.py``: ``.parse(argv)`` gives a :class:`ResNet50Config`."""
    flags = [
        *group(
            "model and data",
            flag("--data-dir", to="data.data_dir", help="ImageNet root holding train/ and val/"),
            flag("--weights", to="model.weights",
                 help="'imagenet' (torchvision IMAGENET1K_V1, needs a download or the hub cache), a path to a "
                      "ResNet-50 state-dict file (strict load), or 'none'"),
            flag("--num-classes", to="model.num_classes", type=int, help="classifier outputs"),
        ),
        *shared_flags(),
        *distill_flags(DISTILL_KINDS),
    ]
    return ConfigParser(ResNet50Config, flags, prog="resnet50_imagenet.py", description=RESNET50_DESCRIPTION,
                        epilog="example: python recipes/resnet50_imagenet.py --data-dir /data/imagenet --density 0.1 "
                               "--devices 8")
