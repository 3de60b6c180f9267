"""dsf-lightning: one-shot pruning with Double Sparse Factorization, fine-tuned with Lightning.

``W (out, fan_in) ~= S (out, r) @ F (r, fan_in)`` with ``nnz(S) + nnz(F) <= floor(density * W.numel())``
(Boža & Macko, ICLR 2025). Layers: :mod:`~dsf_lightning.factorization` (pure tensor math),
:mod:`~dsf_lightning.calibration` (input Grams), :mod:`~dsf_lightning.modules` (masked
two-factor layers), :mod:`~dsf_lightning.surgery` (targets, prune, merge, structure specs) and
:mod:`~dsf_lightning.export` (packed storage, CSR inference).
"""

from dsf_lightning.calibration import GramAccumulator, InputGramRecorder, conv2d_patches
from dsf_lightning.export import load_packed, merged_state_dict, save_packed, to_csr
from dsf_lightning.factorization import (
    FACTORIZERS,
    Factorization,
    admm_masked_lstsq,
    double_sparse_factorize,
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
    pruned_module_from_factorization,
)
from dsf_lightning.surgery import (
    LayerRecord,
    PruneReport,
    apply_structure_spec,
    find_targets,
    load_pruned,
    merge,
    prune,
    replace_module,
    save_pruned,
    structure_spec,
)

# last: the callback package imports the modules above
from dsf_lightning.callbacks import DSFPruneCallback, load_pruned_checkpoint  # noqa: E402

__all__ = [
    "DSFConv2d",
    "DSFPruneCallback",
    "DSFLinear",
    "FACTORIZERS",
    "Factorization",
    "GramAccumulator",
    "InputGramRecorder",
    "LayerRecord",
    "PRUNED_MODULE_TYPES",
    "PruneReport",
    "SparseConv2d",
    "SparseLinear",
    "admm_masked_lstsq",
    "apply_structure_spec",
    "conv2d_patches",
    "double_sparse_factorize",
    "factorize",
    "find_targets",
    "is_pruned_module",
    "load_packed",
    "load_pruned",
    "load_pruned_checkpoint",
    "merge",
    "merged_state_dict",
    "prune",
    "pruned_module_from_factorization",
    "reconstruction_error",
    "replace_module",
    "save_packed",
    "save_pruned",
    "structure_spec",
    "to_csr",
]
