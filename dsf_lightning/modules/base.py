"""What every masked pruned layer shares: (parameter, mask) bookkeeping, conv geometry, construction checks.

Every forward uses ``param * mask`` (masks are bool buffers, saved in the state dict), so the
function is exactly sparse and the gradient of a masked entry is exactly zero. Entries outside
the masks are zero at construction, and every standard update keeps a zero parameter with zero
gradient at zero (SGD momentum/weight decay, Adam(W), GradScaler), so the stored parameters stay
exactly sparse as well. Call :meth:`MaskedLayer.apply_masks_` after writing parameters by hand.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsf_lightning.factorization import Factorization
from dsf_lightning.layers import PAD_MODES, explicit_padding, layer_kind, pair

__all__ = ["ConvGeometry", "IntPair", "MaskedLayer", "check_factorization"]

IntPair = int | tuple[int, int]


class MaskedLayer(nn.Module):
    """Shared bookkeeping of the pruned layers: ``(param, mask)`` pairs, nnz/density, mask projection,
    and filling the masks and values from a :class:`~dsf_lightning.factorization.Factorization`."""

    bias: nn.Parameter | None

    def masked_parameters(self) -> list[tuple[nn.Parameter, Tensor]]:
        """``[(param, bool mask)]`` for every masked parameter (the bias is dense)."""
        raise NotImplementedError

    @property
    def fan_in(self) -> int:
        """Inputs per output of the layer (``in * kh * kw`` for convs): a row of the first masked parameter."""
        return self.masked_parameters()[0][0][0].numel()

    @property
    def out_dim(self) -> int:
        """Outputs of the layer (``out_features`` / ``out_channels``): rows of the last masked parameter."""
        return self.masked_parameters()[-1][0].shape[0]

    @property
    def nnz(self) -> int:
        """Stored nonzeros: the masks' sizes (what the pruning budget counts; bias excluded)."""
        return sum(int(m.sum()) for _, m in self.masked_parameters())

    @property
    def density(self) -> float:
        """``nnz`` relative to the dense layer's ``out * fan_in``."""
        return self.nnz / (self.out_dim * self.fan_in)

    @torch.no_grad()
    def apply_masks_(self) -> MaskedLayer:
        """Zero every parameter entry outside its mask (after hand-written parameter updates)."""
        for p, m in self.masked_parameters():
            p.mul_(m)
        return self

    def merged_weight(self) -> Tensor:
        """Detached dense weight in the original layer's shape (``nn.Linear`` / ``nn.Conv2d``)."""
        raise NotImplementedError

    @torch.no_grad()
    def load_factorization_(self, fact: Factorization) -> MaskedLayer:
        """In place: masks and values of ``fact`` (a factorization of this layer's ``(out, fan_in)``
        matrix) into the masked parameters, in their dtype and device. The parameter objects stay the
        same, so optimizers and DDP holding them see the new values. A two-factor ``fact`` of a lower
        rank ``k`` (low-rank SVD) fills the first ``k`` rank channels; the others are masked out.
        Returns ``self``."""
        check_factorization(self, fact)
        values = [(fact.first, fact.first_mask)] + ([] if fact.second is None else [(fact.second, fact.second_mask)])
        for (param, mask), (value, value_mask) in zip(self.masked_parameters(), values):
            flat_p, flat_m = param.view(param.shape[0], -1), mask.view(mask.shape[0], -1)
            if value is fact.second:  # (out, k): the rank channels are columns
                flat_p, flat_m = flat_p.T, flat_m.T
                value, value_mask = value.T, value_mask.T
            k = value.shape[0]
            vm = value_mask.to(device=mask.device, dtype=torch.bool)
            flat_m.zero_()
            flat_m[:k] = vm
            flat_p.zero_()
            flat_p[:k] = value.detach().to(device=param.device, dtype=param.dtype) * vm
        return self

    def _copy_bias(self, bias: Tensor | None) -> None:
        if bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)


def _shape_error(layer: MaskedLayer, what: str, t: Tensor | None, expected: tuple[int, ...]) -> None:
    got = None if t is None else tuple(t.shape)
    if got != expected:
        raise ValueError(f"{type(layer).__name__}: expected {what} of shape {expected}, got {got}")


