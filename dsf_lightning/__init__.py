"""dsf-lightning: one-shot pruning with Double Sparse Factorization, fine-tuned with Lightning."""

from dsf_lightning.calibration import GramAccumulator, InputGramRecorder, conv2d_patches
from dsf_lightning.factorization import (
    FACTORIZERS,
    Factorization,
    admm_masked_lstsq,
    double_sparse_factorize,
    factorize,
    reconstruction_error,
)

__all__ = [
    "FACTORIZERS",
    "Factorization",
    "GramAccumulator",
    "InputGramRecorder",
    "admm_masked_lstsq",
    "conv2d_patches",
    "double_sparse_factorize",
    "factorize",
    "reconstruction_error",
]
