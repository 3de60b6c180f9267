"""Layer facts in one place: which layers can be pruned, their ``(out, fan_in)`` weight view and conv geometry.

A prunable layer's weight as a matrix is ``W`` ``(out, fan_in)``: ``nn.Linear.weight``,
``nn.Conv2d.weight.flatten(1)`` (``fan_in = in * kh * kw``, the order of ``F.unfold`` patches) and
``Conv1D.weight.T`` for Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2), whose stored
weight is ``(in, out)``. Grouped convolutions are not prunable here.

Conv geometry functions read ``kernel_size``, ``stride``, ``padding``, ``dilation`` and
``padding_mode`` attributes, so they serve ``nn.Conv2d`` and the pruned conv modules alike.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor, nn

__all__ = [
    "ATTENTION_INPUTS",
    "ATTENTION_WEIGHTS",
    "SUPPORTED",
    "LayerKind",
    "dense_signature",
    "signature",
    "explicit_padding",
    "fan_in",
    "grouped",
    "hf_conv1d_type",
    "linear_as_conv1d",
    "layer_kind",
    "pair",
    "raw_weight_reason",
    "weight_matrix",
]

LayerKind = Literal["linear", "conv1d", "conv2d"]
#: What :func:`layer_kind` accepts, for messages.
SUPPORTED = "nn.Linear, nn.Conv2d (groups=1), transformers Conv1D"
#: The weights ``nn.MultiheadAttention``'s forward reads as tensors (never calling a layer), each as row blocks
#: of one layer per name: ``in_proj_weight`` stacks the query, key and value projections.
ATTENTION_WEIGHTS: dict[str, tuple[str, ...]] = {"in_proj_weight": ("q", "k", "v"), "q_proj_weight": ("q",),
                                                 "k_proj_weight": ("k",), "v_proj_weight": ("v",)}
#: What each of those layers multiplies: an argument of ``nn.MultiheadAttention.forward``, or for ``o``
#: (``out_proj.weight``) the attention output before it.
ATTENTION_INPUTS: dict[str, str] = {"q": "query", "k": "key", "v": "value", "o": "attention"}
#: ``padding_mode`` of ``nn.Conv2d`` -> ``F.pad`` mode.
PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def hf_conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` if transformers is already imported (never imports it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def layer_kind(m: nn.Module) -> LayerKind | None:
    """The kind of a dense prunable layer, or ``None`` for anything else (pruned modules included).

    A grouped ``nn.Conv2d`` is ``"conv2d"`` too; :func:`fan_in` and the target rules refuse it.
    """
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    if isinstance(m, nn.Linear):
        return "linear"
    conv1d = hf_conv1d_type()
    if conv1d is not None and isinstance(m, conv1d):
        return "conv1d"
    return None


def weight_matrix(layer: nn.Module) -> Tensor:
    """``(out, fan_in)`` view of a dense layer's weight (detached, original dtype and device)."""
    kind = layer_kind(layer)
    if kind is None:
        raise ValueError(f"{type(layer).__name__} is not a prunable layer ({SUPPORTED})")
    w = layer.weight.detach()
    return w.flatten(1) if kind == "conv2d" else w.T if kind == "conv1d" else w


def grouped(conv: Any) -> str | None:
    """Why a conv (dense or pruned geometry) cannot be factorized here, or ``None``: a grouped/depthwise conv's
    weight is not one ``(out, fan_in)`` matrix over its input patches."""
    groups = getattr(conv, "groups", 1)
    return f"groups={groups} > 1 (depthwise/grouped convs are not factorized)" if groups != 1 else None


def raw_weight_reason(owner: nn.Module, leaf: str) -> str:
    """Why the parameter ``leaf`` (2+ dims) of ``owner``, a module that is no prunable layer, is left dense."""
    if isinstance(owner, nn.MultiheadAttention):
        return (f"{leaf} is read directly by nn.MultiheadAttention's forward (F.multi_head_attention_forward), "
                f"not through a layer")
    if isinstance(owner, nn.Embedding):
        return "an nn.Embedding table is looked up, not multiplied (kept dense)"
    return f"held by {type(owner).__name__} itself, not by a layer this prunes ({SUPPORTED})"


