"""The method registry: DSF and its baselines as pure tensor math, with what each needs.

Every method shares one signature, ``fn(weight (out, fan_in), density, gram=None, **options)``,
and returns a :class:`Factorization`; :data:`METHODS` adds the facts a caller checks before any
work (needs a Gram, two factors or one, the per-layer budget rule, valid options) and, where the
method has one, a batch function for layers of one shape, so callers switch methods by name with
:func:`factorize` / :func:`factorize_batch`. No Lightning, no module surgery here.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dsf_lightning.factorization.admm import EPS, ADMMSolution, admm_masked_lstsq, cubic_sparsity, topk_mask
from dsf_lightning.factorization.baselines import (
    ADMM_DAMPING,
    ADMM_ITERS,
    ADMM_MASK_ITERS,
    admm_prune,
    check_admm_options,
    low_rank_svd,
    magnitude_prune,
    svd_rank,
    wanda_prune,
)
from dsf_lightning.factorization.dsf import (
    PRESETS,
    SPLIT_RULES,
    VISION_SQUARE_FRACTION,
    DSFOptions,
    auto_square_fraction,
    double_sparse_factorize,
    double_sparse_factorize_batch,
    finalize_first,
    finalize_second,
    rho0_schedule,
    square_factor_nnz,
    sylvester_solve,
)
from dsf_lightning.factorization.problem import (
    Factorization,
    check_budget,
    check_density,
    nnz_budget,
    reconstruction_error,
    row_budget,
    validate_problem,
)
from dsf_lightning.factorization.sparsegpt import BLOCKSIZE, PERCDAMP, check_sparsegpt, sparsegpt_prune

#: Keyword arguments every method receives from the caller, never as options.
RESERVED_OPTIONS = frozenset({"weight", "density", "gram", "name"})


@dataclass(frozen=True)
class Method:
    """A registered method and the facts callers need before running it.

    Attributes:
        name: registry name.
        fn: ``fn(weight, density, gram=None, *, name=None, **options) -> Factorization``.
        needs_gram: cannot run without calibration Grams (data-free projection is impossible).
        two_factor: returns ``first`` and ``second`` (built into DSF modules) rather than one
            masked weight.
        budget_rule: ``rule(out, fan_in, density, options, name)`` raising ``ValueError`` when the
            method cannot spend ``density`` on an ``(out, fan_in)`` layer; the same helpers the method
            itself calls, run by planners for every layer before the first one is solved.
        batch_fn: ``batch_fn(weights (B, out, fan_in), density, grams (B, fan_in, fan_in) | None, *,
            names=None, **options) -> list[Factorization]``: ``fn`` of ``B`` layers of one shape, density
            and options in one call (the same results as ``B`` calls of ``fn``, up to float rounding), or
            ``None`` where the method has none (callers then call ``fn`` per layer).
        options: the dataclass of the method's options, whose ``of(options)`` checks every value (DSF:
            :class:`DSFOptions`), or ``None``: the options are ``fn``'s keyword-only parameters.
    """

    name: str
    fn: Callable[..., Factorization]
    needs_gram: bool
    two_factor: bool
    budget_rule: Callable[[int, int, float, Mapping[str, Any], str | None], None]
    batch_fn: Callable[..., list[Factorization]] | None = None
    options: type | None = None

    def option_names(self) -> list[str]:
        """The keyword options ``fn`` accepts besides the reserved ones."""
        if self.options is not None:
            return sorted(f.name for f in dataclasses.fields(self.options))
        params = inspect.signature(self.fn).parameters
        return sorted(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "name")

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Unknown or reserved option names, and bad values of a method with an options dataclass, fail now, not
        after calibration and half the layers."""
        reserved = sorted(RESERVED_OPTIONS & set(options))
        if reserved:
            raise ValueError(f"method options may not set {reserved}: they are passed per layer")
        unknown = sorted(set(options) - set(self.option_names()))
        if unknown:
            raise ValueError(f"method {self.name!r} has no option(s) {unknown}; valid options: {self.option_names()}")
        if self.options is not None:  # every value too
            self.options.of(options)

    def check_layer(self, out: int, fan_in: int, density: float, options: Mapping[str, Any],
                    name: str | None = None) -> None:
        """Every budget check the method makes on an ``(out, fan_in)`` layer at ``density``."""
        check_budget(out, fan_in, density, name)
        self.budget_rule(out, fan_in, density, options, name)


