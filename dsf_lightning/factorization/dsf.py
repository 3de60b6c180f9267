"""Double sparse factorization ``W ~= S @ F`` (paper sections 4.2-4.3, Algorithm 1, App. A.1).

Orientation (ARCHITECTURE.md): ``W`` is ``(out, fan_in)``; ``F`` ("first", applied to the
input first) is ``(r, fan_in)`` and ``S`` ("second") is ``(out, r)``, ``r = min(out, fan_in)``.
Internally Algorithm 1 runs on ``M = A @ B`` with ``A`` square ``(n, n)`` and ``B`` ``(n, m)``,
``n <= m``: ``M = W`` (``S = A, F = B``) when ``out <= fan_in``, else ``M = W^T``
(``S = B^T, F = A^T``).

Budget: ``nnz(S) + nnz(F) <= floor(density * out * fan_in)``, always.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from dsf_lightning.factorization.admm import _EPS, admm_masked_lstsq, damped, topk_mask

__all__ = [
    "Factorization",
    "VISION_SQUARE_FRACTION",
    "double_sparse_factorize",
    "finalize_input_factor",
    "finalize_output_factor",
    "nnz_budget",
    "reconstruction_error",
    "rho0_schedule",
    "square_factor_nnz",
    "sylvester_solve",
    "validate_problem",
    "vision_square_share",
]

Preset = Literal["vision", "llm"]
FinalizeSide = Literal["input", "output"]

#: Share of a layer's nonzero budget that the ``"vision"`` preset gives the square factor.
VISION_SQUARE_FRACTION = 0.3


@dataclass
class Factorization:
    """A pruned or factorized layer weight ``W ~= second @ first`` (or ``first`` alone).

    Attributes:
        first: ``(r, fan_in)`` input-side factor; for single-sparse methods the pruned
            ``(out, fan_in)`` weight itself.
        second: ``(out, r)`` output-side factor, or ``None`` for single-sparse methods.
        first_mask, second_mask: bool supports of the factors (``second_mask`` is ``None``
            with ``second``). Factors are exactly zero outside them.
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


def nnz_budget(density: float, numel: int) -> int:
    """``floor(density * numel)``: the nonzeros plain pruning keeps, the budget of every method."""
    return math.floor(density * numel)


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


def validate_problem(
    weight: Tensor, density: float, gram: Tensor | None, name: str | None = None
) -> int:
    """Check a (weight, density, gram) problem; returns the nnz budget. Raises ``ValueError``."""
    where = f"layer {name!r}: " if name else ""
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"{where}weight must be a 2-D (out, fan_in) tensor, got {shape}")
    if not weight.is_floating_point():
        raise ValueError(f"{where}weight must be floating point, got {weight.dtype}")
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"{where}density must be a number in (0, 1], got {density!r}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{where}weight contains NaN or inf")
    out, fan_in = weight.shape
    if gram is not None:
        if not isinstance(gram, Tensor) or tuple(gram.shape) != (fan_in, fan_in):
            shape = tuple(gram.shape) if isinstance(gram, Tensor) else type(gram).__name__
            raise ValueError(f"{where}gram must be ({fan_in}, {fan_in}) for a weight of shape "
                             f"({out}, {fan_in}), got {shape}")
        if not bool(torch.isfinite(gram).all()):
            raise ValueError(f"{where}gram contains NaN or inf")
    budget = nnz_budget(density, out * fan_in)
    if budget < 1:
        raise ValueError(f"{where}density {density} keeps no weight of a ({out}, {fan_in}) matrix; "
                         f"it needs density >= {1 / (out * fan_in):.3g}")
    return budget


def vision_square_share(density: float, out: int, fan_in: int, fraction: float = VISION_SQUARE_FRACTION) -> float:
    """The ``"vision"`` preset's square-factor density: ``fraction`` of the ``(out, fan_in)``
    layer's budget spread over the ``(r, r)`` factor, capped at 1 (a dense square factor)."""
    r = min(out, fan_in)
    return min(1.0, fraction * nnz_budget(density, out * fan_in) / (r * r))


