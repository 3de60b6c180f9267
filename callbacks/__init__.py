"""Lightning callbacks for DSF pruning, installed as ``dsf_lightning.callbacks``.

* :class:`DSFPruneCallback`: one-shot prune when ``fit`` starts, log dense / pre- and post-fine-tuning
  validation metrics, resume pruned runs without refactorizing, DDP-aware.
* :class:`FiniteLossGuard`: stop fine-tuning at the first NaN/Inf loss, naming the step and the last
  good checkpoint.
* :class:`TrainingMemory`: the fine-tune's training state (read from the tensors) and peak memory.
* :func:`load_pruned_checkpoint`: load a pruned run's Lightning checkpoint for inference.
* :func:`evaluate_module` (:mod:`~dsf_lightning.callbacks.evaluation`): a module's validation metrics
  outside Lightning's loops.
"""

from dsf_lightning.callbacks.checkpoint import load_pruned_checkpoint
from dsf_lightning.callbacks.dsf_prune import DSFPruneCallback
from dsf_lightning.callbacks.evaluation import evaluate_module
from dsf_lightning.callbacks.finite_loss import FiniteLossGuard, NonFiniteLossError
from dsf_lightning.callbacks.memory import TrainingMemory

__all__ = ["DSFPruneCallback", "FiniteLossGuard", "NonFiniteLossError", "TrainingMemory", "evaluate_module",
           "load_pruned_checkpoint"]
