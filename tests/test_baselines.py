"""SparseGPT and ADMM pruning: exact budgets, clear errors, convergence, and tiny float64 transcriptions of the
reference implementations (IST-DASLab/sparsegpt ``fasterprune``, fmfi-compbio/admm-pruning ``AdmmPruner``)
that a regression in the update would fail."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_rel_close, rel_bound, relative_error  # tests/ is on sys.path

from dsf_lightning.config import PruneConfig
from dsf_lightning.factorization import METHODS, factorize, get_method, nnz_budget, reconstruction_error, row_budget
from dsf_lightning.factorization.baselines import ADMM_ITERS

D64 = torch.float64


def correlated_problem(out: int, fan_in: int, seed: int, dtype: torch.dtype = torch.float32):
    """A trained-like weight and the Gram of correlated inputs with uneven norms in no particular order (what
    SparseGPT exploits; its masks are chosen per block of columns)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(fan_in, fan_in, generator=gen, dtype=D64) * (torch.rand(fan_in, fan_in, generator=gen) < 0.1)
    x = torch.randn(4 * fan_in, fan_in, generator=gen, dtype=D64) @ (torch.eye(fan_in, dtype=D64) + mix)
    x = x * torch.logspace(-0.5, 0.5, fan_in, dtype=D64)[torch.randperm(fan_in, generator=gen)]
    w = torch.randn(out, 8, generator=gen, dtype=D64) @ torch.randn(8, fan_in, generator=gen, dtype=D64)
    w = w + 0.3 * torch.randn(out, fan_in, generator=gen, dtype=D64)
    return w.to(dtype), (x.T @ x / x.shape[0]).to(dtype)


# ---------------------------------------------------------------------------------------------
# the references, transcribed (float64 here; the repositories run float32)
# ---------------------------------------------------------------------------------------------
def reference_sparsegpt(w: torch.Tensor, h: torch.Tensor, sparsity: float, blocksize: int = 128,
                        percdamp: float = 0.01) -> torch.Tensor:
    """``SparseGPT.fasterprune`` (unstructured, no quantizer) on ``H`` (``2 X^T X / n``)."""
    w, h = w.clone(), h.clone()
    rows, columns = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    diag = torch.arange(columns)
    h[diag, diag] += percdamp * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        w1, q1, err = w[:, i1:i2].clone(), torch.zeros(rows, i2 - i1, dtype=w.dtype), torch.zeros(rows, i2 - i1,
                                                                                                 dtype=w.dtype)
        hinv1 = hinv[i1:i2, i1:i2]
        tmp = w1**2 / (torch.diag(hinv1).reshape((1, -1))) ** 2
        pruned = tmp <= torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        for i in range(i2 - i1):
            q = w1[:, i].clone()
            q[pruned[:, i]] = 0
            q1[:, i] = q
            err[:, i] = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= err[:, i].unsqueeze(1).matmul(hinv1[i, i:].unsqueeze(0))
        w[:, i1:i2] = q1
        w[:, i2:] -= err.matmul(hinv[i1:i2, i2:])
    return w


def reference_admm(weight: torch.Tensor, xx: torch.Tensor, sparsity: float, percdamp: float = 0.1,
                   iterative_prune: int = 15, iters: int = 20) -> torch.Tensor:
    """``AdmmPruner.fasterprune`` with its defaults (unstructured, ``per_out=False``) on ``X^T X``."""
    norm = torch.diag(xx).sqrt() + 1e-8
    xx = ((xx / norm).T / norm).T
    w = (weight * norm).T
    diag = torch.arange(xx.shape[0])
    xx[diag, diag] += percdamp * torch.diag(xx).mean()
    xy = xx.matmul(w)
    xx[diag, diag] += 1
    xxinv = torch.inverse(xx)
    u = torch.zeros_like(w)
    for itt in range(iters):
        if itt < iterative_prune:
            mask = torch.ones(w.numel(), dtype=torch.bool)
            mask[torch.topk((w + u).abs().flatten(), k=int(w.numel() * sparsity), largest=False).indices] = 0
            mask = mask.reshape(w.shape)
        z = (w + u) * mask
        u = u + (w - z)
        w = xxinv.matmul(xy + (z - u))
    return ((w + u) * mask).T / norm


@pytest.mark.parametrize("blocksize", [128, 8])
def test_sparsegpt_is_the_reference_update(blocksize):
    # density * rows * block columns is never an integer here, so the reference keeps our count in every block
    # (20 columns: one block of 20, or blocks of 8, 8 and a partial 4)
    w, g = correlated_problem(7, 20, 0, D64)
    ours = factorize("sparsegpt", w, 0.33, g, blocksize=blocksize)
    ref = reference_sparsegpt(w, 2 * g, 0.67, blocksize)
    assert torch.equal(ours.first_mask, ref != 0)
    # float64, other operation orders: a 20-column Cholesky and 20 chained column updates of 20-term dots
    assert_rel_close(ours.first, ref, depth=20 * 20 + 20)


def test_sparsegpt_keeps_one_weight_more_per_block_where_the_reference_prunes_the_threshold_too():
    w, g = correlated_problem(8, 24, 1, D64)  # 0.5 * 8 * 8 = 32: an integer in each block of 8
    ours = factorize("sparsegpt", w, 0.5, g, blocksize=8)
    ref = reference_sparsegpt(w, 2 * g, 0.5, blocksize=8)
    assert ours.nnz == nnz_budget(0.5, w.numel()) == int((ref != 0).sum()) + 3


