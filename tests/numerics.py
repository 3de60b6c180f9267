"""Float tolerances from the numerics: a relative bound of the dtype's unit roundoff times the computation's depth."""

from __future__ import annotations

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
