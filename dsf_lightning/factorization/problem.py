"""One layer's pruning problem: the budget rules, input checks, error measure and result type.

Every method prunes a weight matrix ``W`` ``(out, fan_in)`` to at most
``nnz_budget(density, out * fan_in) = floor(density * out * fan_in)`` nonzeros, measured by the
layer-wise error ``tr((W - P) G (W - P)^T)`` with the mean input Gram ``G`` (``||W - P||_F^2``
without one). The checks here are the only copy of these rules: the planner runs them for every
layer before any work starts, and the methods run them again on their own inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Factorization",
    "check_budget",
    "check_density",
    "nnz_budget",
    "reconstruction_error",
    "row_budget",
    "scored_factorization",
    "validate_problem",
    "where",
    "where_names",
    "working_copy",
]


@dataclass
class Factorization:
    """A pruned or factorized layer weight ``W ~= second @ first`` (or ``first`` alone).

    Attributes:
        first: ``(r, fan_in)`` first factor (applied to the input first); for single-mask methods
            the pruned ``(out, fan_in)`` weight itself.
        second: ``(out, r)`` second factor, or ``None`` for single-mask methods.
        first_mask, second_mask: bool supports of the factors (``second_mask`` is ``None`` with
            ``second``). Factors are exactly zero outside them.
        method: the method's registry name.
        error: layer-wise error ``tr((W - P) G (W - P)^T)`` (``||W - P||_F^2`` without a Gram).
        relative_error: ``error`` divided by the error of the all-zero approximation.
        info: method details (nnz split, options used).
    """

    first: Tensor
    second: Tensor | None
    first_mask: Tensor
    second_mask: Tensor | None
    method: str
    error: float = math.nan
    relative_error: float = math.nan
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def product(self) -> Tensor:
        """``(out, fan_in)`` the dense weight this factorization represents."""
        return self.first if self.second is None else self.second @ self.first

    @property
    def nnz(self) -> int:
        """Stored nonzeros: the sizes of the masks, which is what the budget counts."""
        n = int(self.first_mask.sum())
        return n if self.second_mask is None else n + int(self.second_mask.sum())


def where(name: str | None) -> str:
    """Error-message prefix naming the layer, or nothing for an anonymous matrix."""
    return f"layer {name!r}: " if name else ""


def where_names(names: str | Sequence[str | None] | None) -> str | None:
    """The name :func:`where` gets for one layer or a batch of layers: one name as it is, several named layers
    joined (``"a, b"``: a batch's shared checks fail for all of them), ``None`` when none is named."""
    if names is None or isinstance(names, str):
        return names
    named = [str(n) for n in names if n]
    return ", ".join(named) if named else None


def nnz_budget(density: float, numel: int) -> int:
    """``floor(density * numel)``: the nonzeros plain pruning keeps, the budget of every method."""
    return math.floor(density * numel)


def check_density(density: Any, what: str = "density") -> float:
    """``density`` as a float in ``(0, 1]``, else ``ValueError`` naming ``what``."""
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"{what} must be a number in (0, 1], got {density!r}")
    return float(density)


def check_budget(out: int, fan_in: int, density: float, name: str | None = None) -> int:
    """The layer's nnz budget, or ``ValueError`` when ``density`` keeps no weight of it."""
    budget = nnz_budget(density, out * fan_in)
    if budget < 1:
        raise ValueError(f"{where(name)}density {density} keeps no weight of a ({out}, {fan_in}) matrix; "
                         f"it needs density >= {1 / (out * fan_in):.3g}")
    return budget


def row_budget(density: float, fan_in: int, name: str | None = None) -> int:
    """Weights kept per output row by per-row methods (Wanda, ADMM's ``per_row``): ``int(density * fan_in)``."""
    keep = int(density * fan_in)
    if keep < 1:
        raise ValueError(f"{where(name)}density {density} keeps no weight per output row of {fan_in} inputs; "
                         f"per-row methods need density >= {1 / fan_in:.3g}")
    return keep


def reconstruction_error(weight: Tensor, approx: Tensor, gram: Tensor | None = None) -> float:
    """Layer-wise error ``||X W^T - X P^T||^2 / N = tr((W - P) G (W - P)^T)``, or ``||W - P||_F^2``.

    Args:
        weight, approx: ``(out, fan_in)``.
        gram: ``(fan_in, fan_in)`` mean input Gram ``X^T X / N``, or ``None`` for projection.
    """
    diff = (weight - approx).to(torch.float64)
    if gram is None:
        return float(diff.square().sum())
    return float(((diff @ gram.to(torch.float64)) * diff).sum())


def scored_factorization(method: str, w: Tensor, g: Tensor | None, first: Tensor, first_mask: Tensor,
                         second: Tensor | None = None, second_mask: Tensor | None = None,
                         **info: Any) -> Factorization:
    """A :class:`Factorization` with its layer-wise error and the error relative to ``P = 0``."""
    approx = first if second is None else second @ first
    error = reconstruction_error(w, approx, g)
    base = reconstruction_error(w, torch.zeros_like(w), g)
    contig = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return Factorization(first=first.contiguous(), second=contig(second), first_mask=first_mask.contiguous(),
                         second_mask=contig(second_mask), method=method, error=error,
                         relative_error=error / base if base > 0 else 0.0, info=info)


def working_copy(weight: Tensor, gram: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Detached float32 (float64 stays float64) copies of ``weight`` and ``gram`` on the weight's device:
    the math is not stable in half precision."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype)
    return w, None if gram is None else gram.detach().to(device=w.device, dtype=dtype)


def validate_problem(weight: Tensor, density: float, gram: Tensor | None, name: str | None = None) -> int:
    """Check a (weight, density, gram) problem; returns the nnz budget. Raises ``ValueError``."""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{where(name)}weight must be a 2-D (out, fan_in) tensor, got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"{where(name)}weight must be floating point, got {weight.dtype}")
    check_density(density, f"{where(name)}density")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{where(name)}weight contains NaN or inf")
    out, fan_in = weight.shape
    if gram is not None:
        if not isinstance(gram, Tensor) or tuple(gram.shape) != (fan_in, fan_in):
            shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
            raise ValueError(f"{where(name)}gram must be ({fan_in}, {fan_in}) for a weight of shape "
                             f"({out}, {fan_in}), got {shape}")
        if not bool(torch.isfinite(gram).all()):
            raise ValueError(f"{where(name)}gram contains NaN or inf")
    return check_budget(out, fan_in, density, name)
