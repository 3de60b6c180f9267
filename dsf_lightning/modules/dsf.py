"""The masked two-factor layers ``W ~= second @ first``: :class:`DSFLinear` and :class:`DSFConv2d`.

* :class:`DSFLinear`: ``y = x F^T S^T + b`` with ``first`` ``F`` ``(rank, in)``, ``second`` ``S``
  ``(out, rank)``.
* :class:`DSFConv2d`: ``first`` is a ``kh x kw`` conv ``in -> rank`` with the original stride,
  padding, dilation and padding mode; ``second`` is a 1x1 conv ``rank -> out`` carrying the bias.

They run in one of two equivalent ways: *fused* forms ``W = S F`` once and runs one dense op;
*two-step* runs the two factors as two ops. ``forward_mode="auto"`` picks the one with fewer
multiplies (:func:`choose_forward_path`).
"""

from __future__ import annotations

from typing import Any, Literal

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

__all__ = ["FORWARD_MODES", "DSFConv2d", "DSFLinear", "ForwardMode", "check_forward_mode", "choose_forward_path"]

ForwardMode = Literal["auto", "fused", "two_step"]
ForwardPath = Literal["fused", "two_step"]
FORWARD_MODES: tuple[ForwardMode, ...] = ("auto", "fused", "two_step")
#: Names saved files may still hold (structure specs and configs written before the rename).
FORWARD_MODE_ALIASES = {"sequential": "two_step"}


def check_forward_mode(mode: Any) -> ForwardMode:
    """``mode`` if it is one of :data:`FORWARD_MODES` (an old name is translated), else ``ValueError``."""
    mode = FORWARD_MODE_ALIASES.get(mode, mode) if isinstance(mode, str) else mode
    if mode not in FORWARD_MODES:
        raise ValueError(f"forward_mode must be one of {FORWARD_MODES}, got {mode!r}")
    return mode


def choose_forward_path(out: int, rank: int, fan_in: int, tokens: int) -> ForwardPath:
    """The DSF forward with fewer multiplies for ``tokens`` input positions.

    fused: ``out*r*fan_in`` (form ``S F``) ``+ T*out*fan_in``; two-step: ``T*(r*fan_in + out*r)``.
    Ties go to two-step, which never materializes the dense weight.
    """
    fused = out * rank * fan_in + tokens * out * fan_in
    two_step = tokens * (rank * fan_in + out * rank)
    return "fused" if fused < two_step else "two_step"


