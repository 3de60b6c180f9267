"""Masked least squares by ADMM (paper section 3.1, after Boža 2024).

Problem, for a design matrix ``D`` seen only through ``gram = D^T D`` (p, p) and
``rhs = D^T Y`` (p, q)::

    minimize_X  ||Y - D X||_F^2   subject to   X = X * mask,  nnz(mask) <= nnz

Each column of ``X`` is one regression (one output of a layer). The ADMM iterations of
eq. (1) run on an input-norm preconditioned problem (``diag(gram) == 1``): the mask is
then chosen from ``|X + U|`` in that domain, which is Wanda's metric when ``D`` is data.

Every function here also takes a leading batch dimension (``gram`` (B, p, p), ``rhs`` (B, p, q)):
each matrix of the batch is its own problem (its own preconditioning, ridge and mask), run by
batched GEMMs and factorizations so small problems share the per-operation overhead. A 2-D call
computes what it computed before batching existed, bit for bit (``tests/test_golden_factors.py``).

Everything stays on the device of ``gram``; no host round trips inside the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "EPS",
    "ADMMSolution",
    "admm_masked_lstsq",
    "cubic_sparsity",
    "damped",
    "diagonals",
    "topk_mask",
]

#: Guards divisions by input norms of dead inputs.
EPS = 1e-8


@dataclass
class ADMMSolution:
    """Result of :func:`admm_masked_lstsq`, in the caller's (unpreconditioned) scale.

    Attributes:
        z: ``(p, q)`` the sparse solution, exactly zero outside ``mask``.
        u: ``(p, q)`` scaled dual variables, to warm-start the next call.
        mask: ``(p, q)`` bool support of ``z``.
    """

    z: Tensor
    u: Tensor
    mask: Tensor


def cubic_sparsity(step: int, steps: int, final: float) -> float:
    """Zhu & Gupta cubic schedule: the sparsity after ``step`` of ``steps`` gradual steps."""
    return final - final * (1.0 - step / steps) ** 3


#: Below this many scores (or on CUDA) :func:`topk_mask` calls ``topk`` directly.
BAND_MIN_NUMEL = 1 << 16


def topk_mask(scores: Tensor, k: int, per_column: bool = False) -> Tensor:
    """Bool mask of the ``k`` largest ``scores``: over the whole matrix, or in each column.

    ``scores`` is ``(rows, cols)`` or a batch ``(..., rows, cols)``, every matrix selected on its own
    (``k`` per matrix, or per column of each matrix). Uses ``topk`` (a partial selection), never a
    full sort, and keeps exactly ``k`` entries even when scores tie, so nnz budgets hold to the
    element. Large whole-matrix selections on the CPU first narrow ``topk`` to a band around the
    threshold (:func:`_band_topk_mask`), one matrix at a time.
    """
    if per_column:
        rows = scores.shape[-2]
        k = max(0, min(k, rows))
        mask = torch.zeros_like(scores, dtype=torch.bool)
        if k == rows:
            return mask.fill_(True)
        if k > 0:
            mask.scatter_(-2, scores.topk(k, dim=-2, sorted=False).indices, True)
        return mask
    if scores.dim() > 2:
        return _batch_topk_mask(scores, k)
    numel = scores.numel()
    k = max(0, min(k, numel))
    if k == numel:
        return torch.ones_like(scores, dtype=torch.bool)
    if k > 0 and numel >= BAND_MIN_NUMEL and scores.device.type == "cpu":
        mask = _band_topk_mask(scores.reshape(-1), k)
        if mask is not None:
            return mask.view_as(scores)
    mask = torch.zeros(numel, dtype=torch.bool, device=scores.device)
    if k > 0:  # index_fill_, not an indexed assignment: faster on the CPU (RESULTS.md, "Factorization speed")
        mask.index_fill_(0, scores.flatten().topk(k, sorted=False).indices, True)
    return mask.view_as(scores)


def _batch_topk_mask(scores: Tensor, k: int) -> Tensor:
    """:func:`topk_mask` of each ``(rows, cols)`` matrix of ``scores`` ``(..., rows, cols)``: one ``topk``
    over the flattened matrices, or the band selection matrix by matrix where it applies. The same
    sets as one call per matrix (the ``k`` largest, unique unless scores tie at the threshold)."""
    numel = scores.shape[-2] * scores.shape[-1]
    k = max(0, min(k, numel))
    if k == numel:
        return torch.ones_like(scores, dtype=torch.bool)
    if k > 0 and numel >= BAND_MIN_NUMEL and scores.device.type == "cpu":
        flat = scores.reshape(-1, *scores.shape[-2:])
        return torch.stack([topk_mask(s, k) for s in flat]).view_as(scores)
    flat = scores.reshape(-1, numel)
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=scores.device)
    if k > 0:
        mask.scatter_(1, flat.topk(k, dim=1, sorted=False).indices, True)
    return mask.view_as(scores)


def _band_topk_mask(flat: Tensor, k: int, sample: int = 16384) -> Tensor | None:
    """The ``k`` largest of ``flat`` (1-D): entries above a high threshold are in, a ``topk`` over the
    band between a low and the high threshold picks the rest. Both thresholds are quantiles of a
    deterministic spread sample, ``4`` standard errors either side of the target one; ``None`` (the caller runs a
    plain ``topk``) when the band misses the ``k``-th value. The result is exact either way; two compares and a
    short ``topk`` beat a ``topk`` over the whole matrix on the CPU (benchmarks/RESULTS.md, "Factorization
    speed")."""
    n = flat.numel()
    # A golden-ratio stride coprime with n: a plain stride can align with the matrix's columns (a
    # 3x3 conv's fan-in is a multiple of 9) and sample one kernel position only.
    step = max(1, round(n * 0.6180339887))
    while math.gcd(step, n) != 1:
        step += 1
    s = min(sample, n)
    samp = flat[torch.arange(s, device=flat.device).mul_(step).remainder_(n)]
    q = k / n
    delta = 4.0 * math.sqrt(q * (1.0 - q) / s) + 2.0 / s
    lo = samp.kthvalue(min(s, max(1, math.floor((1.0 - q - delta) * s)))).values
    hi = samp.kthvalue(min(s, max(1, math.ceil((1.0 - q + delta) * s)))).values
    mask = flat > hi
    need = k - int(mask.sum())
    if need < 0:
        return None
    band = ((flat > lo) & ~mask).nonzero().squeeze(1)
    if need > band.numel():
        return None
    if need > 0:
        mask.index_fill_(0, band[flat[band].topk(need, sorted=False).indices], True)
    return mask


def diagonals(x: Tensor) -> Tensor:
    """The diagonal of every matrix of ``x`` ``(..., p, p)``: a ``(..., p)`` view."""
    return x.diagonal(dim1=-2, dim2=-1)


def damped(gram: Tensor, damping: float) -> Tensor:
    """``gram + damping * mean(diag(gram)) * I`` (per matrix of a batch ``(..., p, p)``): keeps
    rank-deficient Grams (dead inputs) solvable."""
    if damping <= 0:
        return gram
    lam = damping * diagonals(gram).mean(-1).clamp_min(EPS)
    return gram + lam[..., None, None] * torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)


