"""Baselines with the DSF interface: ``f(weight, density, gram=None, **opts) -> Factorization``.

Every method keeps at most ``floor(density * out * fan_in)`` nonzeros, so runs compare fairly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsf_lightning.factorization.admm import EPS, admm_masked_lstsq, damped, topk_mask
from dsf_lightning.factorization.problem import (
    Factorization,
    row_budget,
    scored_factorization,
    validate_problem,
    where,
    working_copy,
)

__all__ = ["admm_prune", "low_rank_svd", "magnitude_prune", "svd_rank", "wanda_prune"]


def magnitude_prune(weight: Tensor, density: float, gram: Tensor | None = None, *,
                    name: str | None = None) -> Factorization:
    """Keep the ``floor(density * numel)`` largest ``|W|`` of the layer (``gram`` only scores the error)."""
    budget = validate_problem(weight, density, gram, name)
    w, g = working_copy(weight, gram)
    mask = topk_mask(w.abs(), budget)
    return scored_factorization("magnitude", w, g, w * mask, mask)


def wanda_prune(weight: Tensor, density: float, gram: Tensor | None = None, *,
                name: str | None = None) -> Factorization:
    """Wanda (Sun et al. 2023): per output row keep the largest ``|W_ij| * ||X_j||``."""
    validate_problem(weight, density, gram, name)
    if gram is None:
        raise ValueError(f"{where(name)}wanda needs calibration data (a gram)")
    w, g = working_copy(weight, gram)
    keep = row_budget(density, w.shape[1], name)
    score = w.abs() * g.diagonal().clamp_min(0).sqrt()[None, :]
    mask = topk_mask(score.T, keep, per_column=True).T.contiguous()
    return scored_factorization("wanda", w, g, w * mask, mask)


def admm_prune(weight: Tensor, density: float, gram: Tensor | None = None, *, iters: int = 20,
               mask_iters: int = 15, damping: float = 1e-2, name: str | None = None) -> Factorization:
    """ADMM pruning (Boža 2024): per-row masks chosen gradually (cubic, first ``mask_iters`` of
    ``iters``) from ``|W + U|`` in the input-norm preconditioned domain, weights refit by ADMM.
    Without a gram this is the projection (``G = I``).

    ``damping`` is a relative ridge on the Gram (benchmarks/RESULTS.md has why 1e-2).
    """
    validate_problem(weight, density, gram, name)
    w, g = working_copy(weight, gram)
    keep = row_budget(density, w.shape[1], name)
    if g is None:
        g = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
    sol = admm_masked_lstsq(g, g @ w.T, keep, z=w.T, iters=iters, mask_iters=mask_iters,
                            per_column=True, damping=damping)
    return scored_factorization("admm", w, None if gram is None else g, sol.z.T, sol.mask.T.contiguous())


def svd_rank(budget: int, out: int, fan_in: int, name: str | None = None) -> int:
    """Rank of a low-rank factorization with ``budget`` parameters: ``budget // (out + fan_in)``, >= 1."""
    k = budget // (out + fan_in)
    if k < 1:
        raise ValueError(f"{where(name)}a budget of {budget} weights of ({out}, {fan_in}) is below rank 1 "
                         f"(needs density >= {(out + fan_in) / (out * fan_in):.3g})")
    return k


def low_rank_svd(weight: Tensor, density: float, gram: Tensor | None = None, *,
                 damping: float = 1e-2, name: str | None = None) -> Factorization:
    """Rank-``k`` factorization at the same parameter count: ``k = floor(budget / (out + fan_in))``.

    With a gram this is the optimal rank-``k`` fit of ``X W^T``: truncate ``W G^{1/2}``, map back
    by ``G^{-1/2}`` (damped).
    """
    budget = validate_problem(weight, density, gram, name)
    w, g = working_copy(weight, gram)
    out, fan_in = w.shape
    k = svd_rank(budget, out, fan_in, name)
    if g is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        second, first = u[:, :k] * s[:k], vh[:k]
    else:
        evals, evecs = torch.linalg.eigh(damped(g, damping))
        root = evals.clamp_min(EPS).sqrt()
        u, s, vh = torch.linalg.svd(w @ (evecs * root) @ evecs.T, full_matrices=False)
        second, first = u[:, :k] * s[:k], (vh[:k] @ evecs / root) @ evecs.T
    ones = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
    return scored_factorization("svd", w, g, first, ones(first), second, ones(second), rank=k)
