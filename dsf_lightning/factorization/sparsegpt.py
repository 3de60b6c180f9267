"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS weight updates, column block by block.

Algorithm 1 of the SparseGPT paper, as its authors run it (``IST-DASLab/sparsegpt``, ``SparseGPT.fasterprune``
with the defaults of their scripts and of llm-compressor: ``blocksize=128``, ``percdamp=0.01``). For a weight
``W`` ``(out, fan_in)`` and the mean input Gram ``G = X^T X / N`` ``(fan_in, fan_in)``:

1. Hessian ``H = 2 G`` of the layer error. Dead inputs (``H_jj == 0``) get ``H_jj = 1`` and their weights are
   zeroed; then ``H += percdamp * mean(diag(H)) I``. The damping is relative, so the scale of ``H`` (the
   reference's ``2 X^T X / n_sequences``, ours ``2 X^T X / n_tokens``) does not change the result (only the
   ``1`` given to dead inputs is on a different scale, and it enters ``mean(diag(H))``).
2. ``U``: the upper Cholesky factor of ``H^{-1}`` (``U^T U = H^{-1}``): row ``j`` of ``U`` is the OBS update
   of the columns right of ``j`` when column ``j`` is fixed with the columns left of it already fixed.
3. Columns in blocks of ``blocksize``. When a block is reached, its mask is chosen from the scores
   ``W_ij^2 / U_jj^2`` of the weights as updated by the blocks before it (adaptive mask selection), over the
   whole block (all rows together). Column ``j`` is then pruned (``q_j = mask_j * w_j``), its error
   ``e_j = (w_j - q_j) / U_jj`` is spread over the block's columns right of it (``w_k -= e_j U_jk``), and the
   whole block's errors reach the columns right of the block in one product (lazy batch update).

Budget: a block of ``c`` columns keeps ``floor(density * out * c)`` of its weights, so the layer keeps at most
``floor(density * out * fan_in)`` (fewer by less than one weight per block), the budget of every method. The
reference prunes the ``int(sparsity * out * c) + 1`` smallest scores of a block (``tmp <= thresh``): the same
count when ``density * out * c`` is not an integer, one weight fewer when it is (as at density 0.5);
benchmarks/RESULTS.md ("Baselines against their reference implementations") measures what that changes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dsf_lightning.factorization.admm import topk_mask
from dsf_lightning.factorization.problem import (
    Factorization,
    nnz_budget,
    scored_factorization,
    validate_problem,
    where,
    working_copy,
)

__all__ = ["BLOCKSIZE", "PERCDAMP", "check_sparsegpt", "inverse_hessian_factor", "prune_column_block",
           "sparsegpt_prune"]

#: The authors' defaults (``fasterprune(blocksize=128, percdamp=.01)``).
BLOCKSIZE, PERCDAMP = 128, 0.01


def check_sparsegpt(out: int, fan_in: int, density: float, blocksize: int, percdamp: float,
                    name: str | None = None) -> None:
    """``blocksize`` an int >= 1, ``percdamp`` a finite number >= 0, and a full block of ``(out, blocksize)``
    keeping at least one weight at ``density``; else ``ValueError`` naming the layer."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{where(name)}sparsegpt blocksize must be an int >= 1, got {blocksize!r}")
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not (
            math.isfinite(percdamp) and percdamp >= 0):
        raise ValueError(f"{where(name)}sparsegpt percdamp must be a finite number >= 0, got {percdamp!r}")
    numel = out * min(blocksize, fan_in)
    if nnz_budget(density, numel) < 1:
        raise ValueError(f"{where(name)}density {density} keeps no weight of a block of {min(blocksize, fan_in)} "
                         f"columns of {out} rows; sparsegpt needs density >= {1 / numel:.3g} (or a larger blocksize)")


def inverse_hessian_factor(gram: Tensor, percdamp: float, name: str | None = None) -> tuple[Tensor, Tensor]:
    """``(U, dead)``: ``U`` ``(fan_in, fan_in)`` upper triangular with ``U^T U = H^{-1}`` for the damped
    ``H = 2 G`` (steps 1-2 of the module docstring), ``dead`` ``(fan_in,)`` bool: the inputs with ``G_jj == 0``."""
    h = 2 * gram
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1
    h.diagonal().add_(percdamp * torch.diag(h).mean())  # a contiguous copy: summed as the reference sums it
    try:
        h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
        return torch.linalg.cholesky(h_inv, upper=True), dead
    except torch.linalg.LinAlgError as err:
        raise ValueError(f"{where(name)}the damped Hessian of sparsegpt is not positive definite with percdamp="
                         f"{percdamp}; use a larger percdamp (the authors use 0.01)") from err


def prune_column_block(w1: Tensor, u1: Tensor, keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """Prune one block of columns in place (step 3 of the module docstring).

    Args:
        w1: ``(out, c)`` the block's weights, already updated by the blocks before it; overwritten.
        u1: ``(c, c)`` the block's diagonal block of ``U``.
        keep: weights the block keeps (the largest ``w^2 / U_jj^2`` of the block).

    Returns:
        ``(q1, mask1, err1)``, each ``(out, c)``: the pruned weights (zero outside ``mask1``), the kept
        weights, and the scaled errors ``(w_j - q_j) / U_jj`` that update the columns right of the block.
    """
    d = u1.diagonal()
    mask1 = topk_mask(w1.square() / d.square()[None, :], keep)
    q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
    for j in range(w1.shape[1]):
        w = w1[:, j]
        q = torch.where(mask1[:, j], w, 0.0)
        q1[:, j] = q
        err1[:, j] = (w - q) / d[j]
        w1[:, j:] -= err1[:, j : j + 1] @ u1[j : j + 1, j:]
    return q1, mask1, err1


def sparsegpt_prune(weight: Tensor, density: float, gram: Tensor | None = None, *, blocksize: int = BLOCKSIZE,
                    percdamp: float = PERCDAMP, name: str | None = None) -> Factorization:
    """SparseGPT (module docstring): ``floor(density * out * c)`` weights kept per block of ``c`` columns.

    Args:
        weight: ``(out, fan_in)``.
        density: kept fraction in ``(0, 1]``.
        gram: ``(fan_in, fan_in)`` mean input Gram; required (the OBS update needs the inputs).
        blocksize: columns per block (mask selection and lazy updates).
        percdamp: relative damping of ``H``.
    """
    validate_problem(weight, density, gram, name)
    if gram is None:
        raise ValueError(f"{where(name)}sparsegpt needs calibration data (a gram): its weight update is "
                         f"the optimal one for the layer's inputs")
    out, fan_in = weight.shape
    check_sparsegpt(out, fan_in, density, blocksize, percdamp, name)
    w, g = working_copy(weight, gram)
    u, dead = inverse_hessian_factor(g, percdamp, name)
    work = w.clone()
    work[:, dead] = 0
    mask = torch.zeros_like(work, dtype=torch.bool)
    for c0 in range(0, fan_in, blocksize):
        c1 = min(c0 + blocksize, fan_in)
        keep = nnz_budget(density, out * (c1 - c0))
        q1, mask[:, c0:c1], err1 = prune_column_block(work[:, c0:c1].clone(), u[c0:c1, c0:c1], keep)
        work[:, c0:c1] = q1
        work[:, c1:] -= err1 @ u[c0:c1, c1:]
    return scored_factorization("sparsegpt", w, g, work, mask, blocksize=blocksize, percdamp=percdamp)
