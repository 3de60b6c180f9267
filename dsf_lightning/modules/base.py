"""What every masked pruned layer shares: factor bookkeeping in either storage, conv geometry, construction checks.

Every forward uses the factors zero outside their masks (:meth:`MaskedLayer.factor`), so the function is
exactly sparse. In the masked storage (``param * mask``) the gradient of a masked entry is exactly zero;
entries outside the masks are zero at construction, and every standard update keeps a zero parameter
with zero gradient at zero (SGD momentum/weight decay, Adam(W), GradScaler), so the stored parameters
stay exactly sparse as well (call :meth:`MaskedLayer.apply_masks_` after writing parameters by hand).
In the compressed storage only the nonzeros are parameters (:mod:`~dsf_lightning.modules.storage`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from dsf_lightning.factorization import Factorization
from dsf_lightning.layers import PAD_MODES, explicit_padding, grouped, layer_kind, pair, weight_matrix
from dsf_lightning.modules.storage import (
    Storage,
    check_storage,
    factor_keys,
    pack_bits,
    scatter_values,
    unpack_bits,
)

__all__ = ["ConvGeometry", "IntPair", "MaskedLayer", "check_factorization"]

IntPair = int | tuple[int, int]


class MaskedLayer(nn.Module):
    """Shared bookkeeping of the pruned layers: their factors (``factor_names``, each a dense-shaped
    tensor zero outside its bool mask) in either storage, nnz/density, mask projection, and filling the
    masks and values from a :class:`~dsf_lightning.factorization.Factorization`.

    ``storage="masked"``: factor ``f`` is the parameter ``f`` times the buffer ``f_mask``.
    ``storage="compressed"``: the parameter ``f_values`` holds the nonzeros and the buffer ``f_bits`` the
    packed mask (:mod:`~dsf_lightning.modules.storage`); ``m.f`` and ``m.f_mask`` then read the unpacked
    factor and mask. :meth:`set_storage_` converts in place, and ``load_state_dict`` takes either form.
    """

    bias: nn.Parameter | None
    #: the factors, in order: ``("first", "second")`` (``W = second @ first``) or ``("weight",)``
    factor_names: tuple[str, ...] = ()

    def _init_masked(self, shapes: tuple[tuple[int, ...], ...], device: Any, dtype: Any) -> None:
        """Register every factor in the masked storage, all-True masks (``reset_parameters`` fills them)."""
        self._storage: Storage = "masked"
        self._factor_shapes = dict(zip(self.factor_names, shapes))
        for name, shape in self._factor_shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))
            self.register_buffer(f"{name}_mask", torch.ones(shape, dtype=torch.bool, device=device))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if self.__dict__.get("_storage") == "compressed":
                if name in self.factor_names:
                    return self.factor(name)
                if name.endswith("_mask") and name[:-5] in self.factor_names:
                    return self.factor_mask(name[:-5])
            raise

    @property
    def storage(self) -> Storage:
        """``"masked"`` or ``"compressed"`` (change it with :meth:`set_storage_`)."""
        return self._storage

    def factor_parameters(self) -> list[nn.Parameter]:
        """The parameters holding the factors (full-size or values), in ``factor_names`` order: matrix entries
        either way (for weight decay on matrices, a compressed factor's 1-D values count)."""
        suffix = "" if self._storage == "masked" else "_values"
        return [self._parameters[n + suffix] for n in self.factor_names]

    def factor_shape(self, name: str) -> tuple[int, ...]:
        """The dense shape of factor ``name``."""
        return self._factor_shapes[name]

    def factor_mask(self, name: str) -> Tensor:
        """Bool mask of factor ``name`` (its dense shape)."""
        if self._storage == "masked":
            return self._buffers[f"{name}_mask"]
        return unpack_bits(getattr(self, f"{name}_bits"), self._factor_shapes[name])  # a buffer, or see below

    def factor(self, name: str) -> Tensor:
        """Factor ``name`` as a dense tensor, zero outside its mask; differentiable in the parameter."""
        if self._storage == "masked":
            return self._parameters[name] * self._buffers[f"{name}_mask"]
        return scatter_values(self._parameters[f"{name}_values"], self.factor_mask(name))

    def masked_parameters(self) -> list[tuple[Tensor, Tensor]]:
        """``[(factor, bool mask)]`` in ``factor_names`` order (the bias is dense): the parameters themselves
        in the masked storage, the unpacked factors in the compressed one."""
        if self._storage == "masked":
            return [(self._parameters[n], self._buffers[f"{n}_mask"]) for n in self.factor_names]
        return [(self.factor(n), self.factor_mask(n)) for n in self.factor_names]

    @property
    def fan_in(self) -> int:
        """Inputs per output of the layer (``in * kh * kw`` for convs): a row of the first factor."""
        return math.prod(self._factor_shapes[self.factor_names[0]][1:])

    @property
    def out_dim(self) -> int:
        """Outputs of the layer (``out_features`` / ``out_channels``): rows of the last factor."""
        return self._factor_shapes[self.factor_names[-1]][0]

    @property
    def nnz(self) -> int:
        """Stored nonzeros: the masks' sizes (what the pruning budget counts; bias excluded)."""
        if self._storage == "compressed":
            return sum(self._parameters[f"{n}_values"].numel() for n in self.factor_names)
        return sum(int(self._buffers[f"{n}_mask"].sum()) for n in self.factor_names)

    @property
    def density(self) -> float:
        """``nnz`` relative to the dense layer's ``out * fan_in``."""
        return self.nnz / (self.out_dim * self.fan_in)

    @torch.no_grad()
    def apply_masks_(self) -> MaskedLayer:
        """Zero every parameter entry outside its mask (after hand-written parameter updates); the
        compressed storage cannot hold such entries."""
        if self._storage == "masked":
            for n in self.factor_names:
                self._parameters[n].mul_(self._buffers[f"{n}_mask"])
        return self

    @torch.no_grad()
    def set_factor_(self, name: str, value: Tensor, mask: Tensor) -> None:
        """Factor ``name`` := ``value`` at bool ``mask`` (both its dense shape), zero elsewhere. The parameter
        object stays the same, so optimizers holding it see the new values (a compressed one is resized)."""
        mask = mask.to(device=self._buffers[self._mask_key(name)].device, dtype=torch.bool)
        if self._storage == "masked":
            param = self._parameters[name]
            self._buffers[f"{name}_mask"].copy_(mask)
            param.copy_(value.to(device=param.device, dtype=param.dtype) * mask)
        else:
            param = self._parameters[f"{name}_values"]
            self._buffers[f"{name}_bits"].copy_(pack_bits(mask))
            param.data = value.to(device=param.device, dtype=param.dtype)[mask].clone()

    def patterns_to_parameters_(self) -> MaskedLayer:
        """In place, compressed storage: the bit patterns become frozen parameters (``requires_grad=False``)
        under the same names and state-dict keys, for wrappers that shard parameters but not buffers (FSDP2).
        Nothing else changes: no optimizer takes them (no gradient), and the forward reads them by name. The
        masked storage keeps its masks as buffers. Returns ``self``."""
        if self._storage == "compressed":
            for name in self.factor_names:
                bits = self._buffers.pop(f"{name}_bits")
                self.register_parameter(f"{name}_bits", nn.Parameter(bits, requires_grad=False))
        return self

    def _mask_key(self, name: str) -> str:
        return f"{name}_mask" if self._storage == "masked" else f"{name}_bits"

    @torch.no_grad()
    def set_storage_(self, storage: Storage) -> MaskedLayer:
        """In place: hold the factors in ``storage`` (same values, masks and ``requires_grad``; new parameter
        objects, so build the optimizer after). Returns ``self``."""
        storage = check_storage(storage)
        if storage == self._storage:
            return self
        held = {n: (self.factor(n).detach(), self.factor_mask(n).clone(), p.requires_grad)
                for n, p in zip(self.factor_names, self.factor_parameters())}
        for name in self.factor_names:
            for key in factor_keys(name):
                self._parameters.pop(key, None)
                self._buffers.pop(key, None)
        self._storage = storage
        for name, (value, mask, requires_grad) in held.items():
            if storage == "masked":
                self.register_parameter(name, nn.Parameter(value, requires_grad=requires_grad))
                self.register_buffer(f"{name}_mask", mask)
            else:
                self.register_parameter(f"{name}_values", nn.Parameter(value[mask], requires_grad=requires_grad))
                self.register_buffer(f"{name}_bits", pack_bits(mask))
        # factors first, then the bias, in either storage: optimizer states are matched by position
        if "bias" in self._parameters:
            self._parameters["bias"] = self._parameters.pop("bias")
        return self

    def state_to_storage_(self, state_dict: dict[str, Any], prefix: str = "") -> None:
        """Rewrite, in ``state_dict`` (keys of this module under ``prefix``), factors saved in the other storage
        into this module's; check that a compressed factor's values count its mask bits (``ValueError`` naming
        the layer). ``load_state_dict`` does it, so checkpoints of either storage load into either."""
        layer = prefix.removesuffix(".") or type(self).__name__
        for name in self.factor_names:
            shape, p = self._factor_shapes[name], prefix + name
            if self._storage == "compressed" and p in state_dict and f"{p}_mask" in state_dict:
                value, mask = state_dict.pop(p), state_dict.pop(f"{p}_mask")
                if tuple(mask.shape) != shape or tuple(value.shape) != shape:
                    continue  # the strict shape check reports it
                state_dict[f"{p}_values"], state_dict[f"{p}_bits"] = value[mask.bool()], pack_bits(mask.bool())
            elif self._storage == "masked" and f"{p}_values" in state_dict and f"{p}_bits" in state_dict:
                values, bits = state_dict.pop(f"{p}_values"), state_dict.pop(f"{p}_bits")
                mask = _checked_mask(layer, name, values, bits, shape)
                state_dict[p], state_dict[f"{p}_mask"] = scatter_values(values, mask), mask
            elif self._storage == "compressed" and f"{p}_values" in state_dict and f"{p}_bits" in state_dict:
                _checked_mask(layer, name, state_dict[f"{p}_values"], state_dict[f"{p}_bits"], shape)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        self.state_to_storage_(state_dict, prefix)
        if self._storage == "compressed":  # the nonzeros are data: take the checkpoint's count
            for name in self.factor_names:
                values, param = state_dict.get(f"{prefix}{name}_values"), self._parameters[f"{name}_values"]
                if isinstance(values, Tensor) and values.dim() == 1 and values.numel() != param.numel():
                    param.data = param.new_empty(values.numel())
        super()._load_from_state_dict(state_dict, prefix, *args)

    @torch.no_grad()
    def load_factorization_(self, fact: Factorization) -> MaskedLayer:
        """In place: masks and values of ``fact`` (a factorization of this layer's ``(out, fan_in)``
        matrix) into the factors, in their dtype and device. The parameter objects stay the same, so
        optimizers holding them see the new values. A two-factor ``fact`` of a lower rank ``k`` (low-rank
        SVD) fills the first ``k`` rank channels; the others are masked out. Returns ``self``."""
        check_factorization(self, fact)
        values = [(fact.first, fact.first_mask)] + ([] if fact.second is None else [(fact.second, fact.second_mask)])
        for name, (value, value_mask) in zip(self.factor_names, values):
            shape = self._factor_shapes[name]
            dense = torch.zeros(shape[0], math.prod(shape[1:]), dtype=value.dtype, device=value.device)
            mask = torch.zeros(dense.shape, dtype=torch.bool, device=value.device)
            flat_v, flat_m = (dense.T, mask.T) if value is fact.second else (dense, mask)  # (out, k): rank = columns
            value, value_mask = (value.T, value_mask.T) if value is fact.second else (value, value_mask)
            k = value.shape[0]
            flat_m[:k] = value_mask.to(torch.bool)
            flat_v[:k] = value.detach() * flat_m[:k]
            self.set_factor_(name, dense.view(shape), mask.view(shape))
        return self

    def _copy_bias(self, bias: Tensor | None) -> None:
        if bias is not None:
            with torch.no_grad():
                self.bias.copy_(bias)


def _checked_mask(layer: str, name: str, values: Tensor, bits: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The mask of a compressed factor's ``bits``, ``ValueError`` unless ``values`` holds one entry per bit."""
    if isinstance(bits, DTensor):  # loading into a model sharded by FSDP2: every rank loads the same keys
        bits = bits.full_tensor()
    try:
        mask = unpack_bits(bits, shape)
    except ValueError as e:
        raise ValueError(f"layer {layer!r} factor {name!r}: {e}") from None
    if values.dim() != 1 or values.numel() != int(mask.sum()):
        raise ValueError(f"layer {layer!r} factor {name!r}: {tuple(values.shape)} values for {int(mask.sum())} "
                         f"mask bits (a compressed factor holds one value per set bit)")
    return mask


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
    """``(out, in)`` weight of an ``nn.Linear`` or HF ``Conv1D`` (:func:`~dsf_lightning.layers.weight_matrix`)."""
    if layer_kind(layer) in ("linear", "conv1d"):
        return weight_matrix(layer)
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
        if grouped(layer):
            raise ValueError(f"{cls}: {grouped(layer)}")
        return layer
