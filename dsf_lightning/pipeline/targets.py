"""Which layers a prune targets: the model family's default rule, then ``include`` / ``exclude`` patterns.

Patterns are matched against full module names (as in ``model.named_modules()``); a name matches a
pattern when ``re.fullmatch(pattern, name)`` does *or* ``fnmatch.fnmatchcase(name, pattern)`` does,
so both ``r"layer\\d\\.0\\.conv1"`` and ``"*.self_attn.*_proj"`` work (a pattern that is not a valid
regex is used as a glob only).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping, Sequence
from typing import Literal

from torch import nn
from torch.nn.utils import parametrize

from dsf_lightning.layers import SUPPORTED, grouped, layer_kind, raw_weight_reason
from dsf_lightning.modules import ConvGeometry, DSFLinear, SparseLinear, is_pruned_module
from dsf_lightning.modules.attention import is_exposed

__all__ = ["FAMILIES", "Family", "as_patterns", "block_stacks", "detect_family", "find_targets", "matching",
           "unsupported"]

log = logging.getLogger(__name__)

Family = Literal["vision", "llm"]
#: Model families: each has a default target rule (:func:`find_targets`) and is the default DSF preset.
FAMILIES: tuple[Family, ...] = ("vision", "llm")


def as_patterns(value: Sequence[str] | str | None, what: str) -> tuple[str, ...] | None:
    """Target patterns as a tuple (a lone string is one pattern), else ``ValueError`` naming ``what``."""
    if value is None:
        return None
    if isinstance(value, str):  # a lone string would otherwise be iterated character by character
        value = [value]
    value = tuple(value)
    if not all(isinstance(p, str) for p in value):
        raise ValueError(f"{what} must be a sequence of strings, got {value!r}")
    return value


def matching(name: str, patterns: Sequence[str]) -> str | None:
    """The first pattern ``name`` matches (regex fullmatch or glob), else None."""
    for p in patterns:
        try:
            if re.fullmatch(p, name):
                return p
        except re.error:
            pass  # not a regex: glob only
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def detect_family(model: nn.Module) -> Family:
    """``"llm"`` for a model with a ``config`` having ``num_hidden_layers``/``n_layer`` or holding an
    ``nn.Embedding``; ``"vision"`` otherwise."""
    config = getattr(model, "config", None)
    if config is not None and any(hasattr(config, a) for a in ("num_hidden_layers", "n_layer")):
        return "llm"
    return "llm" if any(isinstance(m, nn.Embedding) for m in model.modules()) else "vision"


def _prunable(m: nn.Module) -> bool:
    """A dense prunable layer or an already pruned one (so a second prune finds it and refuses)."""
    return layer_kind(m) is not None or is_pruned_module(m)


def unsupported(model: nn.Module, skipped: Mapping[str, str]) -> dict[str, str]:
    """The entries of ``skipped`` (:func:`find_targets`) naming a module that is not a supported layer type at
    all (an ``include`` pattern named it), decided by the module's type, not by the reason's wording; entries
    naming a parameter (a weight no layer holds) are not among them."""
    modules = dict(model.named_modules())
    return {n: r for n, r in skipped.items() if n in modules and not _prunable(modules[n])}


def block_stacks(model: nn.Module) -> list[str]:
    """Names of the outermost stacks of repeated blocks: an ``nn.ModuleList``/``nn.Sequential`` whose
    items are all composite modules of one class holding a prunable layer (LLaMA ``model.layers``,
    GPT-2 ``transformer.h``, T5 ``encoder.block`` and ``decoder.block``)."""
    stacks: list[str] = []
    for name, m in model.named_modules():  # pre-order: an outer stack is seen before its insides
        if not isinstance(m, (nn.ModuleList, nn.Sequential)) or len(m) == 0:
            continue
        if any(name == s or name.startswith(s + ".") for s in stacks if s) or "" in stacks:
            continue
        items = list(m)
        if len({type(c) for c in items}) != 1 or not any(True for _ in items[0].children()):
            continue
        if any(_prunable(x) for x in items[0].modules()):
            stacks.append(name)
    return stacks


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name.startswith(prefix + ".")


def _family_rule(model: nn.Module, layers: list[tuple[str, nn.Module]], family: Family,
                 skipped: dict[str, str]) -> list[tuple[str, nn.Module]]:
    selected = []
    if family == "vision":
        first_conv = next((n for n, m in layers if isinstance(m, (nn.Conv2d, ConvGeometry))), None)
        head = next((n for n, m in reversed(layers)  # an attention weight's layer is no head (modules.attention)
                     if (layer_kind(m) in ("linear", "conv1d") or isinstance(m, (DSFLinear, SparseLinear)))
                     and not is_exposed(n)), None)
        for n, m in layers:
            if n == first_conv:
                skipped[n] = "first conv (kept dense: vision family default)"
            elif n == head:
                skipped[n] = "classifier head, the last Linear (kept dense: vision family default)"
            else:
                selected.append((n, m))
        return selected
    stacks = block_stacks(model)
    for n, m in layers:
        if any(_under(n, s) for s in stacks):
            selected.append((n, m))
        else:
            where = ", ".join(repr(s) for s in stacks) or "none found"
            skipped[n] = f"outside the repeated transformer blocks (llm family; blocks: {where})"
    return selected


def _report_dense_weights(model: nn.Module, targets: Mapping[str, nn.Module], skipped: dict[str, str],
                          include: Sequence[str] | None) -> None:
    """Add to ``skipped`` every weight of 2+ dims that stays dense and has no reason yet: a supported layer no
    ``include`` pattern matched (keyed by the layer's name), or a parameter of a module that is no prunable
    layer (keyed by the parameter's name: ``attn.in_proj_weight``, ``embed_tokens.weight``)."""
    for name, p in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        if p.dim() < 2 or owner_name in targets or owner_name in skipped:
            continue
        owner = model.get_submodule(owner_name)
        if is_pruned_module(owner):  # pruned before: its factors are the pruned weight
            continue
        if layer_kind(owner) is not None:
            skipped[owner_name] = f"not matched by the include patterns {list(include or ())}"
        else:
            skipped[name] = raw_weight_reason(owner, leaf)


def find_targets(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    family: Family | None = None,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Select the layers to prune.

    Supported layers: ``nn.Linear``, ``nn.Conv2d`` with ``groups == 1`` and HF ``Conv1D``.
    Without ``include`` the family's rule picks (the paper's defaults):

    * ``"vision"``: every Conv2d/Linear except the first Conv2d in ``named_modules`` order (the
      stem) and the last Linear (the classifier head: ``fc`` of torchvision/timm ResNets,
      ``head``/``head.fc`` of timm ViT/ConvNeXt).
    * ``"llm"``: every Linear/Conv1D inside the repeated transformer blocks, i.e. below an
      outermost ``nn.ModuleList``/``nn.Sequential`` of same-class blocks (LLaMA
      ``model.layers.N.self_attn.q_proj``..., GPT-2 ``transformer.h.N.attn.c_attn``...), so
      embeddings and ``lm_head`` stay dense.

    ``family=None`` detects it (:func:`detect_family`). ``include`` replaces the family's choice by
    the supported layers whose names match (an unsupported leaf module it matches is reported in
    ``skipped``; containers it matches are ignored, so broad patterns stay quiet); ``exclude`` then
    removes matches. Always left out, with a reason: convs with ``groups > 1``,
    ``nn.MultiheadAttention``'s ``out_proj`` (read as a weight, never called), the root module.

    Returns:
        ``(targets, skipped)``: ``{name: module}`` in module order, and ``{name: reason}`` for every weight of
        2+ dims left dense: a supported layer left out or an unsupported leaf module an ``include`` pattern
        named (keyed by the module's name), or a parameter of a module that is no prunable layer (keyed by
        the parameter's name: ``nn.MultiheadAttention``'s ``in_proj_weight``, embeddings, ...).

    Raises:
        ValueError: a selected layer is already pruned (``to_dense`` first, or exclude it); bad family.
    """
    include, exclude = as_patterns(include, "include"), as_patterns(exclude, "exclude") or ()
    if family is None:
        family = detect_family(model)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES} or None, got {family!r}")
    named = list(model.named_modules())
    layers = [(n, m) for n, m in named if _prunable(m)]
    skipped: dict[str, str] = {}
    if include is None:
        selected = _family_rule(model, layers, family, skipped)
    else:
        selected = []
        for n, m in named:
            pattern = matching(n, include)
            if pattern is None:
                continue
            if _prunable(m):
                selected.append((n, m))
            elif not any(True for _ in m.children()):  # containers matched by a broad pattern are silent
                skipped[n] = (f"{type(m).__name__} is not a supported layer type ({SUPPORTED}); "
                              f"matched by include pattern {pattern!r}")

    parents = dict(named)
    targets: dict[str, nn.Module] = {}
    pruned: list[str] = []
    for n, m in selected:
        pattern = matching(n, exclude)
        parent = parents.get(n.rpartition(".")[0]) if n else None
        if pattern is not None:
            skipped[n] = f"excluded by pattern {pattern!r}"
        elif is_pruned_module(m):
            pruned.append(f"{n!r} ({type(m).__name__})")
        elif n == "":
            skipped[n] = "the root module itself cannot be replaced"
        elif layer_kind(m) == "conv2d" and grouped(m):
            skipped[n] = grouped(m)
        elif isinstance(parent, nn.MultiheadAttention):
            # MultiheadAttention reads out_proj.weight directly instead of calling the module; once exposed
            # (modules.attention), the weight is its child layer's, a target of its own
            if not parametrize.is_parametrized(m, "weight"):
                skipped[n] = "inside nn.MultiheadAttention, which reads the weight without calling the layer"
        else:
            targets[n] = m
    if pruned:
        shown = ", ".join(pruned[:5]) + (f" and {len(pruned) - 5} more" if len(pruned) > 5 else "")
        raise ValueError(f"layer {shown} is already pruned; to_dense(model) first or exclude it")
    _report_dense_weights(model, targets, skipped, include)
    for n, reason in skipped.items():
        log.debug("not pruning %s: %s", n or "<root>", reason)
    return targets, skipped
