"""Single-mask pruned layers (magnitude, Wanda, ADMM pruning): :class:`SparseLinear`, :class:`SparseConv2d`."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsf_lightning.factorization import Factorization
from dsf_lightning.modules.base import (
    ConvGeometry,
    IntPair,
    MaskedLayer,
    dense_linear,
    init_bias_,
    init_masked_,
    linear_weight,
)
from dsf_lightning.modules.storage import Storage

__all__ = ["SparseConv2d", "SparseLinear"]


class _SingleMask(MaskedLayer):
    factor_names = ("weight",)

    def _init_weight(self, shape: tuple[int, ...], bias: bool, storage: Storage, device: Any, dtype: Any) -> None:
        self._init_masked((shape,), device, dtype)
        self.bias = nn.Parameter(torch.empty(shape[0], device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self.set_storage_(storage)

    def reset_parameters(self) -> None:
        """nn.Linear/nn.Conv2d's init, zero outside the mask; for empty modules."""
        storage = self.storage
        self.set_storage_("masked")
        init_masked_(self.weight)
        init_bias_(self.bias, self.fan_in)
        self.apply_masks_().set_storage_(storage)

    def merged_weight(self) -> Tensor:
        """Detached dense weight in the original layer's shape (zero outside the mask)."""
        return self.factor("weight").detach()

    def extra_repr(self) -> str:
        return (f"{self._shape_repr()}, bias={self.bias is not None}, density={self.density:.4f}, "
                f"storage={self.storage}")


class SparseLinear(_SingleMask):
    """``y = x (weight * weight_mask)^T + b``: a single-mask pruned ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, storage: Storage = "masked",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_weight((out_features, in_features), bias, storage, device, dtype)

    @classmethod
    def like(cls, layer: nn.Module) -> SparseLinear:
        """An empty module of an ``nn.Linear``'s (or HF ``Conv1D``'s) shape, dtype and device, with its bias."""
        w = linear_weight(layer, cls.__name__)
        out, in_ = w.shape
        m = cls(in_, out, bias=layer.bias is not None, device=w.device, dtype=w.dtype)
        m._copy_bias(layer.bias)
        return m

    @classmethod
    def from_factorization(cls, layer: nn.Module, fact: Factorization) -> SparseLinear:
        """:meth:`like` ``layer``, holding the single-mask ``fact`` (``first`` the pruned ``(out, in)``
        weight, ``second is None``)."""
        return cls.like(layer).load_factorization_(fact)

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        return F.linear(x, self.factor("weight"), self.bias)

    def dense_weight(self) -> Tensor:
        """``(out, in)`` masked weight, differentiable in the parameter: for code that reads a weight."""
        return self.factor("weight")

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the masked weight (same dtype/device, bias copied)."""
        return dense_linear(self.merged_weight(), self.bias).train(self.training)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs rebuilding this (empty) module."""
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None,
                    storage=self.storage)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class SparseConv2d(ConvGeometry, _SingleMask):
    """``nn.Conv2d`` (``groups == 1``) with a masked ``weight`` ``(out, in, kh, kw)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, stride: IntPair = 1,
                 padding: IntPair | str = 0, dilation: IntPair = 1, padding_mode: str = "zeros",
                 bias: bool = True, *, storage: Storage = "masked", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._init_geometry(kernel_size, stride, padding, dilation, padding_mode)
        self.in_channels, self.out_channels = in_channels, out_channels
        self._init_weight((out_channels, in_channels, *self.kernel_size), bias, storage, device, dtype)

    @classmethod
    def like(cls, layer: nn.Module) -> SparseConv2d:
        """An empty module of an ``nn.Conv2d``'s shape, geometry, dtype and device, with its bias."""
        conv = cls._check_conv(cls.__name__, layer)
        w = conv.weight
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.padding_mode, conv.bias is not None, device=w.device, dtype=w.dtype)
        m._copy_bias(conv.bias)
        return m

    @classmethod
    def from_factorization(cls, layer: nn.Module, fact: Factorization) -> SparseConv2d:
        """:meth:`like` ``layer``, holding the single-mask ``fact`` of ``layer.weight.flatten(1)``."""
        return cls.like(layer).load_factorization_(fact)

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, in, H, W) -> (N, out, H_out, W_out)``."""
        return self._conv(x, self.factor("weight"), self.bias)

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the masked weight (same dtype/device, bias copied)."""
        return self._dense_conv(self.merged_weight(), self.bias).train(self.training)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs rebuilding this (empty) module."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, bias=self.bias is not None,
                    storage=self.storage, **self.geometry())