def fan_in(name: str, module: nn.Module) -> int:
    """Inputs per output of a dense prunable layer (``in * kh * kw`` for convs), else ``ValueError``."""
    kind = layer_kind(module)
    if kind == "conv2d":
        if grouped(module):
            raise ValueError(f"layer {name!r}: {grouped(module)}")
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    if kind == "linear":
        return module.in_features
    if kind == "conv1d":
        return module.weight.shape[0]
    raise ValueError(f"layer {name!r} of type {type(module).__name__} is not supported (expected {SUPPORTED})")


def pair(v: Any) -> tuple[int, int] | str:
    """``nn.Conv2d``'s normal form of a spatial argument: ``3 -> (3, 3)``; strings (``"same"``) stay."""
    return v if isinstance(v, str) else (int(v), int(v)) if isinstance(v, int) else tuple(int(i) for i in v)


def explicit_padding(conv: Any) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding of a conv, as torch applies it.

    ``"same"``: per spatial dim ``total = dilation * (k - 1)``, ``left = total // 2``,
    ``right = total - left`` (asymmetric for even effective kernels); ``"valid"``: 0.
    """
    padding = conv.padding
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"unknown string padding {padding!r} (expected 'same' or 'valid')")
        dilation, kernel = pair(conv.dilation), pair(conv.kernel_size)
        (th, tw) = [d * (k - 1) if padding == "same" else 0 for d, k in zip(dilation, kernel)]
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = pair(padding)
    return (pw, pw, ph, ph)


Signature = tuple[Literal["linear", "conv2d"], dict[str, Any]]


def signature(kind: Literal["linear", "conv2d"], attrs: Mapping[str, Any]) -> Signature:
    """What a pruned replacement must agree with, from a layer's attributes or a pruned module's constructor
    kwargs (a spec entry): ``("linear", in/out/bias)`` or ``("conv2d", channels, geometry, bias, groups)``."""
    if kind == "conv2d":
        return "conv2d", dict(in_channels=attrs["in_channels"], out_channels=attrs["out_channels"],
                              kernel_size=pair(attrs["kernel_size"]), stride=pair(attrs.get("stride", 1)),
                              padding=pair(attrs.get("padding", 0)), dilation=pair(attrs.get("dilation", 1)),
                              padding_mode=attrs.get("padding_mode", "zeros"), bias=attrs.get("bias", True),
                              groups=attrs.get("groups", 1))
    return "linear", dict(in_features=attrs["in_features"], out_features=attrs["out_features"],
                          bias=attrs.get("bias", True))


def dense_signature(layer: nn.Module) -> Signature | None:
    """:func:`signature` of a dense layer (Linear and Conv1D are ``"linear"``); ``None`` for anything else."""
    kind = layer_kind(layer)
    if kind == "conv2d":
        attrs = {a: getattr(layer, a) for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding",
                                                  "dilation", "padding_mode", "groups")}
        return signature("conv2d", {**attrs, "bias": layer.bias is not None})
    if kind is not None:
        out, in_ = weight_matrix(layer).shape
        return signature("linear", dict(in_features=in_, out_features=out, bias=layer.bias is not None))
    return None


def linear_as_conv1d(linear: nn.Linear) -> nn.Module:
    """The HF ``Conv1D`` computing ``linear``'s function (its stored weight is the transpose, ``(in, out)``;
    same dtype, device, training and grad flags). ``linear`` must have a bias, as every ``Conv1D`` does."""
    conv1d = hf_conv1d_type()(linear.out_features, linear.in_features).to(linear.weight)
    conv1d.weight.data.copy_(linear.weight.detach().T)
    conv1d.bias.data.copy_(linear.bias.detach())
    conv1d.train(linear.training)
    return conv1d.requires_grad_(linear.weight.requires_grad)
