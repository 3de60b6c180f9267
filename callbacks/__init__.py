"""Lightning callbacks for DSF pruning, installed as ``dsf_lightning.callbacks``.

* :class:`DSFPruneCallback`: one-shot prune in ``setup(stage="fit")``, log dense / pre- and
  post-fine-tuning validation metrics, rebuild the pruned structure on resume, DDP-aware.
* :func:`load_pruned_checkpoint`: load a pruned run's Lightning checkpoint for inference.
"""

from dsf_lightning.callbacks.dsf_prune import DSFPruneCallback, balance_layers, evaluate_module, load_pruned_checkpoint

__all__ = ["DSFPruneCallback", "balance_layers", "evaluate_module", "load_pruned_checkpoint"]