def _no_rule(out: int, fan_in: int, density: float, options: Mapping[str, Any], name: str | None) -> None:
    """Whole-matrix budget only (checked by :meth:`Method.check_layer` itself)."""


def _per_row(out: int, fan_in: int, density: float, options: Mapping[str, Any], name: str | None) -> None:
    row_budget(density, fan_in, name)


def _admm(out: int, fan_in: int, density: float, options: Mapping[str, Any], name: str | None) -> None:
    check_admm_options(options.get("iters", ADMM_ITERS), options.get("mask_iters", ADMM_MASK_ITERS),
                       options.get("damping", ADMM_DAMPING), name)
    if options.get("per_row", False):
        row_budget(density, fan_in, name)


def _sparsegpt(out: int, fan_in: int, density: float, options: Mapping[str, Any], name: str | None) -> None:
    check_sparsegpt(out, fan_in, density, options.get("blocksize", BLOCKSIZE), options.get("percdamp", PERCDAMP), name)


def _low_rank(out: int, fan_in: int, density: float, options: Mapping[str, Any], name: str | None) -> None:
    svd_rank(nnz_budget(density, out * fan_in), out, fan_in, name)


def _dsf_split(out: int, fan_in: int, density: float, options: Mapping[str, Any], name: str | None) -> None:
    share = options.get("square_share")
    square_factor_nnz("auto" if share is None else share, density, out, fan_in, name)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dsf", double_sparse_factorize, needs_gram=False, two_factor=True, budget_rule=_dsf_split,
               batch_fn=double_sparse_factorize_batch, options=DSFOptions),
        Method("magnitude", magnitude_prune, needs_gram=False, two_factor=False, budget_rule=_no_rule),
        Method("wanda", wanda_prune, needs_gram=True, two_factor=False, budget_rule=_per_row),
        Method("admm", admm_prune, needs_gram=False, two_factor=False, budget_rule=_admm),
        Method("sparsegpt", sparsegpt_prune, needs_gram=True, two_factor=False, budget_rule=_sparsegpt),
        Method("svd", low_rank_svd, needs_gram=False, two_factor=True, budget_rule=_low_rank),
    )
}


def get_method(method: str) -> Method:
    """The registered :class:`Method` named ``method``, else ``ValueError`` listing the valid names."""
    try:
        return METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {method!r}; valid methods: {sorted(METHODS)}") from None


def factorize(method: str, weight: Tensor, density: float, gram: Tensor | None = None,
              **options: Any) -> Factorization:
    """Run the method registered as ``method`` in :data:`METHODS` on one weight matrix."""
    return get_method(method).fn(weight, density, gram, **options)


def factorize_batch(method: str, weights: Tensor, density: float, grams: Tensor | None = None, *,
                    names: Sequence[str | None] | None = None, **options: Any) -> list[Factorization]:
    """Run ``method`` on ``B`` layers of one shape: ``weights`` ``(B, out, fan_in)``, ``grams``
    ``(B, fan_in, fan_in)`` or ``None``; its ``batch_fn`` where it has one, else ``fn`` layer by layer."""
    m = get_method(method)
    if m.batch_fn is not None:
        return m.batch_fn(weights, density, grams, names=names, **options)
    names = [None] * len(weights) if names is None else names
    return [m.fn(w, density, None if grams is None else grams[i], name=names[i], **options)
            for i, w in enumerate(weights)]


__all__ = [
    "EPS",
    "METHODS",
    "PRESETS",
    "RESERVED_OPTIONS",
    "SPLIT_RULES",
    "VISION_SQUARE_FRACTION",
    "ADMMSolution",
    "DSFOptions",
    "Factorization",
    "Method",
    "admm_masked_lstsq",
    "admm_prune",
    "auto_square_fraction",
    "check_budget",
    "check_density",
    "cubic_sparsity",
    "double_sparse_factorize",
    "double_sparse_factorize_batch",
    "factorize",
    "factorize_batch",
    "finalize_first",
    "finalize_second",
    "get_method",
    "low_rank_svd",
    "magnitude_prune",
    "nnz_budget",
    "reconstruction_error",
    "rho0_schedule",
    "row_budget",
    "sparsegpt_prune",
    "square_factor_nnz",
    "svd_rank",
    "sylvester_solve",
    "topk_mask",
    "validate_problem",
    "wanda_prune",
]