class _TwoFactor(MaskedLayer):
    """Two masked factors ``first`` / ``second``, forward-path choice and norm balancing."""

    factor_names = ("first", "second")
    rank: int

    def _init_factors(self, first_shape: tuple[int, ...], second_shape: tuple[int, ...], bias: int | None,
                      forward_mode: ForwardMode, storage: Storage, device: Any, dtype: Any) -> None:
        self._init_masked((first_shape, second_shape), device, dtype)
        self.bias = nn.Parameter(torch.empty(bias, device=device, dtype=dtype)) if bias is not None else None
        self.forward_mode = forward_mode
        self.reset_parameters()
        self.set_storage_(storage)

    def reset_parameters(self) -> None:
        """Random factors (nn.Linear's init per factor), zero outside the masks; for empty modules."""
        storage = self.storage
        self.set_storage_("masked")
        init_masked_(self.first)
        init_masked_(self.second)
        init_bias_(self.bias, self.fan_in)
        self.apply_masks_().set_storage_(storage)

    @property
    def forward_mode(self) -> ForwardMode:
        """``"auto"`` (fewer multiplies, per call), ``"fused"`` or ``"two_step"``."""
        return self._forward_mode

    @forward_mode.setter
    def forward_mode(self, mode: ForwardMode) -> None:
        self._forward_mode = check_forward_mode(mode)

    def _product(self) -> Tensor:
        """``(out, fan_in)`` ``S F`` of the masked factors, differentiable."""
        return self.factor("second").flatten(1) @ self.factor("first").flatten(1)

    def _tokens(self, x: Tensor) -> int:
        raise NotImplementedError

    def forward_path(self, x: Tensor) -> ForwardPath:
        """The path :meth:`forward` takes for input ``x`` under the current ``forward_mode``."""
        if self._forward_mode != "auto":
            return self._forward_mode
        return choose_forward_path(self.out_dim, self.rank, self.fan_in, self._tokens(x))

    @torch.no_grad()
    def balance_norms_(self) -> _TwoFactor:
        """Rescale each rank channel ``i``: ``F_i *= d_i``, ``S_:i /= d_i`` with
        ``d_i = sqrt(||S_:i|| / ||F_i||)``, so both carry ``sqrt(||S_:i|| ||F_i||)``; ``S F`` is unchanged.

        Balanced factors take comparable gradient steps in fine-tuning (paper section 4.4).
        Channels with a zero factor are left alone. Do it before creating the optimizer:
        momentum/Adam state is not rescaled.
        """
        f, s = self.factor("first").flatten(1), self.factor("second").flatten(1)
        nf = f.double().norm(dim=1)
        ns = s.double().norm(dim=0)
        ok = (nf > 0) & (ns > 0)
        d = torch.where(ok, (ns / nf.where(ok, 1.0)).sqrt(), 1.0)
        for name, value in (("first", f * d[:, None].to(f.dtype)), ("second", s / d[None, :].to(s.dtype))):
            self.set_factor_(name, value.view(self.factor_shape(name)), self.factor_mask(name))
        return self

    def extra_repr(self) -> str:
        return (f"{self._shape_repr()}, rank={self.rank}, bias={self.bias is not None}, "
                f"density={self.density:.4f}, forward_mode={self._forward_mode}, storage={self.storage}")


