"""Re-estimating BatchNorm running statistics after pruning, with ``torch.optim.swa_utils.update_bn``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch
from torch import nn

__all__ = ["recalibrate_batchnorm"]


class _ForwardModule(nn.Module):
    """``update_bn`` calls ``model(batch)``; this runs ``forward(module, batch)`` instead."""

    def __init__(self, module: nn.Module, forward: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.module, self._forward = module, forward

    def forward(self, batch: Any) -> Any:
        return self._forward(self.module, batch)


def recalibrate_batchnorm(module: nn.Module, batches: Iterable, forward: Callable[[nn.Module, Any], Any],
                          limit: int) -> bool:
    """Reset every BatchNorm's running statistics and re-estimate them (cumulative average) over at most
    ``limit`` of ``batches``, each run as ``forward(module, batch)`` in train mode without grad.

    Every module's training flag is restored afterwards. Returns whether ``module`` has a BatchNorm.
    """
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return False
    modes = {m: m.training for m in module.modules()}
    try:
        # update_bn feeds input[0] of each tuple to the model: wrap each batch in a 1-tuple
        torch.optim.swa_utils.update_bn(((b,) for b in islice(batches, limit)), _ForwardModule(module, forward))
    finally:
        for m, mode in modes.items():  # update_bn restores one flag for the whole model
            m.training = mode
    return True
