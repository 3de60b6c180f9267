"""dsf-lightning: one-shot pruning with Double Sparse Factorization, fine-tuned with Lightning.

``W (out, fan_in) ~= second (out, r) @ first (r, fan_in)`` with
``nnz(second) + nnz(first) <= floor(density * W.numel())`` (Boža & Macko, ICLR 2025). The package's
layout and data flow are in docs/ARCHITECTURE.md. Importing it does not import Lightning: the
callback names below are loaded on first use.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any

try:  # the installed distribution's version (pyproject.toml), logged with every run
    __version__ = importlib.metadata.version("dsf-lightning")
except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
    __version__ = "unknown"

from dsf_lightning.config import PruneConfig
from dsf_lightning.distill import DistillConfig, Distiller
from dsf_lightning.factorization import (
    METHODS,
    Factorization,
    admm_masked_lstsq,
    double_sparse_factorize,
    double_sparse_factorize_batch,
    factorize,
    reconstruction_error,
)
from dsf_lightning.modules import (
    PRUNED_MODULE_TYPES,
    DSFConv2d,
    DSFLinear,
    SparseConv2d,
    SparseLinear,
    is_pruned_module,
    pruned_module,
    pruned_module_from_factorization,
)
from dsf_lightning.persistence.export import load_packed, merged_state_dict, save_packed, to_csr
from dsf_lightning.persistence.structure import (
    PrunedCheckpointMixin,
    apply_structure_spec,
    load_pruned,
    merge,
    nonzeros_outside_masks,
    replace_module,
    save_pruned,
    structure_spec,
    to_dense,
)
from dsf_lightning.pipeline.calibration import GramAccumulator, InputGramRecorder, conv2d_patches
from dsf_lightning.pipeline.entry import prune
from dsf_lightning.pipeline.plan import plan_prune
from dsf_lightning.pipeline.report import LayerRecord, PruneReport
from dsf_lightning.pipeline.targets import find_targets

#: Names that need Lightning, imported on first access.
_LAZY = {"DSFPruneCallback": "dsf_lightning.callbacks", "FiniteLossGuard": "dsf_lightning.callbacks",
         "load_pruned_checkpoint": "dsf_lightning.callbacks"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsf_lightning' has no attribute {name!r}")


__all__ = [
    "METHODS",
    "PRUNED_MODULE_TYPES",
    "DSFConv2d",
    "DSFLinear",
    "DSFPruneCallback",
    "DistillConfig",
    "Distiller",
    "Factorization",
    "FiniteLossGuard",
    "GramAccumulator",
    "InputGramRecorder",
    "LayerRecord",
    "PruneConfig",
    "PruneReport",
    "PrunedCheckpointMixin",
    "SparseConv2d",
    "SparseLinear",
    "admm_masked_lstsq",
    "apply_structure_spec",
    "conv2d_patches",
    "double_sparse_factorize",
    "double_sparse_factorize_batch",
    "factorize",
    "find_targets",
    "is_pruned_module",
    "load_packed",
    "load_pruned",
    "load_pruned_checkpoint",
    "merge",
    "merged_state_dict",
    "nonzeros_outside_masks",
    "plan_prune",
    "prune",
    "pruned_module",
    "pruned_module_from_factorization",
    "reconstruction_error",
    "replace_module",
    "save_packed",
    "save_pruned",
    "structure_spec",
    "to_csr",
    "to_dense",
]
