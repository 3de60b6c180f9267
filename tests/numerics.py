"""Float tolerances from the numerics: a relative bound of the dtype's unit roundoff times the computation's depth."""

from __future__ import annotations

import math

import torch


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = eps / 2`` of ``dtype`` (float32: 5.96e-8, float64: 1.11e-16)."""
    return torch.finfo(dtype).eps / 2


def rel_bound(dtype: torch.dtype, depth: int, computations: int = 2) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)`` for ``n = depth`` (terms in the longest chain of rounded
    accumulations), once per independently rounded computation compared."""
    nu = depth * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"depth {depth} is too deep for {dtype}: n*u = {nu} >= 1")
    return computations * nu / (1 - nu)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Normwise ``||got - want||_F / ||want||_F`` in float64 (elementwise ratios blow up near zeros)."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float64).tiny))


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, *, depth: int, dtype: torch.dtype | None = None,
                     computations: int = 2) -> None:
    """``relative_error(got, want) <= rel_bound(dtype, depth, computations)``, with a message giving both."""
    dtype = dtype or want.dtype
    err, bound = relative_error(got, want), rel_bound(dtype, depth, computations)
    assert got.shape == want.shape, f"shapes {tuple(got.shape)} vs {tuple(want.shape)}"
    assert err <= bound, f"relative error {err:.3e} > bound {bound:.3e} ({dtype}, depth {depth}, x{computations})"


def block_depth(hidden: int, intermediate: int) -> int:
    """Depth of one decoder block: the attention's q/k/v and output dots over ``hidden``, the MLP's over
    ``hidden`` then ``intermediate``."""
    return 2 * hidden + hidden + intermediate


def perplexity_rel_bound(dtype: torch.dtype, depth: int, logit_scale: float, computations: int = 2) -> float:
    """Relative bound between two perplexities whose logits agree to ``rel_bound(dtype, depth)``.

    A token's NLL ``logsumexp(z) - z_y`` moves by at most ``2 max|dz|``; each logit's rounding is taken as at
    most ``r * logit_scale`` (``logit_scale = max|z|``), so ``exp(mean NLL)`` moves by a factor of at most
    ``exp(2 r logit_scale)``.
    """
    return math.expm1(2 * logit_scale * rel_bound(dtype, depth, computations))


def network_depth(model: torch.nn.Module) -> int:
    """Depth of a whole network, taken as every weight layer in one chain (the worst case): the sum of each
    layer's dot length, ``fan_in`` (plus ``rank`` for a factored layer, whose ``x F^T S^T`` chains both)."""
    from transformers.pytorch_utils import Conv1D

    from dsf_lightning.modules import is_pruned_module

    depth = 0
    for m in model.modules():
        if is_pruned_module(m):
            depth += m.merged_weight().flatten(1).shape[1] + getattr(m, "rank", 0)
        elif isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            depth += m.weight[0].numel()
        elif isinstance(m, Conv1D):
            depth += m.weight.shape[0]
    return depth
