"""Masked pruned layers that fine-tune without leaving their sparsity pattern.

Orientation (ARCHITECTURE.md): a layer's weight as a matrix is ``W`` ``(out, fan_in)``,
``W ~= S @ F`` with ``F = first`` ``(r, fan_in)`` applied to the input first and
``S = second`` ``(out, r)``.

* :class:`DSFLinear`: ``y = x F^T S^T + b``.
* :class:`DSFConv2d`: ``F`` is a ``kh x kw`` conv ``in -> r`` with the original stride,
  padding, dilation and padding mode; ``S`` is a 1x1 conv ``r -> out`` carrying the bias.
* :class:`SparseLinear`, :class:`SparseConv2d`: one masked weight (magnitude/Wanda/ADMM).

Every forward uses ``param * mask`` (masks are bool buffers, saved in the state dict), so the
function is exactly sparse and the gradient of a masked entry is exactly zero. Entries outside
the masks are zero at construction, and every standard update keeps a zero parameter with zero
gradient at zero (SGD momentum/weight decay, Adam(W), GradScaler), so the stored parameters stay
exactly sparse as well. Call :meth:`apply_masks_` after writing parameters by hand.

DSF layers run in one of two equivalent ways: *fused* forms ``W = S F`` once and runs one dense
op; *sequential* runs the two factors as two ops. ``forward_mode="auto"`` picks the one with
fewer multiplies (:func:`choose_forward_path`).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsf_lightning.factorization.dsf import Factorization

__all__ = [
    "DSFConv2d",
    "DSFLinear",
    "PRUNED_MODULE_TYPES",
    "SparseConv2d",
    "SparseLinear",
    "choose_forward_path",
    "is_pruned_module",
    "pruned_module_from_factorization",
]

ForwardMode = Literal["auto", "fused", "sequential"]
ForwardPath = Literal["fused", "sequential"]
_FORWARD_MODES = ("auto", "fused", "sequential")
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
_IntPair = int | tuple[int, int]


def choose_forward_path(out: int, rank: int, fan_in: int, tokens: int) -> ForwardPath:
    """The DSF forward with fewer multiplies for ``tokens`` input positions.

    fused: ``out*r*fan_in`` (form ``S F``) ``+ T*out*fan_in``; sequential: ``T*(r*fan_in + out*r)``.
    Ties go to sequential, which never materializes the dense weight.
    """
    fused = out * rank * fan_in + tokens * out * fan_in
    sequential = tokens * (rank * fan_in + out * rank)
    return "fused" if fused < sequential else "sequential"


def _hf_conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` if transformers is already imported (never imports it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _linear_weight(layer: nn.Module, cls: str) -> Tensor:
    """``(out, in)`` weight of an ``nn.Linear`` or HF ``Conv1D`` (whose weight is ``(in, out)``)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    conv1d = _hf_conv1d_type()
    if conv1d is not None and isinstance(layer, conv1d):
        return layer.weight.T
    raise ValueError(f"{cls}.from_factorization needs an nn.Linear or transformers Conv1D, "
                     f"got {type(layer).__name__}")


def _check_shape(cls: str, what: str, t: Tensor | None, expected: tuple[int | str, ...]) -> None:
    got = None if t is None else tuple(t.shape)
    ok = got is not None and len(got) == len(expected) and all(
        isinstance(e, str) or g == e for g, e in zip(got, expected))
    if not ok:
        shown = "(" + ", ".join(str(e) for e in expected) + ")"
        raise ValueError(f"{cls}.from_factorization: expected {what} of shape {shown}, got {got}")


