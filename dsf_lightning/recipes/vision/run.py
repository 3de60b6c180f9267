"""The vision recipes' runs: prepare (every check before any work), dense training, prune, fine-tune, results.

ResNet-20 on CIFAR-10 / digits and ResNet-50 on ImageNet, each from its config (:mod:`.config`).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from dsf_lightning import __version__
from dsf_lightning.distill import distiller_for
from dsf_lightning.recipes.common import (
    Prepared,
    build_prune_callback,
    identity,
    load_weights_file,
    memory_figures,
    prune_and_finetune,
    recipe_main,
    summary,
    train_dense,
    with_output_dir,
    write_config,
    write_results,
)
from dsf_lightning.recipes.sections import check_distill
from dsf_lightning.recipes.vision.config import (
    DISTILL_KINDS,
    ResNet20Config,
    ResNet50Config,
    resnet20_parser,
    resnet50_parser,
)
from dsf_lightning.runs.records import run_name

__all__ = [
    "execute_resnet20",
    "execute_resnet50",
    "load_torchvision_resnet50",
    "prepare_resnet20",
    "prepare_resnet50",
    "resnet20_main",
    "resnet20_parser",
    "resnet50_main",
    "resnet50_parser",
    "run_resnet20",
    "run_resnet50",
]


def prepare_resnet20(config: ResNet20Config) -> Prepared:
    """Every input check of a ResNet-20 run (data, method and options, dense weights) and its parts; no
    training. Raises ``FileNotFoundError`` / ``ValueError`` naming the bad input."""
    from dsf_lightning.data import CIFAR10DataModule, DigitsDataModule
    from dsf_lightning.models import resnet20

    data, run = config.data, config.run
    if data.dataset == "cifar10":
        dm = CIFAR10DataModule(data.data_dir, download=data.download, batch_size=config.finetune.batch_size,
                               num_workers=run.num_workers)
    else:
        dm = DigitsDataModule(batch_size=config.finetune.batch_size, num_workers=run.num_workers, seed=run.seed,
                              image_size=data.image_size)
    check_distill(config.distill, DISTILL_KINDS, True)
    callback = build_prune_callback(config)
    model = f"resnet20-{config.model.width}"
    config = with_output_dir(config, model, data.dataset)
    pl.seed_everything(run.seed, workers=True)
    backbone = resnet20(num_classes=dm.num_classes, width=config.model.width)
    if config.dense.ckpt is not None:
        load_weights_file(backbone, config.dense.ckpt, "--dense-ckpt")
    return Prepared(config, dm, callback, backbone, model, data.dataset)


def execute_resnet20(prepared: Prepared) -> dict[str, Any]:
    """Train densely (unless ``dense.ckpt``), prune, fine-tune; writes ``config.yaml`` and ``results.json``
    to the output directory and returns the results."""
    from dsf_lightning.models import ImageClassifier

    config: ResNet20Config = prepared.config
    out, ft, dm = config.logging.output_dir, config.finetune, prepared.datamodule
    write_config(config, out)
    result: dict[str, Any] = {"config": config.to_dict()}
    if config.dense.ckpt is None:
        dense = ImageClassifier(prepared.backbone, dm.num_classes, lr=config.dense.lr, momentum=ft.momentum,
                                nesterov=ft.nesterov, weight_decay=ft.weight_decay, lr_schedule="step",
                                milestones=config.dense.schedule())
        t = time.perf_counter()
        result["dense"] = train_dense(config, dense, dm, model=prepared.model, dataset=prepared.dataset,
                                      epochs=config.dense.epochs, save_to=os.path.join(out, "dense.pt"))
        result["dense_seconds"] = time.perf_counter() - t
    pl.seed_everything(config.run.seed, workers=True)
    module = ImageClassifier(prepared.backbone, dm.num_classes, lr=ft.lr, momentum=ft.momentum,
                             nesterov=ft.nesterov, weight_decay=ft.weight_decay, lr_schedule=ft.lr_schedule,
                             distiller=distiller_for(prepared.backbone, config.distill))  # teacher: the dense one
    return _finetune(prepared, module, result)


def run_resnet20(config: ResNet20Config) -> dict[str, Any]:
    """:func:`prepare_resnet20` then :func:`execute_resnet20`."""
    return execute_resnet20(prepare_resnet20(config))


def resnet20_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``recipes/resnet20_cifar10.py``; returns the exit status (2 for bad input)."""
    return recipe_main(resnet20_parser(), prepare_resnet20, execute_resnet20, argv)


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


def prepare_resnet50(config: ResNet50Config) -> Prepared:
    """Every input check of a ResNet-50 run (data folders, method and options, weights) and its parts;
    no training. Raises ``FileNotFoundError`` / ``ValueError`` / ``RuntimeError`` naming the bad input."""
    from dsf_lightning.data import ImageNetDataModule

    dm = ImageNetDataModule(config.data.data_dir, batch_size=config.finetune.batch_size,
                            num_workers=config.run.num_workers, num_classes=config.model.num_classes)
    check_distill(config.distill, DISTILL_KINDS, True)
    callback = build_prune_callback(config)
    config = with_output_dir(config, "resnet50", "imagenet")
    pl.seed_everything(config.run.seed, workers=True)
    backbone = load_torchvision_resnet50(config.model.weights, config.model.num_classes)
    return Prepared(config, dm, callback, backbone, "resnet50", "imagenet")


def execute_resnet50(prepared: Prepared) -> dict[str, Any]:
    """Prune and fine-tune; writes ``config.yaml`` and ``results.json`` and returns the results."""
    from dsf_lightning.models import ImageClassifier

    config: ResNet50Config = prepared.config
    ft = config.finetune
    write_config(config, config.logging.output_dir)
    module = ImageClassifier(prepared.backbone, config.model.num_classes, lr=ft.lr, momentum=ft.momentum,
                             nesterov=ft.nesterov, weight_decay=ft.weight_decay, lr_schedule=ft.lr_schedule,
                             distiller=distiller_for(prepared.backbone, config.distill))  # teacher: the dense one
    return _finetune(prepared, module, {"config": config.to_dict()})


def run_resnet50(config: ResNet50Config) -> dict[str, Any]:
    """:func:`prepare_resnet50` then :func:`execute_resnet50`."""
    return execute_resnet50(prepare_resnet50(config))


def resnet50_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``recipes/resnet50_imagenet.py``; returns the exit status (2 for bad input)."""
    return recipe_main(resnet50_parser(), prepare_resnet50, execute_resnet50, argv)


# ------------------------------------------------------------------------------------------------
def _finetune(prepared: Prepared, module: pl.LightningModule, result: dict[str, Any]) -> dict[str, Any]:
    """The prune + fine-tune stage shared by both recipes, then results.json and the summary."""
    config = prepared.config
    out = config.logging.output_dir
    t = time.perf_counter()
    metrics, trainer = prune_and_finetune(config, module, prepared.datamodule, prepared.callback,
                                          model=prepared.model, dataset=prepared.dataset,
                                          checkpoint_dir=os.path.join(out, "checkpoints"))
    result.update(identity=identity(config, prepared.model), version=__version__, metrics=metrics,
                  finetune_seconds=time.perf_counter() - t, finetune_memory=memory_figures(trainer),
                  world_size=trainer.world_size)
    write_results(trainer, out, result)
    if trainer.is_global_zero:
        print(summary(run_name(result["identity"]), metrics))
    return result
