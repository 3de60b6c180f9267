"""``TrainingMemory``: what a fine-tune holds, read from its tensors, and the peak memory of its steps.

>>> memory = TrainingMemory()
>>> trainer = Trainer(callbacks=[DSFPruneCallback(0.5), memory]); trainer.fit(module)
>>> memory.figures  # {"storage": "compressed", "training_state_bytes": {...}, "peak_bytes": ..., "peak_kind": ...}

The training state is counted once, after the first optimizer step (when gradients and the optimizer's
moments exist): parameters, gradients, optimizer state and buffers of the LightningModule, in bytes, on this
rank. The peak is ``torch.cuda.max_memory_allocated`` since ``fit`` started on a GPU, else this process's
resident set sampled in a thread while training (``ru_maxrss`` would include everything before ``fit``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from typing_extensions import override

from dsf_lightning.persistence.structure import pruned_modules

__all__ = ["RSSPeak", "TrainingMemory", "model_storage", "training_state_bytes"]


def _nbytes(tensors: Iterable[Any]) -> int:
    """Bytes this process holds: a sharded tensor (DTensor, FSDP2) counts its local shard."""
    local = (t.to_local() if isinstance(t, DTensor) else t for t in tensors)
    return sum(t.numel() * t.element_size() for t in local if isinstance(t, Tensor))


def training_state_bytes(module: nn.Module, optimizers: Iterable[torch.optim.Optimizer] = ()) -> dict[str, int]:
    """Bytes of ``module``'s parameters, their gradients, the ``optimizers``' state and the buffers, and the
    ``total``, read from the tensors (shared tensors counted once per reference)."""
    params = list(module.parameters())
    out = {"parameters": _nbytes(params), "gradients": _nbytes(p.grad for p in params),
           "optimizer": _nbytes(t for opt in optimizers for s in opt.state.values() for t in s.values()),
           "buffers": _nbytes(module.buffers())}
    out["total"] = sum(out.values())
    return out


def model_storage(module: nn.Module) -> str:
    """``"compressed"`` or ``"masked"`` (the storage of every pruned module), ``"mixed"``, or ``"dense"``."""
    storages = {m.storage for _, m in pruned_modules(module)}
    return "dense" if not storages else storages.pop() if len(storages) == 1 else "mixed"


class RSSPeak:
    """Context manager: this process's peak resident set (``peak`` bytes), sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.01) -> None:
        import psutil

        self._proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> RSSPeak:
        self.peak = self._proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-peak", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.peak = max(self.peak, self._proc.memory_info().rss)


class TrainingMemory(Callback):
    """Record the fine-tune's training state and peak memory in :attr:`figures` (module docstring)."""

    def __init__(self, interval: float = 0.01) -> None:
        super().__init__()
        self.interval = interval
        self.figures: dict[str, Any] = {}
        self._rss: RSSPeak | None = None
        self._cuda: torch.device | None = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.figures = {"storage": model_storage(pl_module), "training_state_bytes": None, "peak_bytes": None}
        device = pl_module.device
        if device.type == "cuda":
            self._cuda = device
            torch.cuda.reset_peak_memory_stats(device)
            self.figures["peak_kind"] = "cuda max_memory_allocated"
        else:
            self._rss = RSSPeak(self.interval).__enter__()
            self.figures["peak_kind"] = "sampled RSS"

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.figures.get("training_state_bytes") is None and trainer.global_step >= 1:
            self.figures["training_state_bytes"] = training_state_bytes(pl_module, trainer.optimizers)

    def _stop(self) -> None:
        if self._rss is not None:
            self._rss.__exit__(None, None, None)
            self.figures["peak_bytes"] = self._rss.peak
            self._rss = None
        elif self._cuda is not None:
            self.figures["peak_bytes"] = torch.cuda.max_memory_allocated(self._cuda)
            self._cuda = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()