def _check_factorization(cls: str, fact: Factorization, out: int, fan_in: int, double: bool) -> int:
    """Validate ``fact`` for an ``(out, fan_in)`` layer; returns the rank (``out`` if single)."""
    if double and fact.second is None:
        raise ValueError(f"{cls}.from_factorization needs a two-factor factorization, got method "
                         f"{fact.method!r} with second=None (use SparseLinear/SparseConv2d)")
    if not double and fact.second is not None:
        raise ValueError(f"{cls}.from_factorization needs a single-sparse factorization (second=None), "
                         f"got method {fact.method!r} with two factors (use DSFLinear/DSFConv2d)")
    if not double:
        _check_shape(cls, "first", fact.first, (out, fan_in))
        _check_shape(cls, "first_mask", fact.first_mask, (out, fan_in))
        return out
    _check_shape(cls, "first", fact.first, ("r", fan_in))
    r = fact.first.shape[0]
    _check_shape(cls, "second", fact.second, (out, r))
    _check_shape(cls, "first_mask", fact.first_mask, (r, fan_in))
    _check_shape(cls, "second_mask", fact.second_mask, (out, r))
    return r


def _copy_masked_(param: Tensor, mask: Tensor, value: Tensor, value_mask: Tensor) -> None:
    """``param, mask <- value * value_mask, value_mask`` in ``param``'s dtype, device and shape."""
    vm = value_mask.to(device=mask.device, dtype=torch.bool).reshape(mask.shape)
    mask.copy_(vm)
    param.copy_(value.detach().to(device=param.device, dtype=param.dtype).reshape(param.shape) * vm)


class _Pruned(nn.Module):
    """Shared bookkeeping: ``(param, mask)`` pairs, nnz/density, mask projection."""

    def _masked(self) -> list[tuple[nn.Parameter, Tensor]]:
        raise NotImplementedError

    def _dense_numel(self) -> int:
        raise NotImplementedError

    def masked_parameters(self) -> list[tuple[nn.Parameter, Tensor]]:
        """``[(param, bool mask)]`` for every masked parameter (the bias is dense)."""
        return self._masked()

    @property
    def nnz(self) -> int:
        """Stored nonzeros: the masks' sizes (what the pruning budget counts; bias excluded)."""
        return sum(int(m.sum()) for _, m in self._masked())

    @property
    def density(self) -> float:
        """``nnz`` relative to the dense layer's ``out * fan_in``."""
        return self.nnz / self._dense_numel()

    @torch.no_grad()
    def apply_masks_(self) -> _Pruned:
        """Zero every parameter entry outside its mask (after hand-written parameter updates)."""
        for p, m in self._masked():
            p.mul_(m)
        return self


