"""What a prune did: one :class:`LayerRecord` per pruned layer and the :class:`PruneReport` over them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerRecord", "PruneReport"]


@dataclass
class LayerRecord:
    """One pruned layer. ``shape`` is ``(out, fan_in)``; errors are layer-wise
    ``tr((W - P) G (W - P)^T)`` (``||W - P||_F^2`` without calibration); ``error_vs_magnitude`` is
    ``error`` over magnitude pruning's error at the same density (< 1: better than magnitude).
    ``first_nnz`` / ``second_nnz`` split ``nnz`` between the factors (``second_nnz`` is ``None`` for
    single-mask methods); ``rank`` is the process that factorized the layer under DDP."""

    name: str
    layer_type: str
    shape: tuple[int, int]
    method: str
    density: float
    nnz: int
    budget: int
    error: float
    relative_error: float
    magnitude_relative_error: float
    error_vs_magnitude: float
    seconds: float
    pruned_type: str
    first_nnz: int = 0
    second_nnz: int | None = None
    rank: int | None = None


@dataclass
class PruneReport:
    """What a prune did: per-layer records, skipped layers with reasons, calibration token counts, totals."""

    method: str
    family: str
    density: float
    layers: list[LayerRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    calibration_tokens: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    #: the sequential pipeline's largest working set (activations, one block's Grams and jobs), bytes
    working_set_bytes: int | None = None
    #: nonzeros and dense elements of the model's other weights of 2+ dims (those left dense count whole)
    outside_nnz: int = 0
    outside_numel: int = 0

    @property
    def nnz(self) -> int:
        return sum(r.nnz for r in self.layers)

    @property
    def budget(self) -> int:
        return sum(r.budget for r in self.layers)

    @property
    def dense_numel(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    @property
    def model_density(self) -> float:
        """Nonzeros over elements of all the model's weights of 2+ dims: the pruned layers, and every other
        weight (``skipped`` says why each was left dense)."""
        total = self.dense_numel + self.outside_numel
        return (self.nnz + self.outside_nnz) / total if total else 0.0

    def totals(self) -> dict[str, float | int]:
        """Numbers for ``logger.log_metrics``: layer counts, nnz, budget, achieved density over the pruned
        layers and over all weight matrices (``model_density``), mean relative error and mean error ratio
        to magnitude, seconds."""
        finite = lambda xs: [x for x in xs if math.isfinite(x)]  # noqa: E731
        rel = finite([r.relative_error for r in self.layers])
        ratio = finite([r.error_vs_magnitude for r in self.layers])
        return {
            "density": self.density, "layers": len(self.layers), "skipped": len(self.skipped),
            "nnz": self.nnz, "budget": self.budget,
            "dense_numel": self.dense_numel,
            "achieved_density": self.nnz / self.dense_numel if self.dense_numel else 0.0,
            "model_density": self.model_density,
            "mean_relative_error": sum(rel) / len(rel) if rel else math.nan,
            "mean_error_vs_magnitude": sum(ratio) / len(ratio) if ratio else math.nan,
            "seconds": self.seconds,
            **({"working_set_bytes": self.working_set_bytes} if self.working_set_bytes is not None else {}),
        }

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat dict per layer, e.g. for a W&B table: the record with ``shape`` split into
        ``out``/``fan_in`` and the achieved densities of the layer and of each factor."""
        rows = []
        for r in self.layers:
            d = asdict(r)
            out, fan_in = d.pop("shape")
            d.pop("rank")
            second = r.second_nnz
            rank = min(out, fan_in)
            rows.append({
                "name": d.pop("name"), "out": out, "fan_in": fan_in, **d,
                "achieved_density": r.nnz / (out * fan_in),
                "first_density": r.first_nnz / (rank * fan_in if second is not None else out * fan_in),
                "second_density": None if second is None else second / (out * rank),
                **({"owner_rank": r.rank} if r.rank is not None else {}),
            })
        return rows
