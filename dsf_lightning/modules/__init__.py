"""Masked pruned layers that fine-tune without leaving their sparsity pattern.

* :class:`DSFLinear`, :class:`DSFConv2d` (:mod:`~dsf_lightning.modules.dsf`): two masked factors,
  ``W ~= second @ first``, for two-factor methods (DSF, SVD).
* :class:`SparseLinear`, :class:`SparseConv2d` (:mod:`~dsf_lightning.modules.sparse`): one masked
  weight, for single-mask methods (magnitude, Wanda, ADMM pruning).

The structure of a pruned layer (class and shapes) depends only on the dense layer and on whether
the method has two factors (a two-factor layer's rank is always ``min(out, fan_in)``), so it can be
built before any factorization (:func:`pruned_module`) and filled in place later.
"""

from __future__ import annotations

import torch
from torch import nn

from dsf_lightning.factorization import Factorization
from dsf_lightning.layers import layer_kind, weight_matrix
from dsf_lightning.modules.base import ConvGeometry, MaskedLayer
from dsf_lightning.modules.dsf import (
    FORWARD_MODES,
    DSFConv2d,
    DSFLinear,
    ForwardMode,
    check_forward_mode,
    choose_forward_path,
)
from dsf_lightning.modules.sparse import SparseConv2d, SparseLinear
from dsf_lightning.modules.storage import STORAGES, Storage, check_storage

__all__ = [
    "FORWARD_MODES",
    "PRUNED_MODULE_TYPES",
    "STORAGES",
    "ConvGeometry",
    "DSFConv2d",
    "DSFLinear",
    "ForwardMode",
    "MaskedLayer",
    "SparseConv2d",
    "SparseLinear",
    "Storage",
    "check_forward_mode",
    "check_storage",
    "choose_forward_path",
    "is_pruned_module",
    "pruned_module",
    "pruned_module_class",
    "pruned_module_from_factorization",
    "set_storage",
]

PRUNED_MODULE_TYPES: tuple[type[MaskedLayer], ...] = (DSFLinear, DSFConv2d, SparseLinear, SparseConv2d)


def is_pruned_module(m: nn.Module) -> bool:
    """Whether ``m`` is one of the masked pruned layers."""
    return isinstance(m, MaskedLayer)


def pruned_module_class(layer: nn.Module, two_factor: bool) -> type[MaskedLayer]:
    """The pruned class replacing the dense ``layer``: DSF* for two factors, Sparse* for one; Conv2d or
    Linear by the layer's kind (HF ``Conv1D`` counts as Linear)."""
    kind = layer_kind(layer)
    if kind is None:
        raise ValueError(f"{type(layer).__name__} is not a prunable layer")
    if kind == "conv2d":
        return DSFConv2d if two_factor else SparseConv2d
    return DSFLinear if two_factor else SparseLinear


def _dense_equivalent(w: torch.Tensor, two_factor: bool) -> Factorization:
    """``w`` as a factorization with full masks: one factor ``w``, or ``I @ w`` / ``w @ I`` with the
    identity as the square factor. Its product is ``w`` bit for bit (``1 * w + 0 + ...`` is exact)."""
    ones = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
    if not two_factor:
        return Factorization(w, None, ones(w), None, method="dense")
    out, fan_in = w.shape
    eye = torch.eye(min(out, fan_in), dtype=w.dtype, device=w.device)
    second, first = (eye, w) if out <= fan_in else (w, eye)
    return Factorization(first, second, ones(first), ones(second), method="dense")


@torch.no_grad()
def pruned_module(layer: nn.Module, two_factor: bool, fact: Factorization | None = None, *,
                  forward_mode: ForwardMode = "auto", storage: Storage = "masked") -> MaskedLayer:
    """The pruned replacement of the dense ``layer`` (same dtype, device, bias and training flags).

    With ``fact`` it holds that factorization of ``layer``'s ``(out, fan_in)`` matrix; without, it holds
    ``layer``'s own weight with full masks and computes exactly ``layer``'s function until a
    factorization is loaded into it (:meth:`MaskedLayer.load_factorization_`). ``forward_mode`` applies
    to two-factor layers; ``storage`` is how the factors are held. The global RNG state is left as it was.
    """
    cls = pruned_module_class(layer, two_factor)
    device = layer.weight.device
    # the constructor's random init is overwritten at once: it must not move the caller's RNG streams
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        new = cls.like(layer, forward_mode=forward_mode) if two_factor else cls.like(layer)
    new.load_factorization_(fact if fact is not None else _dense_equivalent(weight_matrix(layer), two_factor))
    new.set_storage_(storage)
    new.train(layer.training)
    new.requires_grad_(layer.weight.requires_grad)  # a frozen model stays frozen
    return new


def pruned_module_from_factorization(layer: nn.Module, fact: Factorization, *, forward_mode: ForwardMode = "auto",
                                     storage: Storage = "masked") -> MaskedLayer:
    """The pruned replacement of ``layer`` holding ``fact`` (two factors or one, by ``fact.second``)."""
    return pruned_module(layer, fact.second is not None, fact, forward_mode=forward_mode, storage=storage)


def set_storage(model: nn.Module, storage: Storage) -> nn.Module:
    """Every pruned module of ``model`` in ``storage`` (:meth:`MaskedLayer.set_storage_`, in place; the
    same function, values and masks). Build the optimizer after: the parameters are new. Returns ``model``."""
    check_storage(storage)
    for m in model.modules():
        if is_pruned_module(m):
            m.set_storage_(storage)
    return model