def square_factor_nnz(
    square_share: float | Preset, density: float, out: int, fan_in: int, name: str | None = None
) -> int:
    """Nonzeros of the square ``(r, r)`` factor: ``share * r^2``, at least 1.

    ``square_share`` is the square factor's own density, or a preset rule:
    ``"llm"`` 0.16 for square ``W``, 0.25 for rectangular (paper section 5.1); ``"vision"``
    gives the square factor :data:`VISION_SQUARE_FRACTION` (30%) of the layer's budget, capped at a
    dense ``(r, r)`` factor.

    Why not the reference code's ``max(0.05, density / 2)``: a share of ``r^2`` ignores the
    layer's aspect ratio, so a 3x3 conv (``fan_in = 9 r``) at density 0.1 gave its square factor
    only 5.6% of the budget but a square 1x1 conv 50%. Measured on trained ResNet-20 weights (16
    and 32 wide, densities 0.05-0.2; benchmarks/RESULTS.md, "Square-factor share"), 30% of the
    budget is the best single fraction of 20/30/40/50% and cuts the mean DSF/magnitude
    projection error from 0.39-0.76 to 0.28-0.57.
    """
    r = min(out, fan_in)
    if square_share == "llm":
        share = 0.16 if out == fan_in else 0.25
    elif square_share == "vision":
        share = vision_square_share(density, out, fan_in)
    elif isinstance(square_share, (int, float)) and not isinstance(square_share, bool) and 0 < square_share <= 1:
        share = float(square_share)
    else:
        raise ValueError(f"square_share must be 'llm', 'vision' or a number in (0, 1], got {square_share!r}")
    nnz = max(1, math.floor(share * r * r))
    budget = nnz_budget(density, out * fan_in)
    if nnz >= budget:
        where = f"layer {name!r}: " if name else ""
        raise ValueError(
            f"{where}the square factor's share {share:.3g} of a ({r}, {r}) factor needs {nnz} nonzeros, "
            f"but density {density} of ({out}, {fan_in}) allows only {budget} in total; pass a smaller "
            f"square_share (< {budget / (r * r):.3g}) or a higher density")
    return nnz


def rho0_schedule(k: int, outer_iters: int) -> float:
    """Annealed first-step penalty ``rho_0 = min(1, k / (n - 3))^3`` of Algorithm 1 (k = 1..n)."""
    return min(1.0, k / max(1, outer_iters - 3)) ** 3


