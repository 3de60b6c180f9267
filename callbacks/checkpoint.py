"""Loading a Lightning checkpoint of a pruned run for inference: the pruned structure first, then the weights."""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from dsf_lightning.persistence.files import check_torch_file
from dsf_lightning.persistence.structure import CHECKPOINT_KEY, PrunedCheckpointMixin, load_pruned

__all__ = ["load_pruned_checkpoint"]


def load_pruned_checkpoint(module: type[pl.LightningModule] | pl.LightningModule, path: str | os.PathLike,
                           map_location: Any = "cpu", weights_only: bool | None = None,
                           **kwargs: Any) -> pl.LightningModule:
    """Load a checkpoint of a run pruned by :class:`DSFPruneCallback` for inference.

    ``module`` is a LightningModule class (instantiated from the checkpoint's hyperparameters by its own
    ``load_from_checkpoint(path, **kwargs)``) or a dense instance (loaded in place). The pruned structure
    in ``checkpoint["dsf_structure"]`` is applied before the strict state-dict load, so the result holds
    the same masked modules and weights as the trained one. Classes with
    :class:`~dsf_lightning.persistence.structure.PrunedCheckpointMixin` do this in their own ``load_from_checkpoint``.
    A truncated or corrupted file is a ``ValueError`` naming it
    (:func:`~dsf_lightning.persistence.files.check_torch_file`),
    before anything is loaded.
    """
    check_torch_file(path, "checkpoint")
    if isinstance(module, type) and issubclass(module, PrunedCheckpointMixin):
        return module.load_from_checkpoint(path, map_location=map_location, weights_only=weights_only, **kwargs)
    checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only is not False)
    spec = checkpoint.get(CHECKPOINT_KEY)
    if spec is None:
        raise ValueError(f"checkpoint {str(path)!r} has no {CHECKPOINT_KEY!r} entry (not saved by DSFPruneCallback)")
    if isinstance(module, type):
        with warnings.catch_warnings():  # a dense instance from the hyperparameters: the pruned keys do not fit
            warnings.filterwarnings("ignore", message="Found keys that are")
            module = module.load_from_checkpoint(path, map_location=map_location, weights_only=weights_only,
                                                 strict=False, **kwargs)
    else:
        module.on_load_checkpoint(checkpoint)
    return load_pruned(module, checkpoint["state_dict"], spec=spec)
