"""Baselines with the DSF interface: ``f(weight, density, gram=None, **opts) -> Factorization``.

Every method keeps at most ``floor(density * out * fan_in)`` nonzeros, so runs compare fairly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsf_lightning.factorization.admm import EPS, damped, topk_mask
from dsf_lightning.factorization.problem import (
    Factorization,
    row_budget,
    scored_factorization,
    validate_problem,
    where,
    working_copy,
)

__all__ = [
    "ADMM_DAMPING",
    "ADMM_ITERS",
    "ADMM_MASK_ITERS",
    "ADMM_RHO",
    "admm_prune",
    "check_admm_options",
    "low_rank_svd",
    "magnitude_prune",
    "svd_rank",
    "wanda_prune",
]


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


#: The reference repository's defaults (``fmfi-compbio/admm-pruning``, ``AdmmPruner.fasterprune`` as
#: ``prune_admm`` calls it): 20 ADMM steps, the mask reselected in the first 15, damping 0.1, penalty 1.
ADMM_ITERS, ADMM_MASK_ITERS, ADMM_DAMPING, ADMM_RHO = 20, 15, 0.1, 1.0
#: Added to the input norms of the preconditioning, as the reference does (dead inputs).
NORM_EPS = 1e-8


def check_admm_options(iters: int, mask_iters: int, damping: float, name: str | None = None) -> None:
    """``0 <= mask_iters <= iters`` ints and ``damping >= 0``, else ``ValueError`` naming the layer."""
    for what, value in (("iters", iters), ("mask_iters", mask_iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where(name)}admm {what} must be an int >= 0, got {value!r}")
    if mask_iters > iters:
        raise ValueError(f"{where(name)}admm mask_iters={mask_iters} exceeds iters={iters}: the last mask "
                         f"would never be refit")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
        raise ValueError(f"{where(name)}admm damping must be a number >= 0, got {damping!r}")


def _admm_mask(scores: Tensor, keep: int, per_row: bool, step: int, steps: int) -> Tensor:
    """``(fan_in, out)`` kept weights at mask step ``step`` of ``steps`` (``steps = 0``: the one final mask).

    Whole layer: the ``keep`` largest ``scores`` at every step (the reference's default branch computes a
    cubic schedule but selects the final sparsity). Per row (its ``per_out`` branch): the sparsity of the
    ``fan_in`` inputs of each output grows on the cubic schedule ``s (1 - (1 - (step+1)/steps)^3)`` and the
    last step keeps exactly ``keep``.
    """
    if not per_row:
        return topk_mask(scores, keep)
    fan_in = scores.shape[0]
    if step + 1 < steps:
        final = 1.0 - keep / fan_in
        keep = fan_in - int(fan_in * (final - final * (1.0 - (step + 1) / steps) ** 3))
    return topk_mask(scores, keep, per_column=True)


def admm_prune(weight: Tensor, density: float, gram: Tensor | None = None, *, iters: int = ADMM_ITERS,
               mask_iters: int = ADMM_MASK_ITERS, damping: float = ADMM_DAMPING, per_row: bool = False,
               name: str | None = None) -> Factorization:
    """ADMM pruning (Boza 2024) as its reference repository runs it by default (``AdmmPruner.fasterprune``).

    With ``D = diag(sqrt(diag G)) + 1e-8`` every step runs on the input-norm preconditioned problem
    (``G_n = D^-1 G D^-1``, unit diagonal; weights ``V = D W^T`` ``(fan_in, out)``, so ``|V|`` is Wanda's score):

    * damping: ``H = G_n + damping * mean(diag G_n) I``, and the target is damped too (``H V``, not ``G_n V``):
      the layer error plus ``damping * ||V - Z||^2``, a ridge towards the dense weights;
    * ADMM with penalty ``rho = 1`` from ``U = 0``: for each of ``iters`` steps, the mask (below) from
      ``|V + U|``, ``Z = mask * (V + U)``, ``U += V - Z``, ``V = (H + rho I)^{-1} (H V_dense + rho (Z - U))``;
      the result is ``mask * (V + U)`` mapped back by ``D^-1`` (exactly zero outside the mask);
    * the mask: reselected in each of the first ``mask_iters`` steps, then frozen. By default over the whole
      layer: the ``floor(density * out * fan_in)`` largest, at the final sparsity from the first step (the
      reference's default, ``per_out=False``: its cubic schedule is computed but unused there). With
      ``per_row=True`` (the reference's ``per_out=True``): ``int(density * fan_in)`` per output row, reached
      gradually on the cubic schedule. ``mask_iters=0``: one mask from the dense ``|V|``, then only refits.
      The reference prunes ``int(sparsity * n)`` of the ``n`` weights (of the layer, or of a row): the same
      count when ``density * n`` is an integer; when it is not, it keeps one weight more than this budget.

    Without a gram this is the projection (``G = I``). ``(H + rho I)^{-1}`` is an explicit inverse like the
    reference's (``H + rho I`` has eigenvalues >= 1 + damping). benchmarks/RESULTS.md compares it with the
    reference ("Baselines against their reference implementations").
    """
    budget = validate_problem(weight, density, gram, name)
    check_admm_options(iters, mask_iters, damping, name)
    w, g = working_copy(weight, gram)
    fan_in = w.shape[1]
    keep = row_budget(density, fan_in, name) if per_row else budget
    xx = torch.eye(fan_in, dtype=w.dtype, device=w.device) if g is None else g
    norm = xx.diagonal().sqrt() + NORM_EPS
    h = (xx / norm[None, :]) / norm[:, None]
    h.diagonal().add_(damping * torch.diag(h).mean())  # a contiguous copy: summed as the reference sums it
    v = (w * norm).T
    xy = h @ v
    h.diagonal().add_(ADMM_RHO)
    inv = torch.linalg.inv(h)
    u = torch.zeros_like(v)
    mask = _admm_mask(v.abs(), keep, per_row, 0, 0) if mask_iters == 0 else None
    for step in range(iters):
        if step < mask_iters:
            mask = _admm_mask((v + u).abs(), keep, per_row, step, mask_iters)
        z = (v + u) * mask
        u = u + (v - z)
        v = inv @ (xy + ADMM_RHO * (z - u))
    first = ((v + u) * mask).T / norm
    return scored_factorization("admm", w, g, first, mask.T.contiguous(), iters=iters, mask_iters=mask_iters,
                                damping=damping, per_row=per_row)


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
