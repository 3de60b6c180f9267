"""What the callback needs of Lightning's strategies: which can take compressed factors resized by the prune,
and wrapping DDP again around them."""

from __future__ import annotations

import gc

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, Strategy
from torch.nn.parallel import DistributedDataParallel

__all__ = ["check_resizable", "rewrap_ddp"]


def check_resizable(strategy: Strategy, who: str) -> None:
    """``ValueError`` unless ``strategy`` lets the prune resize trainable parameters after its setup: one
    device, or DDP (wrapped again by :func:`rewrap_ddp`). Sharding strategies own their parameters."""
    if isinstance(strategy, SingleDeviceStrategy) or (
            isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)):
        return
    raise ValueError(f"{who}(storage='compressed') supports single-device and DDP strategies (the prune resizes "
                     f"the trainable values, then wraps DDP again); {type(strategy).__name__} is not one: pass "
                     f"storage='masked'")


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """Wrap the LightningModule in DDP again (the strategy's own ``configure_ddp``): DDP's reducer and gradient
    hooks hold the parameter sizes it was built with. No-op when the module is not DDP-wrapped."""
    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.lightning_module
        gc.collect()  # frees the old reducer's gradient accumulators, which carry the old shapes
        strategy.configure_ddp()