def random_square_mask(r: int, nnz: int, seed: int, device: torch.device | str | None = None) -> Tensor:
    """``(r, r)`` random mask with ``nnz`` entries, the same for every layer of this shape and seed.

    The diagonal is kept first (when ``nnz >= r``) so the identity init survives the mask.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + r)
    mask = torch.zeros(r, r, dtype=torch.bool)
    if nnz >= r:
        mask.fill_diagonal_(True)
        off = (~mask).flatten().nonzero().squeeze(1)
        pick = off[torch.randperm(off.numel(), generator=gen)[: nnz - r]]
    else:
        pick = torch.randperm(r * r, generator=gen)[:nnz]
    mask.view(-1)[pick] = True
    return mask.to(device)


def sylvester_solve(
    gram_eig: tuple[Tensor, Tensor], sts_eig: tuple[Tensor, Tensor], rhs: Tensor, rho: float
) -> Tensor:
    """Solve ``G A K + rho A = C`` for ``A`` (App. A.1) from ``G = Q D Q^T``, ``K = R E R^T``.

    ``A = Q ((Q^T C R) / (diag(D) diag(E)^T + rho)) R^T``. Shapes: ``G`` (p, p), ``K`` (r, r),
    ``C`` and ``A`` (p, r). The decompositions are computed once per finalization and reused.
    """
    (d, q), (e, r) = gram_eig, sts_eig
    return q @ ((q.T @ rhs @ r) / (d[:, None] * e[None, :] + rho)) @ r.T


def finalize_input_factor(
    weight: Tensor, gram: Tensor, first: Tensor, second: Tensor, first_mask: Tensor,
    *, iters: int = 20, damping: float = 1e-4,
) -> Tensor:
    """Refit ``F`` on its fixed mask for ``min tr((W - S F) G (W - S F)^T)``: ADMM whose
    x-step is the Sylvester equation ``G A (S^T S) + rho A = G W^T S + rho (Z - U)``, ``A = F^T``.

    Preconditioned on both sides (unit diagonals of ``G`` and ``S^T S``) so ``rho = 1`` fits.
    Returns the new ``first`` ``(r, fan_in)``, zero outside ``first_mask``.
    """
    sts = second.T @ second
    ng = gram.diagonal().sqrt() + _EPS
    nk = sts.diagonal().sqrt() + _EPS
    gram_n = damped(gram / ng[:, None] / ng[None, :], damping)
    sts_n = sts / nk[:, None] / nk[None, :]
    gram_eig = torch.linalg.eigh(gram_n)
    sts_eig = torch.linalg.eigh(sts_n)
    scale = ng[:, None] * nk[None, :]  # A' = Dg A Dk
    c0 = (gram @ weight.T @ second) / scale
    mask = first_mask.T
    z = first.T * scale
    u = torch.zeros_like(z)
    for _ in range(iters):
        a = sylvester_solve(gram_eig, sts_eig, c0 + (z - u), 1.0)
        z = (a + u) * mask
        u = u + (a - z)
    return (z / scale).T.contiguous()


def finalize_output_factor(
    weight: Tensor, gram: Tensor, first: Tensor, second: Tensor, second_mask: Tensor,
    *, iters: int = 20, damping: float = 1e-4,
) -> Tensor:
    """Refit ``S`` on its fixed mask: a masked regression with Gram ``F G F^T`` and right-hand
    side ``F G W^T``, solved by :func:`admm_masked_lstsq` warm-started at ``S``. Returns ``(out, r)``."""
    fg = first @ gram
    sol = admm_masked_lstsq(fg @ first.T, fg @ weight.T, z=second.T, fixed_mask=second_mask.T,
                            iters=iters, damping=damping)
    return sol.z.T.contiguous()


def _alternate(
    m: Tensor, nnz_a: int, nnz_b: int, a_mask: Tensor | None, *,
    outer_iters: int, inner_iters: int, mask_iters: int, damping: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1 on ``M ~= A B`` (``A`` (n, n), ``B`` (n, m)); returns ``A, B`` and masks."""
    n = m.shape[0]
    a = torch.eye(n, dtype=m.dtype, device=m.device)
    if a_mask is not None:
        a = a * a_mask
    b = m * topk_mask(m.abs(), nnz_b)  # magnitude-pruned init of the other factor
    ua, ub = torch.zeros_like(a), torch.zeros_like(b)
    mask_a = a_mask
    for k in range(1, outer_iters + 1):
        rho0 = rho0_schedule(k, outer_iters)
        sol_b = admm_masked_lstsq(a.T @ a, a.T @ m, nnz_b, z=b, u=ub, iters=inner_iters,
                                  mask_iters=mask_iters, rho0=rho0, damping=damping)
        b, ub, mask_b = sol_b.z, sol_b.u, sol_b.mask
        # A-step on the transposed problem ||B^T A^T - M^T||: the variable is A^T.
        sol_a = admm_masked_lstsq(b @ b.T, b @ m.T, nnz_a, z=a.T, u=ua.T, iters=inner_iters,
                                  mask_iters=mask_iters, rho0=rho0, damping=damping,
                                  fixed_mask=None if a_mask is None else a_mask.T)
        a, ua, mask_a = sol_a.z.T, sol_a.u.T, sol_a.mask.T
    return a, b, mask_a, mask_b


