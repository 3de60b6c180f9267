"""``nn.MultiheadAttention``'s directly read weights as layers: expose them, feed them their inputs, fold them back.

``nn.MultiheadAttention`` never calls a layer for its projections: ``F.multi_head_attention_forward`` reads
``in_proj_weight`` (or ``q/k/v_proj_weight`` when the key and value dimensions differ) and
``out_proj.weight`` as tensors. :func:`expose_attention` keeps the modules and their classes (``isinstance``
still holds) and turns each of these weights into layers with ``torch.nn.utils.parametrize``:
``in_proj_weight`` is computed on every access as ``cat(q.weight, k.weight, v.weight)`` from three
``nn.Linear`` children of its parametrization (``<mha>.parametrizations.in_proj_weight.0.{q,k,v}``), and
``out_proj.weight`` from one (``<mha>.out_proj.parametrizations.weight.0.o``; the bias stays on
``out_proj``). The pruning pipeline targets and replaces these children as any other ``nn.Linear``, and every
code path that reads the weights keeps working. The stored originals are empty tensors: no dense copy is kept.

>>> exposure = expose_attention(model)          # same function, bit for bit; exposure.layers: the new layers
>>> with feeding(model): model(x)               # the exposed layers are called on their inputs (calibration)
>>> fold_attention(model)                       # plain weights again, holding the current products
>>> exposure.undo()                             # or: back to the very parameters there were before

The exposed layers get no input in the module's own forward; :func:`feeding` calls them on their inputs for
the calibration hooks: ``query`` / ``key`` / ``value`` for the projections, and for ``o`` the attention output
before ``out_proj``, obtained by running the attention again with the identity as ``out_proj``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dsf_lightning.layers import ATTENTION_INPUTS, ATTENTION_WEIGHTS

__all__ = ["Exposure", "StackedWeight", "expose_attention", "exposed_layers", "feeding", "fold_attention",
           "folded_state_dict", "is_exposed"]



def _weight_of(layer: nn.Module) -> Tensor:
    """``(out, in)`` weight of a dense ``nn.Linear`` or of the pruned module that replaced it (differentiable)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    if not hasattr(layer, "dense_weight"):
        raise TypeError(f"{type(layer).__name__} cannot stand for an attention weight: it has no dense_weight()")
    return layer.dense_weight()


