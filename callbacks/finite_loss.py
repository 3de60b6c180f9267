"""``FiniteLossGuard``: stop fine-tuning at the first non-finite loss, before it reaches the weights.

>>> trainer = Trainer(callbacks=[FiniteLossGuard(), ModelCheckpoint(save_last=True)])

The check runs in ``on_before_backward``: the loss of the step is known, its gradients are not yet
computed, so the weights (and any checkpoint) stay those of the last good step. The error names the
step and the last checkpoint written, which Lightning leaves in place. Under DDP every rank takes the
same decision (``strategy.reduce_boolean_decision``), so no rank is left waiting in a collective.
"""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["FiniteLossGuard", "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or infinite; the message names the step and the last good checkpoint."""


class FiniteLossGuard(Callback):
    """Raise :class:`NonFiniteLossError` at the first NaN/Inf training loss (on any rank), before its backward."""

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        value = float(loss.detach().float().sum()) if loss.numel() else math.nan
        raise NonFiniteLossError(
            f"non-finite training loss ({value} on rank {trainer.global_rank}, or on another rank) at global step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}); stopped before its backward, so the weights are "
            f"those after step {trainer.global_step}. Last good checkpoint: {self.last_checkpoint(trainer)}")

    @staticmethod
    def last_checkpoint(trainer: pl.Trainer) -> str:
        """The newest checkpoint the trainer's ``ModelCheckpoint`` callbacks wrote (kept), or why there is none."""
        paths = [p for cb in trainer.checkpoint_callbacks for p in (cb.last_model_path, cb.best_model_path)
                 if p and os.path.exists(p)]
        if not paths:
            return "none written (add a ModelCheckpoint to keep one)"
        return f"{max(paths, key=os.path.getmtime)} (kept)"
