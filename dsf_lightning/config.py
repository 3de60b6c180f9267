"""``PruneConfig``: one validated description of a prune, shared by ``prune()``, the callback and the recipes.

It holds everything that does not depend on the model (density, method and its options, target
patterns, calibration, module options) and checks all of it once, in ``__post_init__``; the checks
that need the model (targets, per-layer budgets) run in :func:`dsf_lightning.pipeline.plan.plan_prune`
before any data is touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from dsf_lightning.factorization import check_density, get_method
from dsf_lightning.modules import ForwardMode, Storage, check_forward_mode, check_storage
from dsf_lightning.pipeline.allocation import Allocation, check_allocation_options
from dsf_lightning.pipeline.targets import FAMILIES, Family, as_patterns

__all__ = ["PruneConfig", "check_count"]


def check_count(value: Any, what: str, *, allow_none: bool = False) -> int | None:
    """``value`` if it is an int >= 0 (or ``None`` when allowed), else ``ValueError`` naming ``what``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an int >= 0{' or None' if allow_none else ''}, got {value!r}")
    return value


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how; validated on construction (``ValueError`` naming the field).

    Args:
        density: kept fraction in ``(0, 1]`` of every target layer (both DSF factors together).
        method: a :data:`~dsf_lightning.factorization.METHODS` name: ``"dsf"``, ``"magnitude"``,
            ``"wanda"`` and ``"sparsegpt"`` (need calibration), ``"admm"``, ``"svd"``.
        factorization_options: keyword options of the method (e.g. ``{"outer_iters": 10}``).
        densities: per-layer density overrides ``{layer name: density}``; they keep their density under
            any ``allocation``, which spreads the rest of the budget.
        allocation: how ``density`` is spread over the layers (:mod:`~dsf_lightning.pipeline.allocation`):
            ``"uniform"`` (every layer at ``density``), ``"global"`` (equal marginal error per nonzero, the
            budget ``density * sum(out * fan_in)`` over the model) or ``"owl"`` (outlier-weighted).
        allocation_options: the rule's options (``min_ratio``, ``max_ratio``; ``owl``: ``lam``, ``m``).
        include, exclude: target patterns (regex fullmatch or glob on module names); ``include``
            replaces the family's default targets, ``exclude`` removes matches.
        family: ``"vision"`` or ``"llm"``: the default targets and DSF's default preset; ``None``
            detects it from the model.
        calibration_batches: ``0``: data-free projection (``G = I``); ``N > 0``: layer-wise with input
            Grams over ``N`` batches; ``None``: every batch of the calibration data given.
        sequential: calibrate decoder blocks one after the other, each on the outputs of the pruned
            blocks before it (:mod:`~dsf_lightning.pipeline.blocks`; LLMs), instead of all targets in one pass
            of the dense model. Needs calibration data.
        forward_mode: of the DSF modules: ``"auto"``, ``"fused"`` or ``"two_step"`` (the old name
            ``"sequential"`` is read as ``"two_step"``).
        balance_norms: balance the two factors' norms per rank channel after pruning (paper 4.4).
        storage: how the pruned modules hold their factors (:mod:`~dsf_lightning.modules.storage`):
            ``"masked"`` (full-size parameters times bool masks) or ``"compressed"`` (the nonzeros as
            the parameters, the masks as bits: training state scales with the nonzeros).
        seed: seeds the RNG while calibrating and factorizing, and is DSF's ``seed`` option (of the
            fixed mask) unless ``factorization_options`` sets it.
    """

    density: float
    method: str = "dsf"
    factorization_options: Mapping[str, Any] = field(default_factory=dict)
    densities: Mapping[str, float] = field(default_factory=dict)
    allocation: Allocation = "uniform"
    allocation_options: Mapping[str, float] = field(default_factory=dict)
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    family: Family | None = None
    calibration_batches: int | None = 0
    sequential: bool = False
    forward_mode: ForwardMode = "auto"
    balance_norms: bool = True
    storage: Storage = "compressed"
    seed: int = 0

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        put("density", check_density(self.density, "density"))
        method = get_method(self.method)
        opts = dict(self.factorization_options or {})
        try:
            method.check_options(opts)
        except (TypeError, ValueError) as e:
            raise ValueError(f"factorization_options: {e}") from None
        put("factorization_options", opts)
        put("densities", {str(n): check_density(d, f"densities[{n!r}]") for n, d in dict(self.densities or {}).items()})
        put("allocation_options", check_allocation_options(self.allocation, dict(self.allocation_options or {})))
        put("include", as_patterns(self.include, "include"))
        put("exclude", as_patterns(self.exclude, "exclude") or ())
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES} or None (detect), got {self.family!r}")
        put("calibration_batches", check_count(self.calibration_batches, "calibration_batches", allow_none=True))
        if method.needs_gram and self.calibration_batches == 0:
            raise ValueError(f"method {self.method!r} needs calibration data: set calibration_batches > 0 "
                             f"(or None to use every batch given)")
        if self.sequential and not self.calibrated:
            raise ValueError("sequential=True prunes layer-wise block by block: set calibration_batches > 0 (or None)")
        put("forward_mode", check_forward_mode(self.forward_mode))
        if not isinstance(self.balance_norms, bool):
            raise ValueError(f"balance_norms must be a bool, got {self.balance_norms!r}")
        check_storage(self.storage)
        check_count(self.seed, "seed")

    @property
    def calibrated(self) -> bool:
        """Whether the prune is layer-wise (input Grams) rather than a data-free projection."""
        return self.calibration_batches != 0

    @property
    def two_factor(self) -> bool:
        """Whether the method builds two-factor (DSF) modules."""
        return get_method(self.method).two_factor

    def method_options(self, family: Family) -> dict[str, Any]:
        """The method's options for a model of ``family``: DSF's ``preset`` defaults to the family and
        its ``seed`` to :attr:`seed`."""
        opts = dict(self.factorization_options)
        if self.method == "dsf":
            opts.setdefault("preset", family)
            opts.setdefault("seed", self.seed)
        return opts

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for logger configs and YAML)."""
        d = asdict(self)
        for k in ("include", "exclude"):
            d[k] = None if d[k] is None else list(d[k])
        return d
