"""Double sparse factorization ``W ~= second @ first`` (paper sections 4.2-4.3, Algorithm 1, App. A.1).

Orientation (docs/ARCHITECTURE.md): ``W`` is ``(out, fan_in)``; ``first`` (``F``, applied to the
input first) is ``(r, fan_in)`` and ``second`` (``S``) is ``(out, r)``, ``r = min(out, fan_in)``, so
one factor is always square. Algorithm 1 runs on ``M ~= sq @ other`` with the square factor ``sq``
``(n, n)`` first and ``other`` ``(n, m)``, ``n <= m``: ``M = W`` (``second = sq``, ``first = other``)
when ``out <= fan_in``, else ``M = W^T`` (``second = other^T``, ``first = sq^T``).

Budget: ``nnz(second) + nnz(first) <= floor(density * out * fan_in)``, always.

The engine (:func:`_alternate`, the finalizations, the Sylvester solve) works on one matrix or on a
batch ``(B, ...)`` of equal-shape problems; :func:`double_sparse_factorize_batch` factorizes layers of
one shape together, sharing the per-operation overhead that dominates small layers (measurements in
benchmarks/RESULTS.md, "Batching layers of one shape").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import torch
from torch import Tensor

from dsf_lightning.factorization.admm import EPS, admm_masked_lstsq, damped, diagonals, topk_mask
from dsf_lightning.factorization.problem import (
    Factorization,
    nnz_budget,
    scored_factorization,
    validate_problem,
    where,
    where_names,
    working_copy,
)

__all__ = [
    "PRESETS",
    "DSFOptions",
    "SPLIT_RULES",
    "VISION_SQUARE_FRACTION",
    "auto_square_fraction",
    "double_sparse_factorize",
    "double_sparse_factorize_batch",
    "finalize_first",
    "finalize_second",
    "rho0_schedule",
    "square_factor_nnz",
    "sylvester_solve",
    "vision_square_share",
]

Preset = Literal["vision", "llm"]
#: DSF's hyperparameter sets (see :func:`double_sparse_factorize`).
PRESETS: tuple[Preset, ...] = ("vision", "llm")
SplitRule = Literal["auto", "vision", "llm"]
#: Named rules for the split of a layer's budget between the factors (:func:`square_factor_nnz`).
SPLIT_RULES: tuple[SplitRule, ...] = ("auto", "vision", "llm")
Side = Literal["first", "second"]

#: The ``"auto"`` split's constants (:func:`auto_square_fraction`).
AUTO_F0, AUTO_X0 = 0.45, 2.5

#: Share of a layer's nonzero budget that the ``"vision"`` split rule gives the square factor.
VISION_SQUARE_FRACTION = 0.3


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class DSFOptions:
    """DSF's keyword options, every value checked when built (``PruneConfig`` builds them, so a bad value fails
    before any calibration).

    Attributes:
        preset: the hyperparameter set. ``"vision"``: no input-norm scaling. ``"llm"``: Wanda-style
            input-norm scaling. Both split the budget by the ``"auto"`` rule and finalize both
            factors with the Gram (the paper finalizes only ``second`` for LLMs;
            ``finalize=("second",)`` gives that; measurements in benchmarks/RESULTS.md).
        square_share: how the budget is split between the factors (:func:`square_factor_nnz`):
            ``"auto"`` (:func:`auto_square_fraction`), the fixed rules ``"vision"`` (30% of the
            budget) or ``"llm"`` (the paper's 0.16 / 0.25 of ``r^2``), or the square ``(r, r)``
            factor's own density as a number in ``(0, 1]``; ``None`` means ``"auto"``.
        input_norm_scaling: override: project ``W diag(||X_j||)`` and scale ``first`` back.
        finalize: override: the factors to refit on fixed masks with the Gram (``"first"`` via the
            Sylvester solve, ``"second"`` by masked regression); used only with a Gram.
        outer_iters, inner_iters: Algorithm 1's ``n`` and ``m``.
        mask_iters: inner iterations that reselect the mask (at the factor's nnz) before freezing it.
        fixed_mask: the paper's "one mask fix": the square factor's mask is random, from
            ``seed`` and its shape only, so every layer of that shape shares it.
        seed: seed of the fixed mask.
        damping: relative ridge on the Grams of Algorithm 1's alternating steps, whose annealed first step
            (``rho_0 -> 0``) is otherwise singular for sparse factors.
        finalize_iters: ADMM iterations of each finalization.
        finalize_rounds: passes over the ``finalize`` factors.
        finalize_damping: relative ridge of the finalization, small because its ADMM penalty already
            makes every solve definite and a large ridge biases the refit on ill-conditioned Grams.
    """

    preset: Preset = "vision"
    square_share: float | SplitRule | None = "auto"
    input_norm_scaling: bool | None = None
    finalize: tuple[Side, ...] | None = None
    outer_iters: int = 40
    inner_iters: int = 2
    mask_iters: int = 1
    fixed_mask: bool = False
    seed: int = 0
    damping: float = 3e-2
    finalize_iters: int = 20
    finalize_rounds: int = 1
    finalize_damping: float = 1e-4

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
        share = self.square_share
        if not (share is None or share in SPLIT_RULES or (_real(share) and 0 < share <= 1)):
            raise ValueError(f"square_share must be one of {SPLIT_RULES}, a number in (0, 1] or None, got {share!r}")
        if self.input_norm_scaling not in (None, True, False):
            raise ValueError(f"input_norm_scaling must be a bool or None, got {self.input_norm_scaling!r}")
        if self.finalize is not None:
            sides = (self.finalize,) if isinstance(self.finalize, str) else self.finalize
            if not isinstance(sides, (list, tuple)) or not set(sides) <= {"first", "second"}:
                raise ValueError(f"finalize must name 'first' and/or 'second', got {self.finalize!r}")
            object.__setattr__(self, "finalize", tuple(sides))
        for k in ("outer_iters", "inner_iters", "mask_iters", "finalize_iters", "finalize_rounds"):
            if not _positive_int(getattr(self, k)):
                raise ValueError(f"{k} must be an integer >= 1, got {getattr(self, k)!r}")
        if not isinstance(self.fixed_mask, bool):
            raise ValueError(f"fixed_mask must be a bool, got {self.fixed_mask!r}")
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        for k in ("damping", "finalize_damping"):
            if not (_real(getattr(self, k)) and getattr(self, k) >= 0):
                raise ValueError(f"{k} must be a finite number >= 0, got {getattr(self, k)!r}")

    @classmethod
    def of(cls, options: Mapping[str, Any], name: str | Sequence[str | None] | None = None) -> DSFOptions:
        """``DSFOptions(**options)``; an unknown name is a ``TypeError`` listing the valid ones, a bad value a
        ``ValueError``, both naming the layer(s) ``name``."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise TypeError(f"{where(where_names(name))}unexpected option(s) {unknown} for DSF; valid: {valid}")
        try:
            return cls(**options)
        except ValueError as e:
            raise ValueError(f"{where(where_names(name))}{e}") from None


def vision_square_share(density: float, out: int, fan_in: int, fraction: float = VISION_SQUARE_FRACTION) -> float:
    """The ``"vision"`` rule's square-factor density: ``fraction`` of the ``(out, fan_in)``
    layer's budget spread over the ``(r, r)`` factor, capped at 1 (a dense square factor)."""
    r = min(out, fan_in)
    return min(1.0, fraction * nnz_budget(density, out * fan_in) / (r * r))


def auto_square_fraction(density: float, out: int, fan_in: int) -> float:
    """The ``"auto"`` split: the share of an ``(out, fan_in)`` layer's budget that the square factor gets.

    With ``x = budget / r^2`` (the budget in units of a dense square factor,
    ``density * max(out, fan_in) / min(out, fan_in)``), the square factor gets
    ``AUTO_F0 / (1 + x / AUTO_X0)`` of the budget: 45% of a small budget, less as the budget
    grows, so that the square factor's own density ``fraction * x`` rises with ``x`` and saturates
    (it is capped at dense by :func:`square_factor_nnz`). Fitted to the best budget fraction of every
    ResNet-20 conv shape at densities 0.05-0.5 and checked on SmolLM2 and MiniLM matrices
    (benchmarks/RESULTS.md, "Split between the factors").
    """
    x = density * max(out, fan_in) / min(out, fan_in)
    return AUTO_F0 / (1.0 + x / AUTO_X0)


def square_factor_nnz(
    square_share: float | SplitRule, density: float, out: int, fan_in: int, name: str | None = None
) -> int:
    """Nonzeros of the square ``(r, r)`` factor, at least 1; the other factor gets the rest of the budget.

    ``square_share`` is the square factor's own density (a number in ``(0, 1]``, ``share * r^2``
    nonzeros) or a rule: ``"auto"`` (the default of both presets) gives it
    :func:`auto_square_fraction` of the layer's budget; ``"vision"`` :data:`VISION_SQUARE_FRACTION`
    of the budget; ``"llm"`` is the paper's section 5.1 rule, a density of 0.16 for square ``W`` and
    0.25 for rectangular. Budget-fraction rules are capped at a dense ``(r, r)`` factor.
    Measurements of all three in benchmarks/RESULTS.md, "Split between the factors".

    Raises ``ValueError`` for an unknown rule, or when the square factor alone would take the whole
    budget (nothing left for the other factor).
    """
    r = min(out, fan_in)
    budget = nnz_budget(density, out * fan_in)
    if budget < 2:
        raise ValueError(f"{where(name)}density {density} keeps {budget} weight(s) of a ({out}, {fan_in}) matrix, but "
                         f"two factors need at least 2 nonzeros: use density >= {2 / (out * fan_in):.3g}")
    if square_share == "llm":
        share = 0.16 if out == fan_in else 0.25
    elif square_share == "vision":
        share = vision_square_share(density, out, fan_in)
    elif square_share == "auto":
        share = min(1.0, auto_square_fraction(density, out, fan_in) * budget / (r * r))
    elif isinstance(square_share, (int, float)) and not isinstance(square_share, bool) and 0 < square_share <= 1:
        share = float(square_share)
    else:
        raise ValueError(f"{where(name)}square_share must be one of {SPLIT_RULES} or a number in (0, 1], "
                         f"got {square_share!r}")
    nnz = max(1, math.floor(share * r * r))
    if nnz >= budget:
        raise ValueError(
            f"{where(name)}the square factor's share {share:.3g} of a ({r}, {r}) factor needs {nnz} nonzeros, "
            f"but density {density} of ({out}, {fan_in}) allows only {budget} in total, leaving none for the "
            f"other factor; pass a smaller square_share (< {budget / (r * r):.3g}), 'auto', or a higher density")
    return nnz


def rho0_schedule(k: int, outer_iters: int, settle: int = 1) -> float:
    """Annealed first-step penalty ``rho_0 = min(1, k / (n - settle))^3`` of Algorithm 1 (k = 1..n).

    The paper uses ``settle = 3`` (``rho_0`` reaches 1 four iterations before the end); DSF's default
    ``settle = 1`` spends two more iterations annealing (measurements in benchmarks/RESULTS.md)."""
    return min(1.0, k / max(1, outer_iters - settle)) ** 3


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
    """Solve ``G X K + rho X = C`` for ``X`` (App. A.1) from ``G = Q D Q^T``, ``K = R E R^T``.

    ``X = Q ((Q^T C R) / (diag(D) diag(E)^T + rho)) R^T``. Shapes: ``G`` (p, p), ``K`` (r, r),
    ``C`` and ``X`` (p, r), or all with a leading batch dimension. The decompositions are computed once
    per finalization and reused.
    """
    (d, q), (e, r) = gram_eig, sts_eig
    return q @ ((q.mT @ rhs @ r) / (d[..., :, None] * e[..., None, :] + rho)) @ r.mT


def finalize_first(
    weight: Tensor, gram: Tensor, first: Tensor, second: Tensor, first_mask: Tensor,
    *, iters: int = 20, damping: float = 1e-4,
) -> Tensor:
    """Refit ``first`` (``F``) on its fixed mask for ``min tr((W - S F) G (W - S F)^T)``: ADMM whose
    x-step is the Sylvester equation ``G X (S^T S) + rho X = G W^T S + rho (Z - U)``, ``X = F^T``.

    Preconditioned on both sides (unit diagonals of ``G`` and ``S^T S``) so ``rho = 1`` fits.
    Returns the new ``first`` ``(r, fan_in)``, zero outside ``first_mask``; every argument may carry a
    leading batch dimension (one problem per matrix).
    """
    sts = second.mT @ second
    ng = diagonals(gram).sqrt() + EPS
    nk = diagonals(sts).sqrt() + EPS
    gram_n = damped(gram / ng[..., :, None] / ng[..., None, :], damping)
    sts_n = sts / nk[..., :, None] / nk[..., None, :]
    gram_eig = torch.linalg.eigh(gram_n)
    sts_eig = torch.linalg.eigh(sts_n)
    scale = ng[..., :, None] * nk[..., None, :]  # X' = Dg X Dk
    c0 = (gram @ weight.mT @ second) / scale
    mask = first_mask.mT
    z = first.mT * scale
    u = torch.zeros_like(z)
    for _ in range(iters):
        x = sylvester_solve(gram_eig, sts_eig, c0 + (z - u), 1.0)
        z = (x + u) * mask
        u = u + (x - z)
    return (z / scale).mT.contiguous()


def finalize_second(
    weight: Tensor, gram: Tensor, first: Tensor, second: Tensor, second_mask: Tensor,
    *, iters: int = 20, damping: float = 1e-4,
) -> Tensor:
    """Refit ``second`` (``S``) on its fixed mask: a masked regression with Gram ``F G F^T`` and right-hand
    side ``F G W^T``, solved by :func:`admm_masked_lstsq` warm-started at ``S``. Returns ``(out, r)``
    (batched: ``(B, out, r)`` from arguments with a leading batch dimension)."""
    fg = first @ gram
    sol = admm_masked_lstsq(fg @ first.mT, fg @ weight.mT, z=second.mT, fixed_mask=second_mask.mT,
                            iters=iters, damping=damping)
    return sol.z.mT.contiguous()


def _alternate(
    m: Tensor, sq_nnz: int, other_nnz: int, sq_mask: Tensor | None, *,
    outer_iters: int, inner_iters: int, mask_iters: int, damping: float, settle: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Algorithm 1 on ``M ~= sq @ other`` (``sq`` (n, n), ``other`` (n, m)); returns both and their masks.

    ``m`` may be a batch ``(B, n, m)`` (``sq_mask`` then ``(B, n, n)``): every matrix is its own
    problem with the same counts. Every step is warm-started from the previous factor, which already
    has its nonzero count, so each ADMM call reselects the mask at exactly that count
    (``gradual=False``), never on a ramp that would first let it grow."""
    n = m.shape[-2]
    sq = torch.eye(n, dtype=m.dtype, device=m.device).expand(*m.shape[:-2], n, n).contiguous()
    if sq_mask is not None:
        sq = sq * sq_mask
    other = m * topk_mask(m.abs(), other_nnz)  # magnitude-pruned init of the other factor
    u_sq, u_other = torch.zeros_like(sq), torch.zeros_like(other)
    mask_sq = sq_mask
    for k in range(1, outer_iters + 1):
        rho0 = rho0_schedule(k, outer_iters, settle)
        sol = admm_masked_lstsq(sq.mT @ sq, sq.mT @ m, other_nnz, z=other, u=u_other, iters=inner_iters,
                                mask_iters=mask_iters, gradual=False, rho0=rho0, damping=damping)
        other, u_other, mask_other = sol.z, sol.u, sol.mask
        # sq-step on the transposed problem ||other^T sq^T - M^T||: the variable is sq^T.
        sol = admm_masked_lstsq(other @ other.mT, other @ m.mT, sq_nnz, z=sq.mT, u=u_sq.mT, iters=inner_iters,
                                mask_iters=mask_iters, gradual=False, rho0=rho0, damping=damping,
                                fixed_mask=None if sq_mask is None else sq_mask.mT)
        sq, u_sq, mask_sq = sol.z.mT, sol.u.mT, sol.mask.mT
    return sq, other, mask_sq, mask_other


def double_sparse_factorize(weight: Tensor, density: float, gram: Tensor | None = None, *, name: str | None = None,
                            **options: Any) -> Factorization:
    """Factorize ``W ~= second @ first`` with ``nnz(second) + nnz(first) <= floor(density * W.numel())``.

    Args:
        weight: ``(out, fan_in)`` layer weight (Conv2d: ``weight.flatten(1)``).
        density: kept fraction in ``(0, 1]``.
        gram: ``(fan_in, fan_in)`` mean calibration Gram ``X^T X / N`` for layer-wise pruning;
            ``None`` for data-free projection (``G = I``).
        name: layer name for error messages.
        options: the fields of :class:`DSFOptions` (``preset``, ``square_share``, ``outer_iters``, ...).

    Returns:
        :class:`Factorization` with ``first`` ``(r, fan_in)``, ``second`` ``(out, r)``, in
        float32 (float64 if ``weight`` is float64), on ``weight``'s device.
    """
    budget = validate_problem(weight, density, gram, name)
    opts = DSFOptions.of(options, name)
    w, g = working_copy(weight, gram)
    return _solve(w, g, density, budget, name, opts)[0]


def double_sparse_factorize_batch(
    weights: Tensor, density: float, grams: Tensor | None = None, *, names: Sequence[str | None] | None = None,
    **options: Any,
) -> list[Factorization]:
    """:func:`double_sparse_factorize` of ``B`` layers of one shape at once, one result per layer.

    Args:
        weights: ``(B, out, fan_in)`` the layers' weights.
        density: kept fraction in ``(0, 1]``, the same for every layer (so is the budget and its split).
        grams: ``(B, fan_in, fan_in)`` their mean input Grams, or ``None`` (data-free projection).
        names: the ``B`` layer names, for error messages.
        options: the fields of :class:`DSFOptions`, shared by the batch.

    Every matrix is its own problem (its own masks, preconditioning and ridge); only the operations
    are batched (batched GEMMs, Cholesky, ``eigh``, a per-matrix ``topk``), which shares their
    per-call overhead: small layers (ResNet-20's convs) factorize faster per layer, large ones gain
    nothing or lose (measurements in benchmarks/RESULTS.md, "Batching layers of one shape"; the
    pipeline batches small layers only, :mod:`dsf_lightning.pipeline.jobs`). ``B = 1`` runs the 2-D call.

    Results equal one call per layer up to float rounding: ``tests/test_factorization.py`` asserts the
    same masks and factors within 1e-5. Bit equality is not promised: it holds where the batched kernels
    round like the single ones (it did in every test case on the CPU with one thread), but another
    backend may round batched GEMMs differently, and a mask could then differ where two scores tie
    within rounding.
    """
    if not isinstance(weights, Tensor) or weights.dim() != 3 or weights.shape[0] < 1:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise ValueError(f"weights must be a (B, out, fan_in) tensor with B >= 1, got {shape}")
    count = weights.shape[0]
    names = [None] * count if names is None else list(names)
    if len(names) != count:
        raise ValueError(f"names has {len(names)} entries for {count} weights")
    if grams is not None and (not isinstance(grams, Tensor) or grams.dim() != 3 or grams.shape[0] != count):
        shape = tuple(grams.shape) if isinstance(grams, Tensor) else type(grams).__name__
        raise ValueError(f"grams must be ({count}, fan_in, fan_in) for {count} weights, got {shape}")
    opts = DSFOptions.of(options, names)
    if count == 1:  # the single-matrix path: its 2-D operations are cheaper than a batch of one
        return [double_sparse_factorize(weights[0], density, None if grams is None else grams[0], name=names[0],
                                        **options)]
    for i in range(count):
        budget = validate_problem(weights[i], density, None if grams is None else grams[i], names[i])
    w, g = working_copy(weights, grams)
    return _solve(w, g, density, budget, names, opts)


def _solve(w: Tensor, g: Tensor | None, density: float, budget: int, names: str | Sequence[str | None] | None,
           o: DSFOptions) -> list[Factorization]:
    """The factorization of checked working copies ``w`` ``(out, fan_in)`` / ``g`` ``(fan_in, fan_in)``, or of a
    batch ``(B, out, fan_in)`` / ``(B, fan_in, fan_in)`` with ``B`` names: one :class:`Factorization` per matrix."""
    name = where_names(names)
    out, fan_in = w.shape[-2:]
    scaling = (o.preset == "llm") if o.input_norm_scaling is None else o.input_norm_scaling
    finalize = (("first", "second") if o.finalize is None else o.finalize) if g is not None else ()
    square_share = "auto" if o.square_share is None else o.square_share
    square_nnz = square_factor_nnz(square_share, density, out, fan_in, name)
    other_nnz = budget - square_nnz

    norm = (diagonals(g).clamp_min(0).sqrt() + EPS) if (scaling and g is not None) else None
    w_scaled = w if norm is None else w * norm[..., None, :]

    transposed = out > fan_in
    r = min(out, fan_in)
    sq_mask = None
    if o.fixed_mask:  # shared in the layer's own orientation: the mask of second, or of first when transposed
        sq_mask = random_square_mask(r, square_nnz, o.seed, w.device)
        sq_mask = (sq_mask.T if transposed else sq_mask).expand(*w.shape[:-2], r, r).contiguous()
    sq, other, mask_sq, mask_other = _alternate(
        w_scaled.mT if transposed else w_scaled, square_nnz, other_nnz, sq_mask,
        outer_iters=o.outer_iters, inner_iters=o.inner_iters, mask_iters=o.mask_iters, damping=o.damping)
    if transposed:
        second, first, second_mask, first_mask = other.mT, sq.mT, mask_other.mT, mask_sq.mT
    else:
        second, first, second_mask, first_mask = sq, other, mask_sq, mask_other
    if norm is not None:
        first = first / norm[..., None, :]

    for _ in range(o.finalize_rounds):
        if "first" in finalize:
            first = finalize_first(w, g, first, second, first_mask, iters=o.finalize_iters, damping=o.finalize_damping)
        if "second" in finalize:
            second = finalize_second(w, g, first, second, second_mask, iters=o.finalize_iters,
                                     damping=o.finalize_damping)

    info = dict(square_nnz=square_nnz, other_nnz=other_nnz, budget=budget, transposed=transposed,
                square_share=square_share if isinstance(square_share, str) else float(square_share),
                square_fraction=square_nnz / budget, square_density=square_nnz / (r * r),
                input_norm_scaling=norm is not None, finalize=finalize, fixed_mask=o.fixed_mask)
    if w.dim() == 2:
        return [scored_factorization("dsf", w, g, first, first_mask, second, second_mask, **info)]
    return [scored_factorization("dsf", w[i], None if g is None else g[i], first[i].clone(), first_mask[i].clone(),
                                 second[i].clone(), second_mask[i].clone(), **info) for i in range(w.shape[0])]