def test_admm_is_the_reference_with_its_defaults():
    w, g = correlated_problem(12, 24, 2, D64)
    # 0.25 * 288 is an integer: the reference keeps numel - int(sparsity * numel), one more than the budget otherwise
    ours = factorize("admm", w, 0.25, g)
    ref = reference_admm(w, 96 * g, 0.75)  # the reference sums X^T X: the scale cancels
    assert torch.equal(ours.first_mask, ref != 0)
    # float64, other operation orders through ADMM's iterations, each a 24-term solve and a projection; a
    # solve turns rounding (backward error) into forward error times cond(G)
    cond = float(torch.linalg.cond(g))
    assert relative_error(ours.first, ref) <= cond * rel_bound(D64, ADMM_ITERS * 3 * 24)


# ---------------------------------------------------------------------------------------------
# budgets
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (9, 300)])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.77])
def test_budgets_hold_exactly(shape, density):
    w, g = correlated_problem(*shape, seed=3)
    budget = nnz_budget(density, w.numel())
    for blocksize in (128, 16):
        res = factorize("sparsegpt", w, density, g, blocksize=blocksize)
        per_block = sum(nnz_budget(density, shape[0] * len(c)) for c in torch.arange(shape[1]).split(blocksize))
        assert res.nnz == per_block <= budget and budget - per_block < math.ceil(shape[1] / blocksize)
        assert bool((res.first[~res.first_mask] == 0).all())
    admm = factorize("admm", w, density, g)
    assert admm.nnz == budget and bool((admm.first[~admm.first_mask] == 0).all())
    rows = factorize("admm", w, density, g, per_row=True, mask_iters=5, iters=8).first_mask.sum(1)
    assert bool((rows == row_budget(density, shape[1])).all())


# ---------------------------------------------------------------------------------------------
# quality and convergence
# ---------------------------------------------------------------------------------------------
def test_sparsegpt_reconstructs_a_layer_far_better_than_magnitude():
    w, g = correlated_problem(48, 256, 4)
    for density in (0.5, 0.3):
        errs = {m: factorize(m, w, density, g).error for m in ("magnitude", "wanda", "sparsegpt")}
        assert errs["sparsegpt"] < 0.5 * errs["magnitude"] and errs["sparsegpt"] < errs["wanda"], (density, errs)


def test_admm_converges_and_keeps_the_count():
    w, g = correlated_problem(24, 64, 5, D64)
    budget = nnz_budget(0.4, w.numel())
    # the mask is frozen after 15 steps; with more steps the refit approaches the masked optimum of the damped
    # problem (layer error + damping * ||W - P||^2 in the preconditioned domain)
    runs = {n: factorize("admm", w, 0.4, g, iters=n, damping=0.0) for n in (15, 20, 40, 1000)}
    errors = [runs[n].error for n in sorted(runs)]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < errors[0]
    mask = runs[1000].first_mask
    assert all(r.nnz == budget for r in runs.values()) and all(torch.equal(r.first_mask, mask) for r in runs.values())
    # 1000 steps: each row is the least-squares fit on its kept inputs
    for i in range(w.shape[0]):
        keep = mask[i]
        exact = torch.linalg.solve(g[keep][:, keep], g[keep] @ w[i])
        assert relative_error(runs[1000].first[i, keep], exact) < 1e-6  # convergence after 1000 steps
    # the reference's damping (0.1) trades calibration error for staying near the dense weights
    damped = factorize("admm", w, 0.4, g, iters=200).error
    assert errors[-1] < damped < factorize("wanda", w, 0.4, g).error


def test_admm_without_a_gram_is_the_projection():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(6))
    res = factorize("admm", w, 0.25)
    assert res.nnz == nnz_budget(0.25, w.numel())
    assert res.error == reconstruction_error(w, res.product)  # the same elementwise operations
    assert res.error <= factorize("magnitude", w, 0.25).error * 1.01  # W * mask is the optimum on a mask


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def test_sparsegpt_needs_a_gram_and_says_so_naming_the_layer():
    assert METHODS["sparsegpt"].needs_gram and not METHODS["sparsegpt"].two_factor
    w = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.mlp\.up_proj': sparsegpt needs calibration"):
        factorize("sparsegpt", w, 0.5, name="model.layers.0.mlp.up_proj")
    with pytest.raises(ValueError, match="method 'sparsegpt' needs calibration data"):
        PruneConfig(density=0.5, method="sparsegpt")


@pytest.mark.parametrize("method, options, match", [
    ("sparsegpt", {"blocksize": 0}, "blocksize must be an int >= 1"),
    ("sparsegpt", {"percdamp": -0.1}, "percdamp must be a finite number >= 0"),
    ("sparsegpt", {"blocksize": 2}, r"keeps no weight of a block of 2 columns of 4 rows"),
    ("admm", {"mask_iters": 30}, "mask_iters=30 exceeds iters=20"),
    ("admm", {"damping": -1.0}, "damping must be a number >= 0"),
    ("admm", {"per_row": True, "iters": 3, "mask_iters": 2}, "keeps no weight per output row"),
])
def test_bad_options_fail_in_the_planner_check_and_in_the_method(method, options, match):
    w, g = torch.randn(4, 64), torch.eye(64)
    with pytest.raises(ValueError, match=f"layer 'fc': .*{match}"):
        get_method(method).check_layer(4, 64, 0.01, options, "fc")
    with pytest.raises(ValueError, match=match):
        factorize(method, w, 0.01, g, name="fc", **options)