def double_sparse_factorize(
    weight: Tensor,
    density: float,
    gram: Tensor | None = None,
    *,
    preset: Preset = "vision",
    square_share: float | Preset | None = None,
    input_norm_scaling: bool | None = None,
    finalize: Sequence[FinalizeSide] | None = None,
    outer_iters: int = 40,
    inner_iters: int = 5,
    mask_iters: int = 2,
    fixed_mask: bool = False,
    seed: int = 0,
    damping: float = 1e-2,
    finalize_iters: int = 20,
    finalize_rounds: int = 1,
    finalize_damping: float = 1e-4,
    name: str | None = None,
) -> Factorization:
    """Factorize ``W ~= S @ F`` with ``nnz(S) + nnz(F) <= floor(density * W.numel())``.

    Args:
        weight: ``(out, fan_in)`` layer weight (Conv2d: ``weight.flatten(1)``).
        density: kept fraction in ``(0, 1]``.
        gram: ``(fan_in, fan_in)`` mean calibration Gram ``X^T X / N`` for layer-wise pruning;
            ``None`` for data-free projection (``G = I``).
        preset: ``"vision"`` (the square factor gets 30% of the budget, see
            :func:`square_factor_nnz`; no input-norm scaling) or ``"llm"`` (the paper's share
            0.16 square / 0.25 rectangular, Wanda-style input-norm scaling). Both finalize both
            factors with the Gram: the paper finalizes only ``S`` for LLMs, but on SmolLM2-135M
            refitting ``F`` too cuts the layer-wise error by 27-35% (v_proj, down_proj at density
            0.4), turning a loss against ADMM pruning into a win; pass ``finalize=("output",)``
            for the paper's.
        square_share: override of the square ``(r, r)`` factor's own density.
        input_norm_scaling: override: project ``W diag(||X_j||)`` and scale ``F`` back.
        finalize: override: which factors to refit on fixed masks with the Gram
            (``"input"``: ``F`` via the Sylvester solve; ``"output"``: ``S``). Needs ``gram``.
        outer_iters, inner_iters: Algorithm 1's ``n`` and ``m``.
        mask_iters: inner iterations that reselect the mask (cubic ramp) before freezing it.
        fixed_mask: the paper's "one mask fix": the square factor's mask is random, from
            ``seed`` and its shape only, so every layer of that shape shares it.
        seed: seed of the fixed mask.
        damping: relative ridge on the Grams of Algorithm 1's alternating steps, whose
            annealed first step (``rho_0 -> 0``) is otherwise singular for sparse factors.
        finalize_damping: relative ridge of the finalization. Small on purpose: the
            finalization's ADMM penalty already makes every solve definite, and a 1e-2 ridge
            on real LLM Grams (eigenvalues down to 1e-9 of the largest) biases the refit so
            much that it raised SmolLM2 layer 0 k_proj's error 3x instead of lowering it.
        finalize_iters: ADMM iterations of each finalization.
        finalize_rounds: passes over the ``finalize`` sides (each pass lowers the error a
            little more: 0.90 -> 0.85 -> 0.83 of ADMM's error on SmolLM2 down_proj).
        name: layer name for error messages.

    Returns:
        :class:`Factorization` with ``first`` ``(r, fan_in)``, ``second`` ``(out, r)``, in
        float32 (float64 if ``weight`` is float64), on ``weight``'s device.
    """
    budget = validate_problem(weight, density, gram, name)
    if preset not in ("vision", "llm"):
        raise ValueError(f"preset must be 'vision' or 'llm', got {preset!r}")
    out, fan_in = weight.shape
    square_share = preset if square_share is None else square_share
    scaling = (preset == "llm") if input_norm_scaling is None else input_norm_scaling
    finalize = tuple(("input", "output") if finalize is None else finalize) if gram is not None else ()
    if not set(finalize) <= {"input", "output"}:
        raise ValueError(f"finalize must name 'input' and/or 'output', got {finalize!r}")
    if min(outer_iters, inner_iters, mask_iters, finalize_rounds) < 1:
        raise ValueError(f"outer_iters, inner_iters, mask_iters and finalize_rounds must be >= 1, got "
                         f"{outer_iters}, {inner_iters}, {mask_iters}, {finalize_rounds}")
    nnz_square = square_factor_nnz(square_share, density, out, fan_in, name)
    nnz_other = budget - nnz_square

    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype)
    g = None if gram is None else gram.detach().to(device=w.device, dtype=dtype)
    norm = (g.diagonal().clamp_min(0).sqrt() + _EPS) if (scaling and g is not None) else None
    w_scaled = w if norm is None else w * norm[None, :]

    transposed = out > fan_in
    r = min(out, fan_in)
    a_mask = None
    if fixed_mask:  # shared in the layer's own orientation: it is the mask of S, or of F when transposed
        a_mask = random_square_mask(r, nnz_square, seed, w.device)
        a_mask = a_mask.T.contiguous() if transposed else a_mask
    a, b, mask_a, mask_b = _alternate(
        w_scaled.T if transposed else w_scaled, nnz_square, nnz_other, a_mask,
        outer_iters=outer_iters, inner_iters=inner_iters, mask_iters=mask_iters, damping=damping)
    if transposed:
        second, first, second_mask, first_mask = b.T, a.T, mask_b.T, mask_a.T
    else:
        second, first, second_mask, first_mask = a, b, mask_a, mask_b
    if norm is not None:
        first = first / norm[None, :]

    for _ in range(finalize_rounds):
        if "input" in finalize:
            first = finalize_input_factor(w, g, first, second, first_mask, iters=finalize_iters,
                                          damping=finalize_damping)
        if "output" in finalize:
            second = finalize_output_factor(w, g, first, second, second_mask, iters=finalize_iters,
                                            damping=finalize_damping)

    return scored_factorization(
        "dsf", w, g, first, first_mask, second, second_mask,
        nnz_square=nnz_square, nnz_other=nnz_other, budget=budget, transposed=transposed,
        input_norm_scaling=norm is not None, finalize=finalize, fixed_mask=fixed_mask)