class DSFLinear(_TwoFactor):
    """``y = x (S F)^T + b`` with masked ``first`` ``F`` ``(rank, in)`` and ``second`` ``S`` ``(out, rank)``.

    Args:
        in_features, out_features, rank: shapes; masks start all-True (an empty module to load
            a pruned checkpoint into). Build a pruned one with :meth:`from_factorization`.
        bias: learnable ``(out,)`` bias, added after ``S``.
        forward_mode: ``"auto"``, ``"fused"`` or ``"two_step"`` (settable attribute; the old name
            ``"sequential"`` is read as ``"two_step"``).
        storage: ``"masked"`` or ``"compressed"`` (:mod:`~dsf_lightning.modules.storage`).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 forward_mode: ForwardMode = "auto", storage: Storage = "masked",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self._init_factors((rank, in_features), (out_features, rank), out_features if bias else None,
                           forward_mode, storage, device, dtype)

    @classmethod
    def like(cls, layer: nn.Module, *, forward_mode: ForwardMode = "auto") -> DSFLinear:
        """An empty module of ``layer``'s shape (``rank = min(out, in)``), dtype and device, with its bias.

        ``layer`` is an ``nn.Linear`` or HF ``Conv1D`` (weight ``(in, out)``, treated as the linear map
        with weight ``weight.T``; :meth:`to_dense` then returns the equivalent ``nn.Linear``)."""
        w = linear_weight(layer, cls.__name__)
        out, in_ = w.shape
        m = cls(in_, out, min(out, in_), bias=layer.bias is not None, forward_mode=forward_mode, device=w.device,
                dtype=w.dtype)
        m._copy_bias(layer.bias)
        return m

    @classmethod
    def from_factorization(cls, layer: nn.Module, fact: Factorization, *,
                           forward_mode: ForwardMode = "auto") -> DSFLinear:
        """:meth:`like` ``layer``, holding ``fact`` (``first (k, in)``, ``second (out, k)``, ``k <= rank``)."""
        return cls.like(layer, forward_mode=forward_mode).load_factorization_(fact)

    def _tokens(self, x: Tensor) -> int:
        return x.numel() // self.in_features if self.in_features else 0

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        if self.forward_path(x) == "fused":
            return F.linear(x, self._product(), self.bias)
        return F.linear(F.linear(x, self.factor("first")), self.factor("second"), self.bias)

    def merged_weight(self) -> Tensor:
        """Detached ``(out, in)`` dense weight ``S F``."""
        return self._product().detach()

    def dense_weight(self) -> Tensor:
        """``(out, in)`` dense weight ``S F``, differentiable in the factors: for code that reads a weight."""
        return self._product()

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (same dtype/device, bias copied)."""
        return dense_linear(self.merged_weight(), self.bias).train(self.training)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs rebuilding this (empty) module: ``DSFLinear(**m.spec())``."""
        return dict(in_features=self.in_features, out_features=self.out_features, rank=self.rank,
                    bias=self.bias is not None, forward_mode=self._forward_mode, storage=self.storage)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DSFConv2d(ConvGeometry, _TwoFactor):
    """``kh x kw`` conv ``in -> rank`` (``first`` ``(rank, in, kh, kw)``, the original stride, padding,
    dilation, padding mode) followed by a 1x1 conv ``rank -> out`` (``second`` ``(out, rank, 1, 1)``)
    carrying the bias. ``groups`` is always 1.

    As a matrix ``W (out, in*kh*kw) = second.flatten(1) @ first.flatten(1)``, the order of
    ``nn.Conv2d.weight.flatten(1)``. Arguments mirror ``nn.Conv2d``; masks start all-True.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair, rank: int,
                 stride: IntPair = 1, padding: IntPair | str = 0, dilation: IntPair = 1,
                 padding_mode: str = "zeros", bias: bool = True, *, forward_mode: ForwardMode = "auto",
                 storage: Storage = "masked", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._init_geometry(kernel_size, stride, padding, dilation, padding_mode)
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self._init_factors((rank, in_channels, *self.kernel_size), (out_channels, rank, 1, 1),
                           out_channels if bias else None, forward_mode, storage, device, dtype)

    @classmethod
    def like(cls, layer: nn.Module, *, forward_mode: ForwardMode = "auto") -> DSFConv2d:
        """An empty module of the ``nn.Conv2d`` ``layer``'s shape (``rank = min(out, in*kh*kw)``),
        geometry, dtype and device, with its bias."""
        conv = cls._check_conv(cls.__name__, layer)
        w = conv.weight
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, min(w.shape[0], w[0].numel()), conv.stride,
                conv.padding, conv.dilation, conv.padding_mode, conv.bias is not None, forward_mode=forward_mode,
                device=w.device, dtype=w.dtype)
        m._copy_bias(conv.bias)
        return m

    @classmethod
    def from_factorization(cls, layer: nn.Module, fact: Factorization, *,
                           forward_mode: ForwardMode = "auto") -> DSFConv2d:
        """:meth:`like` ``layer``, holding ``fact`` of ``layer.weight.flatten(1)``: ``first (k, in*kh*kw)``
        fills ``(rank, in, kh, kw)``, ``second (out, k)`` ``(out, rank, 1, 1)``, ``k <= rank``."""
        return cls.like(layer, forward_mode=forward_mode).load_factorization_(fact)

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, in, H, W) -> (N, out, H_out, W_out)`` (unbatched ``(in, H, W)`` too)."""
        if self.forward_path(x) == "fused":
            return self._conv(x, self._product().view(self.out_channels, self.in_channels, *self.kernel_size),
                              self.bias)
        return F.conv2d(self._conv(x, self.factor("first"), None), self.factor("second"), self.bias)

    def merged_weight(self) -> Tensor:
        """Detached ``(out, in, kh, kw)`` dense weight."""
        return self._product().detach().view(self.out_channels, self.in_channels, *self.kernel_size)

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing the same function (same dtype/device, bias copied)."""
        return self._dense_conv(self.merged_weight(), self.bias).train(self.training)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs rebuilding this (empty) module: ``DSFConv2d(**m.spec())``."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, rank=self.rank,
                    bias=self.bias is not None, forward_mode=self._forward_mode, storage=self.storage,
                    **self.geometry())
