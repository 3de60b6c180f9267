"""Straightforward transcription of the paper's Algorithm 1 (data-free projection), for timing.

Written the way reference research code does it: every inner ADMM call forms two explicit
inverses with ``torch.inverse`` (one for ``rho``, one for the annealed first-step ``rho0``), and
each mask step thresholds ``|X + U|`` by a full ``sort``. Same hyperparameters and same math as the
library's loop *before* issue 10 (``double_sparse_factorize`` up to commit ``91cde57``, preset
``"vision"``, 30% split), so both computed the same factors up to ties and float noise; the library
has since changed its loop (``benchmarks/RESULTS.md``) and :mod:`topk_dsf` is the baseline that
follows the reference code:

* ``M ~= A @ B`` with ``A`` (n, n), ``B`` (n, m), ``n <= m`` (``W`` transposed when out > fan_in);
* ``A`` starts as the identity, ``B`` as the magnitude-pruned ``M``; duals start at zero;
* ``n_outer`` = 40 outer and ``m`` = 5 inner iterations, ``rho = 1``,
  ``rho0 = min(1, k / (n_outer - 3)) ** 3`` in the first step of every inner solve;
* each inner regression is preconditioned to a unit Gram diagonal, damped by
  ``1e-2 * mean(diag)``, warm-started from the previous ``Z`` and ``U``;
* the mask is reselected from ``|X + U|`` (globally over the factor) in the first 2 inner
  iterations on a cubic schedule, then frozen.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsf_lightning.factorization.dsf import nnz_budget, square_factor_nnz

EPS = 1e-8


def sort_mask(scores: Tensor, keep: int) -> Tensor:
    """``scores > threshold`` with the threshold taken from a full ascending sort."""
    numel = scores.numel()
    if keep >= numel:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    thres = scores.flatten().sort()[0][numel - keep - 1]
    return scores > thres


def naive_admm(xtx: Tensor, xty: Tensor, nnz: int, z: Tensor, u: Tensor, *, iters: int = 5,
               mask_iters: int = 2, rho: float = 1.0, rho0: float = 1.0, damping: float = 1e-2):
    """ADMM for ``min ||Y - X W||^2, ||W||_0 <= nnz`` (eq. 1 + Boza 2024 improvements)."""
    p = xtx.shape[0]
    norm = torch.sqrt(torch.diag(xtx)) + EPS
    xtx = xtx / norm.unsqueeze(1) / norm.unsqueeze(0)
    xty = xty / norm.unsqueeze(1)
    eye = torch.eye(p, dtype=xtx.dtype, device=xtx.device)
    xtx = xtx + damping * torch.diag(xtx).mean() * eye
    z = z * norm.unsqueeze(1)
    u = u * norm.unsqueeze(1)

    xtx_inv = torch.inverse(xtx + rho * eye)
    xtx_inv0 = torch.inverse(xtx + rho0 * eye)
    w = xtx_inv0 @ (xty + rho0 * (z - u))

    total = w.numel()
    final_sparsity = 1.0 - min(nnz, total) / total
    mask_iters = min(mask_iters, iters)
    mask = None
    for it in range(iters):
        if it < mask_iters:
            if it + 1 == mask_iters:
                keep = nnz
            else:
                sparsity = final_sparsity - final_sparsity * (1.0 - (it + 1) / mask_iters) ** 3
                keep = round(total * (1.0 - sparsity))
            mask = sort_mask((w + u).abs(), keep)
        z = (w + u) * mask
        u = u + (w - z)
        w = xtx_inv @ (xty + rho * (z - u))
    z = (w + u) * mask
    return z / norm.unsqueeze(1), u / norm.unsqueeze(1), mask


def square_nnz(density: float, out: int, fan_in: int) -> tuple[int, int]:
    """(nnz of the square factor, nnz of the other): the library's vision rule, so that both sides
    of the benchmark solve the same problem."""
    budget = nnz_budget(density, out * fan_in)
    nnz_a = square_factor_nnz("vision", density, out, fan_in)
    return nnz_a, budget - nnz_a


def naive_dsf(weight: Tensor, density: float, *, outer_iters: int = 40, inner_iters: int = 5,
              mask_iters: int = 2, damping: float = 1e-2):
    """Algorithm 1 on ``weight`` (out, fan_in); returns ``(second (out, r), first (r, fan_in))``."""
    out, fan_in = weight.shape
    nnz_a, nnz_b = square_nnz(density, out, fan_in)
    transposed = out > fan_in
    w = weight.t() if transposed else weight
    n = w.shape[0]

    a = torch.eye(n, dtype=w.dtype, device=w.device)
    b = w * sort_mask(w.abs(), nnz_b)
    ua = torch.zeros_like(a)
    ub = torch.zeros_like(b)
    for k in range(1, outer_iters + 1):
        rho0 = min(1.0, k / max(1, outer_iters - 3)) ** 3
        b, ub, _ = naive_admm(a.t() @ a, a.t() @ w, nnz_b, b, ub, iters=inner_iters,
                              mask_iters=mask_iters, rho0=rho0, damping=damping)
        at, uat, _ = naive_admm(b @ b.t(), b @ w.t(), nnz_a, a.t(), ua.t(), iters=inner_iters,
                                mask_iters=mask_iters, rho0=rho0, damping=damping)
        a, ua = at.t(), uat.t()
    if transposed:
        return b.t(), a.t()
    return a, b