class StackedWeight(nn.Module):
    """Parametrization: a weight computed as the row-wise concatenation of its child layers' weights.

    Args:
        weight: ``(sum of rows, in)``: the weight it replaces, split into ``len(names)`` equal row blocks.
        names: the child layers, one per block (``("q", "k", "v")`` for ``in_proj_weight``).
    """

    def __init__(self, weight: Tensor, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        rows = weight.shape[0] // len(names)
        for name, block in zip(names, weight.detach().split(rows), strict=True):
            layer = nn.Linear(weight.shape[1], rows, bias=False, device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                layer.weight.copy_(block)
            layer.weight.requires_grad_(weight.requires_grad)
            self.add_module(name, layer)

    def forward(self, original: Tensor) -> Tensor:
        """The weight from the child layers (``original`` is the empty placeholder parametrize keeps)."""
        weights = [_weight_of(getattr(self, n)) for n in self.names]
        return weights[0] if len(weights) == 1 else torch.cat(weights)

    def right_inverse(self, weight: Tensor) -> Tensor:
        """The placeholder parametrize stores as the original: empty, so no dense copy is held."""
        return weight.new_empty(0)


def _owners(mha: nn.MultiheadAttention) -> list[tuple[nn.Module, str, tuple[str, ...]]]:
    """``(module, weight name, child names)`` of every weight ``mha``'s forward reads directly."""
    found = [(mha, w, names) for w, names in ATTENTION_WEIGHTS.items() if getattr(mha, w, None) is not None]
    return [*found, (mha.out_proj, "weight", ("o",))]


def is_exposed(name: str) -> bool:
    """Whether the module or state-dict key ``name`` lies inside a parametrization (an exposed weight's layer)."""
    return ".parametrizations." in f".{name}"


def _layer_name(mha_name: str, in_out_proj: bool, weight: str, layer: str) -> str:
    """The module name of an exposed layer: ``<mha>[.out_proj].parametrizations.<weight>.0.<layer>``."""
    owner = f"{mha_name}.out_proj" if in_out_proj else mha_name
    return f"{owner}.parametrizations.{weight}.0.{layer}" if owner else f"parametrizations.{weight}.0.{layer}"


@dataclass
class Exposure:
    """What :func:`expose_attention` changed: the new layers by name, and the parameters they stand for."""

    layers: dict[str, nn.Linear] = field(default_factory=dict)
    _originals: list[tuple[nn.Module, str, nn.Parameter, list[str]]] = field(default_factory=list)

    def keep_only(self, names: Collection[str]) -> int:
        """Undo the exposures none of whose layers is in ``names`` (what a prune does not target); returns
        how many were undone."""
        kept = []
        for entry in self._originals:
            if any(n in names for n in entry[3]):
                kept.append(entry)
            else:
                self._restore(entry)
        undone, self._originals = len(self._originals) - len(kept), kept
        return undone

    def undo(self) -> None:
        """Put back the very parameters there were before (the same objects, their values from the layers,
        which must hold them unchanged: dense, as exposed), newest first."""
        while self._originals:
            self._restore(self._originals.pop())

    def _restore(self, entry: tuple[nn.Module, str, nn.Parameter, list[str]]) -> None:
        module, weight, original, names = entry
        for n in names:
            self.layers.pop(n, None)
        if not parametrize.is_parametrized(module, weight):  # folded since: it holds its own weight now
            return
        with torch.no_grad():
            value = getattr(module, weight).detach().clone()  # the layers still hold the exact blocks
        # parametrize emptied the very parameter object and keeps it as the placeholder: refill it
        parametrize.remove_parametrizations(module, weight, leave_parametrized=False)
        original.data = value


def expose_attention(model: nn.Module) -> Exposure:
    """Expose the directly read weights of every ``nn.MultiheadAttention`` in ``model`` as ``nn.Linear``
    layers (module docstring), in place; the model computes exactly what it computed. Weights exposed before
    are left as they are."""
    exposure = Exposure()
    for mha_name, mha in list(model.named_modules()):
        if not isinstance(mha, nn.MultiheadAttention):
            continue
        for module, weight, names in _owners(mha):
            if parametrize.is_parametrized(module, weight):
                continue
            original = getattr(module, weight)
            stacked = StackedWeight(original, names)
            parametrize.register_parametrization(module, weight, stacked, unsafe=True)
            module.parametrizations[weight].original.requires_grad_(False)  # the empty placeholder
            new = {_layer_name(mha_name, module is not mha, weight, n): getattr(stacked, n) for n in names}
            exposure.layers.update(new)
            exposure._originals.append((module, weight, original, list(new)))
    return exposure


def exposed_layers(model: nn.Module) -> dict[str, tuple[nn.MultiheadAttention, str]]:
    """``layer name -> (its nn.MultiheadAttention, what it multiplies)`` of every exposed layer in ``model``:
    ``"query"``, ``"key"``, ``"value"``, or ``"attention"`` (the attention output before ``out_proj``)."""
    out: dict[str, tuple[nn.MultiheadAttention, str]] = {}
    for mha_name, mha in model.named_modules():
        if not isinstance(mha, nn.MultiheadAttention):
            continue
        for module, weight, names in _owners(mha):
            if parametrize.is_parametrized(module, weight):
                out.update({_layer_name(mha_name, module is not mha, weight, n): (mha, ATTENTION_INPUTS[n])
                            for n in names})
    return out


def _inputs(args: tuple, kwargs: dict) -> dict[str, Any]:
    """``query``, ``key``, ``value`` and the other arguments of an ``nn.MultiheadAttention`` call, by name."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
             "is_causal")
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _attention(mha: nn.MultiheadAttention, call: dict[str, Any]) -> Tensor:
    """The attention output before ``out_proj``: ``nn.MultiheadAttention.forward``'s general path (the one it
    takes in training) with the identity as ``out_proj``."""
    query, key, value = call["query"], call["key"], call["value"]
    if mha.batch_first and query.dim() == 3:
        query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    separate = not mha._qkv_same_embed_dim
    weight = mha.out_proj.weight
    out, _ = F.multi_head_attention_forward(
        query, key, value, mha.embed_dim, mha.num_heads, None if separate else mha.in_proj_weight,
        mha.in_proj_bias, mha.bias_k, mha.bias_v, mha.add_zero_attn, mha.dropout,
        torch.eye(mha.embed_dim, dtype=weight.dtype, device=weight.device), None, training=mha.training,
        key_padding_mask=call.get("key_padding_mask"), need_weights=False, attn_mask=call.get("attn_mask"),
        use_separate_proj_weight=separate, q_proj_weight=mha.q_proj_weight if separate else None,
        k_proj_weight=mha.k_proj_weight if separate else None, v_proj_weight=mha.v_proj_weight if separate else None,
        is_causal=call.get("is_causal", False))
    return out.transpose(1, 0) if mha.batch_first and query.dim() == 3 else out


def _feeder(layers: dict[str, nn.Module]):
    """A forward hook calling each of ``layers`` (role -> layer) of one module on what it multiplies."""

    def hook(mha: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> None:
        call = _inputs(args, kwargs)
        for role, layer in layers.items():
            layer(_attention(mha, call) if role == "attention" else call[role])

    return hook


@contextlib.contextmanager
def feeding(model: nn.Module, only: Collection[str] | None = None) -> Iterator[None]:
    """Within the block, every exposed ``nn.MultiheadAttention`` also calls its exposed layers (those named in
    ``only``, default all) on what they multiply after its forward (their outputs are dropped), so forward
    hooks on them see their inputs: for calibration Grams. ``o`` costs one more attention per call."""
    per_module: dict[int, tuple[nn.MultiheadAttention, dict[str, nn.Module]]] = {}
    for name, (mha, role) in exposed_layers(model).items():
        if only is None or name in only:
            per_module.setdefault(id(mha), (mha, {}))[1][role] = model.get_submodule(name)
    handles = [mha.register_forward_hook(_feeder(layers), with_kwargs=True) for mha, layers in per_module.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fold_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`expose_attention` keeping the current weights: every exposed weight becomes a plain
    parameter again, under its original name, holding the current product of its layers (pruned or not).
    In place; returns ``model``."""
    for _, mha in list(model.named_modules()):
        if not isinstance(mha, nn.MultiheadAttention):
            continue
        for module, weight, _ in _owners(mha):
            if parametrize.is_parametrized(module, weight):
                requires_grad = any(p.requires_grad for p in module.parametrizations[weight][0].parameters())
                parametrize.remove_parametrizations(module, weight, leave_parametrized=True)
                getattr(module, weight).requires_grad_(requires_grad)
    return model


def folded_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` (of ``model``) with every exposed weight's keys (``X.parametrizations.W.*``) replaced by the
    weight itself under its original key ``X.W`` (detached): what the folded model's state dict holds."""
    out = {k: v for k, v in state.items() if not is_exposed(k)}
    for name, module in model.named_modules():
        for weight in getattr(module, "parametrizations", {}) if parametrize.is_parametrized(module) else ():
            out[f"{name}.{weight}" if name else weight] = getattr(module, weight).detach()
    return out