def check_factorization(layer: MaskedLayer, fact: Factorization) -> None:
    """``ValueError`` unless ``fact`` has this layer's number of factors and their ``(out, fan_in)`` shapes."""
    pairs = layer.masked_parameters()
    if len(pairs) == 2 and fact.second is None:
        raise ValueError(f"{type(layer).__name__} needs a two-factor factorization, got method {fact.method!r} "
                         f"with second=None (use SparseLinear/SparseConv2d)")
    if len(pairs) == 1 and fact.second is not None:
        raise ValueError(f"{type(layer).__name__} needs a single-mask factorization (second=None), got method "
                         f"{fact.method!r} with two factors (use DSFLinear/DSFConv2d)")
    out, fan_in = layer.out_dim, layer.fan_in
    rows = pairs[0][0].shape[0]  # the rank of a two-factor layer, ``out`` of a single-mask one
    if fact.second is not None and fact.first.dim() == 2 and fact.first.shape[0] <= rows:
        rows = fact.first.shape[0]  # a lower rank fills the leading channels
    _shape_error(layer, "first", fact.first, (rows, fan_in))
    _shape_error(layer, "first_mask", fact.first_mask, (rows, fan_in))
    if fact.second is not None:
        _shape_error(layer, "second", fact.second, (out, rows))
        _shape_error(layer, "second_mask", fact.second_mask, (out, rows))


def init_masked_(param: Tensor) -> None:
    """``nn.Linear``'s default init, on the factor's own fan-in."""
    nn.init.kaiming_uniform_(param, a=math.sqrt(5))


def init_bias_(bias: Tensor | None, fan_in: int) -> None:
    """``nn.Linear``'s default bias init for a layer with ``fan_in`` inputs per output."""
    if bias is not None:
        bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


def dense_linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight (out, in)`` and ``bias`` (same dtype/device)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def linear_weight(layer: nn.Module, cls: str) -> Tensor:
    """``(out, in)`` weight of an ``nn.Linear`` or HF ``Conv1D`` (whose weight is ``(in, out)``)."""
    kind = layer_kind(layer)
    if kind == "linear":
        return layer.weight
    if kind == "conv1d":
        return layer.weight.T
    raise ValueError(f"{cls} needs an nn.Linear or transformers Conv1D, got {type(layer).__name__}")


class ConvGeometry:
    """``nn.Conv2d``'s spatial arguments, normalized, and its padding-mode aware convolution
    (``groups`` is always 1)."""

    groups = 1

    def _init_geometry(self, kernel_size: IntPair, stride: IntPair, padding: IntPair | str,
                       dilation: IntPair, padding_mode: str) -> None:
        self.kernel_size, self.stride, self.dilation = pair(kernel_size), pair(stride), pair(dilation)
        if padding_mode not in PAD_MODES:
            raise ValueError(f"padding_mode must be one of {tuple(PAD_MODES)}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' is not supported for strided convolutions")
        self.padding = pair(padding)
        self._pad4 = explicit_padding(self)

    def geometry(self) -> dict[str, Any]:
        """The spatial constructor arguments of ``nn.Conv2d`` / the pruned conv modules."""
        return dict(kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
                    dilation=self.dilation, padding_mode=self.padding_mode)

    def _conv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode != "zeros":  # as nn.Conv2d: explicit pad, then an unpadded conv
            return F.conv2d(F.pad(x, self._pad4, mode=self.padding_mode), weight, bias, self.stride, 0, self.dilation)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)

    def _tokens(self, x: Tensor) -> int:
        """``N * H_out * W_out`` output positions of ``x`` (``(N, C, H, W)`` or unbatched)."""
        n = x.shape[0] if x.dim() == 4 else 1
        left, right, top, bottom = self._pad4
        sizes = [(s + p - d * (k - 1) - 1) // st + 1 for s, p, d, k, st in zip(
            x.shape[-2:], (top + bottom, left + right), self.dilation, self.kernel_size, self.stride)]
        return n * max(0, sizes[0]) * max(0, sizes[1])

    def _dense_conv(self, weight: Tensor, bias: Tensor | None) -> nn.Conv2d:
        out, in_ = weight.shape[:2]
        conv = nn.Conv2d(in_, out, bias=bias is not None, device=weight.device, dtype=weight.dtype, **self.geometry())
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv

    def _shape_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, padding_mode={self.padding_mode}")

    @staticmethod
    def _check_conv(cls: str, layer: nn.Module) -> nn.Conv2d:
        if not isinstance(layer, nn.Conv2d):
            raise ValueError(f"{cls} needs an nn.Conv2d, got {type(layer).__name__}")
        if layer.groups != 1:
            raise ValueError(f"{cls}: grouped Conv2d (groups={layer.groups}) is not supported")
        return layer