class _Conv2dGeometry:
    """nn.Conv2d's spatial arguments, normalized, and its padding-mode aware convolution."""

    def _init_geometry(self, kernel_size: _IntPair, stride: _IntPair, padding: _IntPair | str,
                       dilation: _IntPair, padding_mode: str) -> None:
        pair = lambda v: (v, v) if isinstance(v, int) else tuple(int(i) for i in v)  # noqa: E731
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
            self.padding = padding
            # F.pad order (left, right, top, bottom); 'same' puts the odd pixel on the right, as torch does.
            totals = [d * (k - 1) if padding == "same" else 0 for d, k in zip(self.dilation, self.kernel_size)]
            (th, tw) = totals
            self._pad4 = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
        else:
            self.padding = pair(padding)
            ph, pw = self.padding
            self._pad4 = (pw, pw, ph, ph)

    def _geometry_kwargs(self) -> dict[str, Any]:
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, padding_mode=self.padding_mode)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros":  # as nn.Conv2d: explicit pad, then an unpadded conv
            return F.conv2d(F.pad(x, self._pad4, mode=self.padding_mode), weight, bias, self.stride, 0,
                            self.dilation)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def _tokens(self, x: Tensor) -> int:
        """``N * H_out * W_out`` output positions of ``x`` (``(N, C, H, W)`` or unbatched)."""
        n = x.shape[0] if x.dim() == 4 else 1
        left, right, top, bottom = self._pad4
        sizes = [(s + p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in zip(
            x.shape[-2:], (top + bottom, left + right), self.dilation, self.kernel_size, self.stride)]
        return n * max(0, sizes[0]) * max(0, sizes[1])

    def _to_dense_conv(self, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
        out, in_ = weight.shape[:2]
        conv = nn.Conv2d(in_, out, bias=bias is not None, device=weight.device, dtype=weight.dtype,
                         **self._geometry_kwargs())
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv

    @staticmethod
    def _check_conv(cls: str, layer: nn.Module) -> nn.Conv2d:
        if not isinstance(layer, nn.Conv2d):
            raise ValueError(f"{cls}.from_factorization needs an nn.Conv2d, got {type(layer).__name__}")
        if layer.groups != 1:
            raise ValueError(f"{cls}: grouped Conv2d (groups={layer.groups}) is not supported")
        return layer


def _to_dense_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def _init_factor_(t: Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))  # nn.Linear's default, on the factor's own fan-in


def _init_bias_(bias: Tensor | None, fan_in: int) -> None:
    if bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


class _DSF(_Pruned):
    """Two masked factors ``first`` / ``second``, forward-path choice and norm balancing."""

    first: nn.Parameter
    second: nn.Parameter
    first_mask: Tensor
    second_mask: Tensor
    bias: nn.Parameter | None
    rank: int

    def _init_factors(self, first_shape: tuple[int, ...], second_shape: tuple[int, ...], bias: int | None,
                      forward_mode: ForwardMode, device: Any, dtype: Any) -> None:
        kw = dict(device=device, dtype=dtype)
        self.first = nn.Parameter(torch.empty(first_shape, **kw))
        self.second = nn.Parameter(torch.empty(second_shape, **kw))
        self.bias = nn.Parameter(torch.empty(bias, **kw)) if bias is not None else None
        self.register_buffer("first_mask", torch.ones(first_shape, dtype=torch.bool, device=device))
        self.register_buffer("second_mask", torch.ones(second_shape, dtype=torch.bool, device=device))
        self.forward_mode = forward_mode
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random factors (nn.Linear's init per factor), zero outside the masks; for empty modules."""
        _init_factor_(self.first)
        _init_factor_(self.second)
        _init_bias_(self.bias, self.first[0].numel())
        self.apply_masks_()

    @property
    def forward_mode(self) -> ForwardMode:
        """``"auto"`` (fewer multiplies, per call), ``"fused"`` or ``"sequential"``."""
        return self._forward_mode

    @forward_mode.setter
    def forward_mode(self, mode: ForwardMode) -> None:
        if mode not in _FORWARD_MODES:
            raise ValueError(f"forward_mode must be one of {_FORWARD_MODES}, got {mode!r}")
        self._forward_mode = mode

    def _masked(self) -> list[tuple[nn.Parameter, Tensor]]:
        return [(self.first, self.first_mask), (self.second, self.second_mask)]

    def _load(self, fact: Factorization, bias: Tensor | None) -> None:
        with torch.no_grad():
            _copy_masked_(self.first, self.first_mask, fact.first, fact.first_mask)
            _copy_masked_(self.second, self.second_mask, fact.second, fact.second_mask)
            if bias is not None:
                self.bias.copy_(bias)

    def _product(self) -> Tensor:
        """``(out, fan_in)`` ``S F`` of the masked factors, differentiable."""
        return (self.second * self.second_mask).flatten(1) @ (self.first * self.first_mask).flatten(1)

    def _tokens(self, x: Tensor) -> int:
        raise NotImplementedError

    def forward_path(self, x: Tensor) -> ForwardPath:
        """The path :meth:`forward` takes for input ``x`` under the current ``forward_mode``."""
        if self._forward_mode != "auto":
            return self._forward_mode
        out, fan_in = self.second.shape[0], self.first[0].numel()
        return choose_forward_path(out, self.rank, fan_in, self._tokens(x))

    @torch.no_grad()
    def balance_norms_(self) -> _DSF:
        """Rescale each rank channel ``i``: ``F_i *= d_i``, ``S_:i /= d_i`` with
        ``d_i = sqrt(||S_:i|| / ||F_i||)``, so both carry ``sqrt(||S_:i|| ||F_i||)``; ``S F`` is unchanged.

        Balanced factors take comparable gradient steps in fine-tuning (paper section 4.4).
        Channels with a zero factor are left alone. Do it before creating the optimizer:
        momentum/Adam state is not rescaled.
        """
        f = (self.first * self.first_mask).flatten(1)
        s = (self.second * self.second_mask).flatten(1)
        nf = f.double().norm(dim=1)
        ns = s.double().norm(dim=0)
        ok = (nf > 0) & (ns > 0)
        d = torch.where(ok, (ns / nf.where(ok, 1.0)).sqrt(), 1.0)
        self.first.copy_((f * d[:, None].to(f.dtype)).view_as(self.first))
        self.second.copy_((s / d[None, :].to(s.dtype)).view_as(self.second))
        return self

    def extra_repr(self) -> str:
        return (f"{self._shape_repr()}, rank={self.rank}, bias={self.bias is not None}, "
                f"density={self.density:.4f}, forward_mode={self._forward_mode}")

    def _shape_repr(self) -> str:
        raise NotImplementedError


class DSFLinear(_DSF):
    """``y = x (S F)^T + b`` with masked ``first`` ``F`` ``(rank, in)`` and ``second`` ``S`` ``(out, rank)``.

    Args:
        in_features, out_features, rank: shapes; masks start all-True (an empty module to load
            a pruned checkpoint into). Build a pruned one with :meth:`from_factorization`.
        bias: learnable ``(out,)`` bias, added after ``S``.
        forward_mode: ``"auto"``, ``"fused"`` or ``"sequential"`` (settable attribute).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 forward_mode: ForwardMode = "auto", device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self._init_factors((rank, in_features), (out_features, rank), out_features if bias else None,
                           forward_mode, device, dtype)

    @classmethod
    def from_factorization(cls, layer: nn.Module, fact: Factorization, *,
                           forward_mode: ForwardMode = "auto") -> DSFLinear:
        """From an ``nn.Linear`` (or HF ``Conv1D``, weight ``(in, out)``, treated as the linear map
        with weight ``weight.T``) and its ``fact`` (``first (r, in)``, ``second (out, r)``).

        Keeps the layer's dtype and device and copies its bias. :meth:`to_dense` of a module made
        from a ``Conv1D`` returns an ``nn.Linear`` (same function, standard orientation).
        """
        w = _linear_weight(layer, cls.__name__)
        out, in_ = w.shape
        r = _check_factorization(cls.__name__, fact, out, in_, double=True)
        m = cls(in_, out, r, bias=layer.bias is not None, forward_mode=forward_mode, device=w.device, dtype=w.dtype)
        m._load(fact, layer.bias)
        return m

    def _tokens(self, x: Tensor) -> int:
        return x.numel() // self.in_features if self.in_features else 0

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        if self.forward_path(x) == "fused":
            return F.linear(x, self._product(), self.bias)
        return F.linear(F.linear(x, self.first * self.first_mask), self.second * self.second_mask, self.bias)

    def _dense_numel(self) -> int:
        return self.out_features * self.in_features

    def merged_weight(self) -> Tensor:
        """Detached ``(out, in)`` dense weight ``S F``."""
        return self._product().detach()

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (same dtype/device, bias copied)."""
        return _to_dense_linear(self.merged_weight(), self.bias).train(self.training)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs rebuilding this (empty) module: ``DSFLinear(**m.spec())``."""
        return dict(in_features=self.in_features, out_features=self.out_features, rank=self.rank,
                    bias=self.bias is not None, forward_mode=self._forward_mode)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class DSFConv2d(_Conv2dGeometry, _DSF):
    """``kh x kw`` conv ``in -> rank`` (``first`` ``(rank, in, kh, kw)``, the original stride, padding,
    dilation, padding mode) followed by a 1x1 conv ``rank -> out`` (``second`` ``(out, rank, 1, 1)``)
    carrying the bias. ``groups`` is always 1.

    As a matrix ``W (out, in*kh*kw) = second.flatten(1) @ first.flatten(1)``, the order of
    ``nn.Conv2d.weight.flatten(1)``. Arguments mirror ``nn.Conv2d``; masks start all-True.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntPair, rank: int,
                 stride: _IntPair = 1, padding: _IntPair | str = 0, dilation: _IntPair = 1,
                 padding_mode: str = "zeros", bias: bool = True, *, forward_mode: ForwardMode = "auto",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._init_geometry(kernel_size, stride, padding, dilation, padding_mode)
        self.in_channels, self.out_channels, self.rank = in_channels, out_channels, rank
        self._init_factors((rank, in_channels, *self.kernel_size), (out_channels, rank, 1, 1),
                           out_channels if bias else None, forward_mode, device, dtype)

    @classmethod
    def from_factorization(cls, layer: nn.Module, fact: Factorization, *,
                           forward_mode: ForwardMode = "auto") -> DSFConv2d:
        """From an ``nn.Conv2d`` (``groups == 1``) and ``fact`` of ``layer.weight.flatten(1)``:
        ``first (r, in*kh*kw)`` becomes ``(r, in, kh, kw)``, ``second (out, r)`` ``(out, r, 1, 1)``.
        Keeps the layer's geometry, dtype and device and copies its bias."""
        conv = cls._check_conv(cls.__name__, layer)
        w = conv.weight
        r = _check_factorization(cls.__name__, fact, w.shape[0], w[0].numel(), double=True)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, r, conv.stride, conv.padding,
                conv.dilation, conv.padding_mode, conv.bias is not None, forward_mode=forward_mode,
                device=w.device, dtype=w.dtype)
        m._load(fact, conv.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, in, H, W) -> (N, out, H_out, W_out)`` (unbatched ``(in, H, W)`` too)."""
        if self.forward_path(x) == "fused":
            return self._conv(x, self._product().view(self.out_channels, self.in_channels, *self.kernel_size),
                              self.bias)
        return F.conv2d(self._conv(x, self.first * self.first_mask, None), self.second * self.second_mask,
                        self.bias)

    def _dense_numel(self) -> int:
        return self.out_channels * self.first[0].numel()

    def merged_weight(self) -> Tensor:
        """Detached ``(out, in, kh, kw)`` dense weight."""
        return self._product().detach().view(self.out_channels, self.in_channels, *self.kernel_size)

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` computing the same function (same dtype/device, bias copied)."""
        return self._to_dense_conv(self.merged_weight(), self.bias).train(self.training)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs rebuilding this (empty) module: ``DSFConv2d(**m.spec())``."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, rank=self.rank,
                    bias=self.bias is not None, forward_mode=self._forward_mode, **self._geometry_kwargs())

    def _shape_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, padding_mode={self.padding_mode}")


