"""``ImageClassifier``: a LightningModule around any image backbone (torchvision, timm, resnet20).

>>> module = ImageClassifier(resnet20(), num_classes=10, lr=0.1, lr_schedule="step", milestones=(80, 120))
>>> module = ImageClassifier(torchvision.models.resnet50(), num_classes=1000, lr=0.01, lr_schedule="linear")

Training: cross-entropy, SGD (momentum, optional Nesterov, weight decay). Schedules of the paper
(section 5.4):

* ``"step"``: multiply the learning rate by ``gamma`` (0.1) at the epochs in ``milestones`` -- the
  dense CIFAR training (160 epochs, x0.1 at 80 and 120);
* ``"linear"``: decay linearly from ``lr`` to zero over all optimizer steps of the run
  (``trainer.estimated_stepping_batches``), updated every step -- the fine-tuning after pruning;
* ``"cosine"``: from ``lr`` to zero along a half cosine over the same steps;
* ``"constant"``: no schedule.

Validation logs ``val_loss``, ``val_acc`` (top-1) and ``val_acc5`` (top-5, or top-``num_classes``
when there are fewer than 5 classes) as epoch metrics (torchmetrics ``MulticlassAccuracy``, micro
average, synchronized across DDP ranks). ``DSFPruneCallback`` logs the same names with its
``dense/``, ``pre_finetune/``, ``post_finetune/`` prefixes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from dsf_lightning.distill import Distiller
from dsf_lightning.models.schedules import lr_factor
from dsf_lightning.persistence.structure import PrunedCheckpointMixin

__all__ = ["ImageClassifier"]

Schedule = Literal["step", "linear", "cosine", "constant"]


class ImageClassifier(PrunedCheckpointMixin, pl.LightningModule):
    """Image classification with SGD and the paper's learning-rate schedules.

    Checkpoints of pruned runs load with ``ImageClassifier.load_from_checkpoint(path, backbone=...)``
    (:class:`~dsf_lightning.persistence.structure.PrunedCheckpointMixin` rebuilds the pruned structure).

    Args:
        backbone: ``nn.Module`` mapping ``(N, C, H, W)`` images to ``(N, num_classes)`` logits
            (not saved in the hyperparameters: pass it again to ``load_from_checkpoint``).
        num_classes: number of classes (for the accuracy metrics).
        lr: initial learning rate.
        momentum, nesterov, weight_decay: of ``torch.optim.SGD`` (weight decay on every parameter).
        lr_schedule: ``"step"`` (x ``gamma`` at ``milestones`` epochs), ``"linear"`` or ``"cosine"`` (to zero
            over the run, per step; :func:`~dsf_lightning.models.schedules.lr_factor`) or ``"constant"``.
        milestones: epochs of the step schedule.
        gamma: factor of the step schedule.
        label_smoothing: of the cross-entropy loss.
        distiller: distillation from the dense model (:class:`~dsf_lightning.distill.Distiller`, over copies of
            the backbone: ``logits`` or ``features``): the loss becomes its total; ``train/ce`` and each term
            (``train/kd``, ``train/features``) are logged. The teacher moves to the module's device when fitting
            starts and is never in a checkpoint.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 1e-4,
        lr_schedule: Schedule = "step",
        milestones: Sequence[int] = (80, 120),
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        distiller: Distiller | None = None,
    ) -> None:
        super().__init__()
        if lr_schedule not in ("step", "linear", "cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'step', 'linear', 'cosine' or 'constant', got {lr_schedule!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov=True needs momentum > 0")
        if distiller is not None and distiller.config.kind not in ("logits", "features"):
            raise ValueError(f"ImageClassifier distills 'logits' or 'features', got {distiller.config.kind!r}")
        self.save_hyperparameters(ignore=["backbone", "distiller"])
        self.distiller = distiller  # a plain attribute: the teacher is no submodule, so in no state dict
        if distiller is not None:
            distiller.attach(backbone)
        self.hparams["milestones"] = list(milestones)
        self.backbone = backbone
        self.num_classes = num_classes
        top5 = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    def on_fit_start(self) -> None:
        """The teacher (if distilling) on the module's device."""
        if self.distiller is not None:
            self.distiller.to(self.device)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def _loss(self, logits: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        if self.distiller is not None:
            terms = self.distiller(logits, x)
            for name, value in {"ce": loss, **terms}.items():
                self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=True)
            loss = self.distiller.total(loss, terms)
        self.train_acc(logits.detach(), y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.val_acc5(logits, y)
        self.log("val_loss", self._loss(logits, y), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)
        self.log("val_acc5", self.val_acc5)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        h = self.hparams
        opt = torch.optim.SGD(self.parameters(), lr=h.lr, momentum=h.momentum, nesterov=h.nesterov,
                              weight_decay=h.weight_decay)
        if h.lr_schedule == "constant":
            return opt
        if h.lr_schedule == "step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(h.milestones), gamma=h.gamma)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        total = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, 0, h.lr_schedule))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
