"""Pure tensor math of DSF and its baselines: no Lightning, no module surgery.

Every method shares one signature, ``f(weight (out, fan_in), density, gram=None, **opts)``,
and returns a :class:`Factorization`, so callers switch methods by name with :func:`factorize`.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor

from dsf_lightning.factorization.admm import ADMMSolution, admm_masked_lstsq, cubic_sparsity, topk_mask
from dsf_lightning.factorization.baselines import admm_prune, low_rank_svd, magnitude_prune, wanda_prune
from dsf_lightning.factorization.dsf import (
    Factorization,
    double_sparse_factorize,
    finalize_input_factor,
    finalize_output_factor,
    nnz_budget,
    reconstruction_error,
    rho0_schedule,
    square_factor_nnz,
    sylvester_solve,
)

FACTORIZERS: dict[str, Callable[..., Factorization]] = {
    "dsf": double_sparse_factorize,
    "magnitude": magnitude_prune,
    "wanda": wanda_prune,
    "admm": admm_prune,
    "svd": low_rank_svd,
}


def factorize(method: str, weight: Tensor, density: float, gram: Tensor | None = None,
              **options: Any) -> Factorization:
    """Run the method registered as ``method`` in :data:`FACTORIZERS` on one weight matrix."""
    try:
        fn = FACTORIZERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; valid methods: {sorted(FACTORIZERS)}") from None
    return fn(weight, density, gram, **options)


__all__ = [
    "ADMMSolution",
    "FACTORIZERS",
    "Factorization",
    "admm_masked_lstsq",
    "admm_prune",
    "cubic_sparsity",
    "double_sparse_factorize",
    "factorize",
    "finalize_input_factor",
    "finalize_output_factor",
    "low_rank_svd",
    "magnitude_prune",
    "nnz_budget",
    "reconstruction_error",
    "rho0_schedule",
    "square_factor_nnz",
    "sylvester_solve",
    "topk_mask",
    "wanda_prune",
]