class _Sparse(_Pruned):
    weight: nn.Parameter
    weight_mask: Tensor
    bias: nn.Parameter | None

    def _init_weight(self, shape: tuple[int, ...], bias: bool, device: Any, dtype: Any) -> None:
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(shape, **kw))
        self.bias = nn.Parameter(torch.empty(shape[0], **kw)) if bias else None
        self.register_buffer("weight_mask", torch.ones(shape, dtype=torch.bool, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear/nn.Conv2d's init, zero outside the mask; for empty modules."""
        _init_factor_(self.weight)
        _init_bias_(self.bias, self.weight[0].numel())
        self.apply_masks_()

    def _masked(self) -> list[tuple[nn.Parameter, Tensor]]:
        return [(self.weight, self.weight_mask)]

    def _dense_numel(self) -> int:
        return self.weight.numel()

    def merged_weight(self) -> Tensor:
        """Detached dense weight in the original layer's shape (zero outside the mask)."""
        return (self.weight * self.weight_mask).detach()

    def _load(self, fact: Factorization, bias: Tensor | None) -> None:
        with torch.no_grad():
            _copy_masked_(self.weight, self.weight_mask, fact.first, fact.first_mask)
            if bias is not None:
                self.bias.copy_(bias)

    def extra_repr(self) -> str:
        return f"{self._shape_repr()}, bias={self.bias is not None}, density={self.density:.4f}"

    def _shape_repr(self) -> str:
        raise NotImplementedError


class SparseLinear(_Sparse):
    """``y = x (weight * weight_mask)^T + b``: a single-sparse pruned ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_weight((out_features, in_features), bias, device, dtype)

    @classmethod
    def from_factorization(cls, layer: nn.Module, fact: Factorization) -> SparseLinear:
        """From an ``nn.Linear`` (or HF ``Conv1D``, as in :meth:`DSFLinear.from_factorization`) and a
        single-sparse ``fact`` (``first`` the pruned ``(out, in)`` weight, ``second is None``)."""
        w = _linear_weight(layer, cls.__name__)
        out, in_ = w.shape
        _check_factorization(cls.__name__, fact, out, in_, double=False)
        m = cls(in_, out, bias=layer.bias is not None, device=w.device, dtype=w.dtype)
        m._load(fact, layer.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        """``x (..., in) -> (..., out)``."""
        return F.linear(x, self.weight * self.weight_mask, self.bias)

    def to_dense(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the masked weight (same dtype/device, bias copied)."""
        return _to_dense_linear(self.merged_weight(), self.bias).train(self.training)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs rebuilding this (empty) module."""
        return dict(in_features=self.in_features, out_features=self.out_features, bias=self.bias is not None)

    def _shape_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class SparseConv2d(_Conv2dGeometry, _Sparse):
    """``nn.Conv2d`` (``groups == 1``) with a masked ``weight`` ``(out, in, kh, kw)``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _IntPair, stride: _IntPair = 1,
                 padding: _IntPair | str = 0, dilation: _IntPair = 1, padding_mode: str = "zeros",
                 bias: bool = True, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._init_geometry(kernel_size, stride, padding, dilation, padding_mode)
        self.in_channels, self.out_channels = in_channels, out_channels
        self._init_weight((out_channels, in_channels, *self.kernel_size), bias, device, dtype)

    @classmethod
    def from_factorization(cls, layer: nn.Module, fact: Factorization) -> SparseConv2d:
        """From an ``nn.Conv2d`` and a single-sparse ``fact`` of ``layer.weight.flatten(1)``."""
        conv = cls._check_conv(cls.__name__, layer)
        w = conv.weight
        _check_factorization(cls.__name__, fact, w.shape[0], w[0].numel(), double=False)
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.padding_mode, conv.bias is not None, device=w.device, dtype=w.dtype)
        m._load(fact, conv.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        """``x (N, in, H, W) -> (N, out, H_out, W_out)``."""
        return self._conv(x, self.weight * self.weight_mask, self.bias)

    def to_dense(self) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` with the masked weight (same dtype/device, bias copied)."""
        return self._to_dense_conv(self.merged_weight(), self.bias).train(self.training)

    def spec(self) -> dict[str, Any]:
        """Constructor kwargs rebuilding this (empty) module."""
        return dict(in_channels=self.in_channels, out_channels=self.out_channels, bias=self.bias is not None,
                    **self._geometry_kwargs())

    def _shape_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, padding_mode={self.padding_mode}")


PRUNED_MODULE_TYPES: tuple[type[nn.Module], ...] = (DSFLinear, DSFConv2d, SparseLinear, SparseConv2d)


def is_pruned_module(m: nn.Module) -> bool:
    """Whether ``m`` is one of this module's masked pruned layers."""
    return isinstance(m, PRUNED_MODULE_TYPES)


def pruned_module_from_factorization(layer: nn.Module, fact: Factorization, *,
                                     forward_mode: ForwardMode = "auto") -> nn.Module:
    """The pruned replacement of ``layer``: DSF* for two factors, Sparse* for one; Conv2d or Linear
    (HF ``Conv1D`` counts as Linear) by the layer's type. ``forward_mode`` applies to DSF layers."""
    conv = isinstance(layer, nn.Conv2d)
    if fact.second is None:
        return (SparseConv2d if conv else SparseLinear).from_factorization(layer, fact)
    return (DSFConv2d if conv else DSFLinear).from_factorization(layer, fact, forward_mode=forward_mode)