def _ridge_cholesky(gram: Tensor, rho: float) -> Tensor:
    """Lower Cholesky factor of ``gram + rho I`` (SPD: ``gram`` is PSD and ``rho > 0``), batched."""
    shifted = gram.clone()
    diagonals(shifted).add_(rho)
    return torch.linalg.cholesky(shifted)


def admm_masked_lstsq(
    gram: Tensor,
    rhs: Tensor,
    nnz: int | None = None,
    *,
    z: Tensor | None = None,
    u: Tensor | None = None,
    fixed_mask: Tensor | None = None,
    iters: int = 5,
    mask_iters: int = 2,
    gradual: bool = True,
    rho: float = 1.0,
    rho0: float | None = None,
    per_column: bool = False,
    damping: float = 0.0,
) -> ADMMSolution:
    """Masked least squares ``min ||Y - D X||^2, nnz(X) <= nnz`` by ADMM, eq. (1) of the paper.

    Shapes below are of one problem; a leading batch dimension (``gram`` (B, p, p), ``rhs`` (B, p, q),
    ``z``, ``u``, ``fixed_mask`` (B, p, q)) solves B problems at once, each its own: ``nnz`` is per
    matrix, the preconditioning and ridge per matrix; ``rho``, ``rho0`` and the schedule are shared.

    Args:
        gram: ``(p, p)`` ``D^T D``, symmetric PSD.
        rhs: ``(p, q)`` ``D^T Y``.
        nnz: nonzeros to keep in ``X`` (in each column if ``per_column``); ignored with
            ``fixed_mask``.
        z, u: ``(p, q)`` warm start (previous solution and scaled duals); zeros if omitted.
        fixed_mask: ``(p, q)`` bool support to keep instead of selecting one.
        iters: ADMM iterations after the first step.
        mask_iters: the mask is reselected from ``|X + U|`` in the first ``mask_iters``
            iterations, then frozen.
        gradual: reselect on a cubic schedule ending at ``nnz`` (gradual pruning, for a cold
            start from a dense ``X``); ``False`` keeps exactly ``nnz`` at every reselection (for a
            warm start whose ``z`` already has ``nnz`` entries, as in Algorithm 1's alternating steps).
        rho: ADMM penalty of every step but the first.
        rho0: penalty of the first step (annealing: a small ``rho0`` trusts the warm start
            less); defaults to ``rho``.
        per_column: select ``nnz`` per column (per output, as Wanda/ADMM pruning) instead of
            over the whole matrix.
        damping: relative ridge ``damping * mean(diag)`` added to the preconditioned Gram.

    Returns:
        :class:`ADMMSolution` with ``z`` exactly zero outside ``mask``.
    """
    if fixed_mask is None and (nnz is None or mask_iters < 1):
        raise ValueError("admm_masked_lstsq needs either fixed_mask or nnz with mask_iters >= 1")
    p, q = rhs.shape[-2:]
    if gram.shape != (*rhs.shape[:-2], p, p):
        raise ValueError(f"gram has shape {tuple(gram.shape)}, expected {(*rhs.shape[:-2], p, p)} to match rhs "
                         f"{tuple(rhs.shape)}")
    rho0 = rho if rho0 is None else rho0

    # Precondition: unit diagonal, X scaled up by the input norms (Boža 2024).
    norm = diagonals(gram).sqrt() + EPS
    gram_n = gram / (norm[..., :, None] * norm[..., None, :])
    if damping > 0:  # damped(), in place on the fresh preconditioned Gram
        diagonals(gram_n).add_(damping * diagonals(gram_n).mean(-1, keepdim=True).clamp_min(EPS))
    scale = norm[..., :, None]
    rhs_n = rhs / scale
    z = torch.zeros_like(rhs_n) if z is None else z * scale
    u = torch.zeros_like(rhs_n) if u is None else u * scale

    # The warm start may be a transposed view (DSF's A-step): make the loop's operands
    # row-major like the matmul output, or every elementwise pass runs strided.
    z, u = z.contiguous(), u.contiguous()
    # Both penalties' systems as explicit SPD inverses: every solve is then one GEMM, which is
    # faster than the two triangular solves of cholesky_solve over the (p, q) right-hand side.
    inv = torch.cholesky_inverse(_ridge_cholesky(gram_n, rho))  # reused by every iteration
    inv0 = inv if rho0 == rho else torch.cholesky_inverse(_ridge_cholesky(gram_n, rho0))
    x = inv0 @ torch.add(rhs_n, z.sub_(u), alpha=rho0)  # z is a fresh scaled copy: reuse it

    mask = fixed_mask
    mask_iters = min(mask_iters, iters)  # the last reselection must land exactly on nnz
    total = p if per_column else p * q
    final_sparsity = 1.0 - (min(nnz, total) / total) if nnz is not None else 0.0
    off = None if mask is None else (~mask).to(x.dtype)
    for it in range(iters):
        xu = x.add_(u)  # x is rebuilt by addmm below: reuse its storage
        if fixed_mask is None and it < mask_iters:
            last = it + 1 == mask_iters or not gradual
            keep = nnz if last else round(total * (1.0 - cubic_sparsity(it + 1, mask_iters, final_sparsity)))
            mask = topk_mask(xu.abs(), keep, per_column)
            off = (~mask).to(x.dtype)
        # z = mask*(x+u); u <- u + x - z = (x+u) off the mask; z - u = (x+u) - 2u.
        # Multiplies by a float mask: several times cheaper than where/masked_fill on CPU.
        u = xu * off
        x = inv @ torch.add(rhs_n, xu.add_(u, alpha=-2.0), alpha=rho)
    xu = x.add_(u)
    if mask is None:  # iters == 0: select once from the first step
        mask = topk_mask(xu.abs(), nnz, per_column)
    z = xu.masked_fill_(~mask, 0)
    return ADMMSolution(z=z / scale, u=u / scale, mask=mask)
