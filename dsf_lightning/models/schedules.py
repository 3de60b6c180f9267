"""Learning-rate schedules per optimizer step: linear warmup, then cosine or linear decay (or constant)."""

from __future__ import annotations

import math
from typing import Literal

__all__ = ["SCHEDULES", "Schedule", "lr_factor"]

Schedule = Literal["cosine", "linear", "constant"]
SCHEDULES: tuple[Schedule, ...] = ("cosine", "linear", "constant")


def lr_factor(step: int, total: int, warmup: int, schedule: Schedule, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based) of ``total``: ``(step + 1) / warmup``
    during the ``warmup`` steps, then from 1 down to ``min_ratio`` at ``total`` (cosine or linear), or 1."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape
