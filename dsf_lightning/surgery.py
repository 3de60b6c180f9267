"""Model surgery: pick the layers to prune, swap pruned modules in and out, save/load the structure.

The workflow follows Hugging Face peft: find target modules by name, replace each by a wrapped
layer in place, merge back to plain layers when done, and keep state dicts loadable by rebuilding
the structure from a small JSON-serializable *structure spec* first.

>>> report = prune(model, 0.3, "dsf", calibration=loader)      # plain PyTorch entry point
>>> save_pruned(model, "pruned.pt")                             # state dict + structure spec
>>> fresh = load_pruned(build_dense_model(), "pruned.pt")        # same function, bit for bit
>>> merge(fresh)                                                 # plain nn.Linear / nn.Conv2d again

Orientation (ARCHITECTURE.md): a layer's weight as a matrix is ``W`` ``(out, fan_in)``:
``nn.Linear.weight``, ``nn.Conv2d.weight.flatten(1)`` (``fan_in = in*kh*kw``), and
``Conv1D.weight.T`` for Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2), whose stored
weight is ``(in, out)``.

Target patterns (``include`` / ``exclude``) are matched against full module names (as in
``model.named_modules()``); a name matches a pattern when ``re.fullmatch(pattern, name)`` does
*or* ``fnmatch.fnmatchcase(name, pattern)`` does, so both ``r"layer\\d\\.0\\.conv1"`` and
``"*.self_attn.*_proj"`` work (a pattern that is not a valid regex is used as a glob only).
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dsf_lightning.calibration import InputGramRecorder
from dsf_lightning.factorization import FACTORIZERS, Factorization, factorize, nnz_budget, square_factor_nnz
from dsf_lightning.modules import (
    PRUNED_MODULE_TYPES,
    DSFConv2d,
    DSFLinear,
    SparseConv2d,
    SparseLinear,
    is_pruned_module,
    pruned_module_from_factorization,
)

__all__ = [
    "LayerJob",
    "LayerRecord",
    "LayerResult",
    "PrunePlan",
    "PruneReport",
    "apply_structure_spec",
    "default_forward",
    "detect_preset",
    "find_targets",
    "load_pruned",
    "merge",
    "plan_prune",
    "prune",
    "replace_module",
    "save_pruned",
    "structure_spec",
]

log = logging.getLogger(__name__)

Preset = Literal["vision", "llm"]
SPEC_FORMAT = "dsf-lightning/structure"
SPEC_VERSION = 1
#: Per-module attribute holding ``{"method", "density"}`` of a pruned module. It lives on the module
#: (not on the model) so the spec stays right when the model is wrapped (e.g. in a LightningModule)
#: and names gain a prefix.
PRUNE_INFO_ATTR = "_dsf_prune_info"
#: Methods that cannot run without calibration Grams.
NEEDS_CALIBRATION = frozenset({"wanda"})
_PER_ROW_METHODS = frozenset({"wanda", "admm"})
_SUPPORTED = "nn.Linear, nn.Conv2d (groups=1), transformers Conv1D"
_PRUNED_BY_NAME: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in PRUNED_MODULE_TYPES}


# --------------------------------------------------------------------------------------------
# layer kinds and target selection
# --------------------------------------------------------------------------------------------
def _hf_conv1d_type() -> type | None:
    """``transformers.pytorch_utils.Conv1D`` if transformers is already imported (never imports it)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


def _kind(m: nn.Module) -> Literal["linear", "conv1d", "conv2d"] | None:
    """The dense layer kind of ``m``, or None for anything else (pruned modules included)."""
    if isinstance(m, nn.Conv2d):
        return "conv2d"
    if isinstance(m, nn.Linear):
        return "linear"
    conv1d = _hf_conv1d_type()
    if conv1d is not None and isinstance(m, conv1d):
        return "conv1d"
    return None


def _is_conv_like(m: nn.Module) -> bool:
    """Conv2d, dense or pruned: what the vision preset counts when it looks for the first conv."""
    return isinstance(m, (nn.Conv2d, DSFConv2d, SparseConv2d))


def _is_linear_like(m: nn.Module) -> bool:
    """Linear / Conv1D, dense or pruned: what the vision preset counts when it looks for the head."""
    return _kind(m) in ("linear", "conv1d") or isinstance(m, (DSFLinear, SparseLinear))


def _weight_matrix(layer: nn.Module) -> Tensor:
    """``(out, fan_in)`` view of a dense layer's weight (detached, original dtype and device)."""
    w = layer.weight.detach()
    kind = _kind(layer)
    if kind == "conv2d":
        return w.flatten(1)
    if kind == "conv1d":
        return w.T  # HF Conv1D stores (in, out)
    return w


def _as_patterns(patterns: Sequence[str] | str | None, what: str) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):  # a lone string would otherwise be iterated character by character
        patterns = [patterns]
    patterns = list(patterns)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{what} must be a sequence of strings, got {patterns!r}")
    return patterns


def _matching(name: str, patterns: Sequence[str]) -> str | None:
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


def detect_preset(model: nn.Module) -> Preset:
    """``"llm"`` for a model with a ``config`` having ``num_hidden_layers``/``n_layer`` or holding an
    ``nn.Embedding``; ``"vision"`` otherwise."""
    config = getattr(model, "config", None)
    if config is not None and any(hasattr(config, a) for a in ("num_hidden_layers", "n_layer")):
        return "llm"
    return "llm" if any(isinstance(m, nn.Embedding) for m in model.modules()) else "vision"


def _block_stacks(model: nn.Module) -> list[str]:
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
        if any(_kind(x) is not None or is_pruned_module(x) for x in items[0].modules()):
            stacks.append(name)
    return stacks


def _under(name: str, prefix: str) -> bool:
    return prefix == "" or name.startswith(prefix + ".")


def find_targets(
    model: nn.Module,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    preset: Preset | None = None,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Select the layers to prune.

    Supported layers: ``nn.Linear``, ``nn.Conv2d`` with ``groups == 1`` and HF ``Conv1D``.
    Without ``include`` the preset picks (the paper's defaults):

    * ``"vision"``: every Conv2d/Linear except the first Conv2d in ``named_modules`` order (the
      stem) and the last Linear (the classifier head: ``fc`` of torchvision/timm ResNets,
      ``head``/``head.fc`` of timm ViT/ConvNeXt).
    * ``"llm"``: every Linear/Conv1D inside the repeated transformer blocks, i.e. below an
      outermost ``nn.ModuleList``/``nn.Sequential`` of same-class blocks (LLaMA
      ``model.layers.N.self_attn.q_proj``..., GPT-2 ``transformer.h.N.attn.c_attn``...), so
      embeddings and ``lm_head`` stay dense.

    ``preset=None`` detects it (:func:`detect_preset`). ``include`` replaces the preset's choice by
    the supported layers whose names match (an unsupported leaf module it matches is reported in
    ``skipped``; containers it matches are ignored, so broad patterns stay quiet); ``exclude`` then
    removes matches. Patterns match full module names, by regex fullmatch or glob (module docstring).
    Always left out, with a reason: convs with ``groups > 1``, ``nn.MultiheadAttention``'s
    ``out_proj`` (read as a weight, never called), the root module.

    Returns:
        ``(targets, skipped)``: ``{name: module}`` in module order, and ``{name: reason}`` for every
        supported layer left out (preset rule, exclude pattern, grouped conv, ...) and every
        unsupported leaf module an ``include`` pattern named.

    Raises:
        ValueError: a selected layer is already pruned (``merge`` first, or exclude it); bad
            patterns or preset.
    """
    include_p = _as_patterns(include, "include")
    exclude_p = _as_patterns(exclude, "exclude") or []
    if preset is None:
        preset = detect_preset(model)
    if preset not in ("vision", "llm"):
        raise ValueError(f"preset must be 'vision', 'llm' or None, got {preset!r}")

    named = list(model.named_modules())
    # Layers the selection rules see: dense supported layers and pruned ones (so a second prune finds
    # the same layers and can refuse them).
    layers = [(n, m) for n, m in named if _kind(m) is not None or is_pruned_module(m)]
    skipped: dict[str, str] = {}
    selected: list[tuple[str, nn.Module]] = []

    if include_p is not None:
        for n, m in named:
            pattern = _matching(n, include_p)
            if pattern is None:
                continue
            if _kind(m) is not None or is_pruned_module(m):
                selected.append((n, m))
            elif not any(True for _ in m.children()):  # containers matched by a broad pattern are silent
                skipped[n] = f"{type(m).__name__} is not a supported layer type ({_SUPPORTED}); " \
                             f"matched by include pattern {pattern!r}"
    elif preset == "vision":
        first_conv = next((n for n, m in layers if _is_conv_like(m)), None)
        head = next((n for n, m in reversed(layers) if _is_linear_like(m)), None)
        for n, m in layers:
            if n == first_conv:
                skipped[n] = "first conv (kept dense: vision preset default)"
            elif n == head:
                skipped[n] = "classifier head, the last Linear (kept dense: vision preset default)"
            else:
                selected.append((n, m))
    else:
        stacks = _block_stacks(model)
        for n, m in layers:
            if any(_under(n, s) for s in stacks):
                selected.append((n, m))
            else:
                where = ", ".join(repr(s) for s in stacks) or "none found"
                skipped[n] = f"outside the repeated transformer blocks (llm preset; blocks: {where})"

    parents = dict(named)
    targets: dict[str, nn.Module] = {}
    pruned: list[str] = []
    for n, m in selected:
        pattern = _matching(n, exclude_p)
        parent = parents.get(n.rpartition(".")[0]) if n else None
        if pattern is not None:
            skipped[n] = f"excluded by pattern {pattern!r}"
        elif is_pruned_module(m):
            pruned.append(f"{n!r} ({type(m).__name__})")
        elif n == "":
            skipped[n] = "the root module itself cannot be replaced"
        elif isinstance(m, nn.Conv2d) and m.groups != 1:
            skipped[n] = f"groups={m.groups} > 1 (depthwise/grouped convs are not factorized)"
        elif isinstance(parent, nn.MultiheadAttention):
            # MultiheadAttention reads out_proj.weight directly instead of calling the module.
            skipped[n] = "inside nn.MultiheadAttention, which reads the weight without calling the layer"
        else:
            targets[n] = m
    if pruned:
        shown = ", ".join(pruned[:5]) + (f" and {len(pruned) - 5} more" if len(pruned) > 5 else "")
        raise ValueError(f"layer {shown} is already pruned; merge(model) first or exclude it")
    for n, reason in skipped.items():
        log.debug("not pruning %s: %s", n or "<root>", reason)
    return targets, skipped


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted ``name`` (``"layer1.0.conv1"``, ``"model.layers.3.mlp.up_proj"``;
    ModuleList/Sequential indices included) and return the module it replaces."""
    if not name:
        raise ValueError("cannot replace the root module; pass a submodule name")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        old = parent.get_submodule(child)
    except AttributeError as e:
        raise ValueError(f"no module named {name!r} in {type(model).__name__}") from e
    # setattr registers in parent._modules under the same key, for attribute and index names alike.
    setattr(parent, child, new)
    return old


# --------------------------------------------------------------------------------------------
# pruning
# --------------------------------------------------------------------------------------------
@dataclass
class LayerRecord:
    """One pruned layer. ``shape`` is ``(out, fan_in)``; errors are layer-wise
    ``tr((W - P) G (W - P)^T)`` (``||W - P||_F^2`` without calibration); ``error_vs_magnitude`` is
    ``error`` over magnitude pruning's error at the same density (< 1: better than magnitude)."""

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


@dataclass
class PruneReport:
    """What :func:`prune` did: per-layer records, skipped layers with reasons, totals."""

    method: str
    preset: str
    density: float
    layers: list[LayerRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    calibration_tokens: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def nnz(self) -> int:
        return sum(r.nnz for r in self.layers)

    @property
    def budget(self) -> int:
        return sum(r.budget for r in self.layers)

    @property
    def dense_numel(self) -> int:
        return sum(r.shape[0] * r.shape[1] for r in self.layers)

    def totals(self) -> dict[str, float | int]:
        """Numbers for ``logger.log_metrics``: layer counts, nnz, budget, achieved density over the
        pruned layers, mean relative error and mean error ratio to magnitude, seconds."""
        finite = lambda xs: [x for x in xs if math.isfinite(x)]  # noqa: E731
        rel = finite([r.relative_error for r in self.layers])
        ratio = finite([r.error_vs_magnitude for r in self.layers])
        return {
            "density": self.density, "layers": len(self.layers), "skipped": len(self.skipped),
            "nnz": self.nnz, "budget": self.budget,
            "dense_numel": self.dense_numel,
            "achieved_density": self.nnz / self.dense_numel if self.dense_numel else 0.0,
            "mean_relative_error": sum(rel) / len(rel) if rel else math.nan,
            "mean_error_vs_magnitude": sum(ratio) / len(ratio) if ratio else math.nan,
            "seconds": self.seconds,
        }

    def to_rows(self) -> list[dict[str, Any]]:
        """One flat dict per layer (``shape`` split into ``out``/``fan_in``), e.g. for a W&B table."""
        rows = []
        for r in self.layers:
            d = asdict(r)
            out, fan_in = d.pop("shape")
            rows.append({"name": d.pop("name"), "out": out, "fan_in": fan_in, **d})
        return rows


def _check_density(density: Any, where: str) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"{where} must be a number in (0, 1], got {density!r}")
    return float(density)


def _check_options(method: str, options: Mapping[str, Any]) -> None:
    """Unknown option names fail now, not after calibration and half the layers."""
    reserved = {"weight", "density", "gram", "name"} & set(options)
    if reserved:
        raise ValueError(f"factorization_options may not set {sorted(reserved)}: prune() passes them per layer")
    params = inspect.signature(FACTORIZERS[method]).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        valid = sorted(n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY and n != "name")
        raise ValueError(f"method {method!r} has no option(s) {unknown}; valid options: {valid}")


def _precheck(method: str, name: str, out: int, fan_in: int, density: float, opts: Mapping[str, Any]) -> None:
    """The budget checks the factorizers make, done for every layer before the first one runs."""
    budget = nnz_budget(density, out * fan_in)
    if budget < 1:
        raise ValueError(f"layer {name!r}: density {density} keeps no weight of a ({out}, {fan_in}) matrix; "
                         f"it needs density >= {1 / (out * fan_in):.3g}")
    if method == "dsf":
        share = opts.get("square_share")
        square_factor_nnz(opts["preset"] if share is None else share, density, out, fan_in, name)
    elif method in _PER_ROW_METHODS and int(density * fan_in) < 1:
        raise ValueError(f"layer {name!r}: method {method!r} keeps int(density * fan_in) weights per output row; "
                         f"density {density} keeps none of {fan_in} (needs >= {1 / fan_in:.3g})")
    elif method == "svd" and budget // (out + fan_in) < 1:
        raise ValueError(f"layer {name!r}: density {density} of ({out}, {fan_in}) is below rank 1 for 'svd'")


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Calibration forward used when :func:`prune` gets no ``forward``: moves tensors to the model's
    device, then ``model(**batch)`` for a mapping (HF tokenizer output), ``model(batch[0])`` for a
    tuple/list (an ``(inputs, targets)`` pair from a DataLoader), ``model(batch)`` otherwise."""
    p = next(model.parameters(), None)
    if p is not None:
        batch = _to_device(batch, p.device)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _record_grams(model: nn.Module, targets: Mapping[str, nn.Module], calibration: Iterable,
                  forward: Callable[[nn.Module, Any], Any]) -> tuple[dict[str, Tensor], dict[str, int]]:
    """Mean input Grams ``(fan_in, fan_in)`` of every target over the calibration batches, in eval mode
    without grad; every module's training flag is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), InputGramRecorder(model, targets) as rec:
            for batch in calibration:
                forward(model, batch)
    finally:
        for m, mode in modes.items():
            m.training = mode
    counts = rec.counts
    unseen = [n for n, c in counts.items() if c == 0]
    if unseen:
        raise ValueError(f"layer(s) {unseen[:5]} saw no calibration input (is the calibration iterable empty, "
                         f"or does the forward skip them?); exclude them or fix the forward")
    return rec.grams, counts


@dataclass
class PrunePlan:
    """What :func:`plan_prune` resolved, before any work: the targets in module order, skipped layers
    with reasons, the density of every target, the method's options (DSF's ``preset`` filled in)."""

    method: str
    density: float
    preset: str
    targets: dict[str, nn.Module]
    skipped: dict[str, str]
    densities: dict[str, float]
    options: dict[str, Any]


def plan_prune(
    model: nn.Module,
    density: float,
    method: str = "dsf",
    *,
    with_calibration: bool = False,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    preset: Preset | None = None,
    densities: Mapping[str, float] | None = None,
    forward_mode: Literal["auto", "fused", "sequential"] = "auto",
    factorization_options: Mapping[str, Any] | None = None,
) -> PrunePlan:
    """Every check :func:`prune` makes before it touches data or the model, as a :class:`PrunePlan`.

    For callers that record calibration Grams themselves (e.g. all-reduced across ranks) and want
    bad arguments to fail before that pass. ``with_calibration``: whether Grams will be given
    (methods needing calibration raise otherwise). Raises ``ValueError`` like :func:`prune`.
    """
    density = _check_density(density, "density")
    if method not in FACTORIZERS:
        raise ValueError(f"unknown method {method!r}; valid methods: {sorted(FACTORIZERS)}")
    if forward_mode not in ("auto", "fused", "sequential"):
        raise ValueError(f"forward_mode must be 'auto', 'fused' or 'sequential', got {forward_mode!r}")
    if method in NEEDS_CALIBRATION and not with_calibration:
        raise ValueError(f"method {method!r} needs calibration data: pass calibration=<iterable of batches>")
    resolved = detect_preset(model) if preset is None else preset
    opts = dict(factorization_options or {})
    _check_options(method, opts)
    if method == "dsf":
        opts.setdefault("preset", resolved)
    targets, skipped = find_targets(model, include=include, exclude=exclude, preset=resolved)
    if not targets:
        supported = sum(_kind(m) is not None for m in model.modules())
        raise ValueError(
            f"no layer to prune in {type(model).__name__}: searched {supported} supported layers ({_SUPPORTED}) "
            f"with preset={resolved!r}, include={include!r}, exclude={exclude!r}; skipped: "
            f"{dict(list(skipped.items())[:5])}")
    per_layer = {n: density for n in targets}
    for n, d in (densities or {}).items():
        if n not in targets:
            close = difflib.get_close_matches(str(n), list(targets), n=5, cutoff=0.5)
            why = f" (skipped: {skipped[n]})" if n in skipped else ""
            raise ValueError(f"densities names {n!r}, which is not a target layer{why}; "
                             f"close target names: {close or sorted(targets)[:5]}")
        per_layer[n] = _check_density(d, f"densities[{n!r}]")
    for n, layer in targets.items():
        out, fan_in = _weight_matrix(layer).shape
        _precheck(method, n, out, fan_in, per_layer[n], opts)
    return PrunePlan(method=method, density=density, preset=resolved, targets=targets, skipped=skipped,
                     densities=per_layer, options=opts)


@dataclass
class LayerJob:
    """One layer's factorization problem, as :func:`prune` hands it to an ``executor``.

    ``weight`` is the ``(out, fan_in)`` float32 matrix on the layer's device, ``gram`` the mean input
    Gram (float32, same device) or ``None`` (data-free). :meth:`run` solves it; ``cost`` is a
    relative work estimate (``out * fan_in * min(out, fan_in)``) for balancing jobs across workers.
    """

    name: str
    method: str
    weight: Tensor
    density: float
    gram: Tensor | None
    options: dict[str, Any]

    @property
    def cost(self) -> int:
        out, fan_in = self.weight.shape
        return out * fan_in * min(out, fan_in)

    def run(self) -> LayerResult:
        """Factorize with ``method`` and with magnitude pruning (the error baseline), timed."""
        t0 = time.perf_counter()
        with torch.no_grad():
            fact = factorize(self.method, self.weight, self.density, self.gram, name=self.name, **self.options)
            mag = fact if self.method == "magnitude" else factorize("magnitude", self.weight, self.density,
                                                                    self.gram, name=self.name)
        return LayerResult(fact, mag.error, mag.relative_error, time.perf_counter() - t0)


@dataclass
class LayerResult:
    """A solved :class:`LayerJob`: the factorization, magnitude pruning's error (absolute and
    relative) at the same density, and the seconds it took (on whichever worker ran it)."""

    factorization: Factorization
    magnitude_error: float
    magnitude_relative_error: float
    seconds: float


Executor = Callable[[Sequence[LayerJob]], Mapping[str, LayerResult]]


def prune(
    model: nn.Module,
    density: float,
    method: str = "dsf",
    *,
    calibration: Iterable | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    preset: Preset | None = None,
    densities: Mapping[str, float] | None = None,
    forward_mode: Literal["auto", "fused", "sequential"] = "auto",
    balance_norms: bool = True,
    progress: bool = True,
    factorization_options: Mapping[str, Any] | None = None,
    grams: Mapping[str, Tensor] | None = None,
    executor: Executor | None = None,
) -> PruneReport:
    """One-shot prune ``model`` in place: every target layer becomes a masked pruned module.

    Args:
        model: any ``nn.Module`` (torchvision/timm CNNs and ViTs, HF causal LMs, ...).
        density: kept fraction in ``(0, 1]``: every layer keeps at most ``floor(density * out * fan_in)``
            nonzeros (both factors together for DSF).
        method: a :data:`~dsf_lightning.factorization.FACTORIZERS` name (``"dsf"``, ``"magnitude"``,
            ``"wanda"``, ``"admm"``, ``"svd"``).
        calibration: batches for layer-wise pruning; input Grams of all targets are recorded in one
            pass (eval mode, no grad). ``None``: data-free projection (``G = I``).
        forward: ``forward(model, batch)`` running one batch; default :func:`default_forward`.
        include, exclude, preset: target selection, see :func:`find_targets`. The resolved preset is
            also DSF's ``preset`` option unless ``factorization_options`` sets it.
        densities: per-layer overrides ``{name: density}`` (names as in :func:`find_targets`).
        forward_mode: of DSF modules (``"auto"``, ``"fused"``, ``"sequential"``).
        balance_norms: balance the two factors' norms per rank channel (paper section 4.4).
        progress: tqdm bar over layers.
        factorization_options: extra keyword options of the method (e.g. ``{"outer_iters": 10}``).
        grams: precomputed mean input Grams ``{target name: (fan_in, fan_in)}`` instead of
            ``calibration`` (e.g. recorded per rank and all-reduced); must cover every target.
        executor: ``executor(jobs) -> {name: LayerResult}`` solving all :class:`LayerJob` s at once
            (e.g. split across ranks and broadcast back); the layers are swapped afterwards, in
            module order. Default: solve and swap one layer at a time, here.

    Returns:
        :class:`PruneReport`. The pruned structure is readable with :func:`structure_spec`.

    Raises:
        ValueError: bad arguments, no targets, an already pruned layer, a method needing
            calibration without it, a density too small for some layer: all before the model changes.
    """
    # (1) validate everything before any work: a bad argument must not cost a calibration pass.
    if calibration is not None and grams is not None:
        raise ValueError("pass either calibration or grams, not both")
    plan = plan_prune(model, density, method, with_calibration=calibration is not None or grams is not None,
                      include=include, exclude=exclude, preset=preset, densities=densities,
                      forward_mode=forward_mode, factorization_options=factorization_options)
    targets, opts = plan.targets, plan.options
    if grams is not None:
        missing = [n for n in targets if n not in grams]
        if missing:
            raise ValueError(f"grams has no Gram for target layer(s) {missing[:5]}")

    start = time.perf_counter()
    counts: dict[str, int] = {}
    if calibration is not None:
        grams, counts = _record_grams(model, targets, calibration, forward or default_forward)
    grams = dict(grams or {})

    report = PruneReport(method=method, preset=plan.preset, density=plan.density, skipped=plan.skipped,
                         calibration_tokens=counts)
    if executor is not None:
        jobs = [_job(name, layer, method, plan.densities[name], grams.get(name), opts)
                for name, layer in targets.items()]
        results = executor(jobs)
        jobs.clear()
        for name, layer in targets.items():
            report.layers.append(_swap_layer(model, name, layer, method, plan.densities[name], results[name],
                                             forward_mode, balance_norms))
        report.seconds = time.perf_counter() - start
        return report
    bar = tqdm(targets.items(), total=len(targets), desc=f"prune {method}", unit="layer", disable=not progress)
    done: list[str] = []
    try:
        for name, layer in bar:
            bar.set_postfix_str(name, refresh=False)
            report.layers.append(_prune_layer(model, name, layer, method, plan.densities[name], grams.get(name),
                                              opts, forward_mode, balance_norms))
            done.append(name)
    except Exception as e:
        # Budgets and options were checked up front, so this is unexpected (e.g. out of memory):
        # say which layers were already swapped so the caller knows the model is partly pruned.
        e.add_note(f"prune: {len(done)} of {len(targets)} layers were already replaced: {done[-3:]}...")
        raise
    finally:
        bar.close()
    report.seconds = time.perf_counter() - start
    return report


def _job(name: str, layer: nn.Module, method: str, density: float, gram: Tensor | None,
         opts: Mapping[str, Any]) -> LayerJob:
    # float32 on the layer's device: the math is not stable in half precision, and the module copies
    # the factors back into the layer's own dtype.
    w32 = _weight_matrix(layer).float()
    g = None if gram is None else gram.to(device=w32.device, dtype=torch.float32)
    return LayerJob(name=name, method=method, weight=w32, density=density, gram=g, options=dict(opts))


def _prune_layer(model: nn.Module, name: str, layer: nn.Module, method: str, density: float,
                 gram: Tensor | None, opts: Mapping[str, Any], forward_mode: str, balance_norms: bool) -> LayerRecord:
    result = _job(name, layer, method, density, gram, opts).run()
    return _swap_layer(model, name, layer, method, density, result, forward_mode, balance_norms)


def _swap_layer(model: nn.Module, name: str, layer: nn.Module, method: str, density: float, result: LayerResult,
                forward_mode: str, balance_norms: bool) -> LayerRecord:
    """Build the pruned module of ``result`` for ``layer``, put it in place, and describe it."""
    t0 = time.perf_counter()
    fact = result.factorization
    w = _weight_matrix(layer)
    with torch.no_grad():
        new = pruned_module_from_factorization(layer, fact, forward_mode=forward_mode)
        if balance_norms and isinstance(new, (DSFLinear, DSFConv2d)):
            new.balance_norms_()
    new.train(layer.training)
    new.requires_grad_(layer.weight.requires_grad)  # a frozen model stays frozen
    setattr(new, PRUNE_INFO_ATTR, {"method": method, "density": density})
    replace_module(model, name, new)
    out, fan_in = w.shape
    return LayerRecord(
        name=name, layer_type=type(layer).__name__, shape=(out, fan_in), method=method, density=density,
        nnz=new.nnz, budget=nnz_budget(density, out * fan_in), error=fact.error,
        relative_error=fact.relative_error, magnitude_relative_error=result.magnitude_relative_error,
        error_vs_magnitude=fact.error / result.magnitude_error if result.magnitude_error > 0 else math.nan,
        seconds=result.seconds + time.perf_counter() - t0, pruned_type=type(new).__name__)


# --------------------------------------------------------------------------------------------
# structure spec, save/load, merge
# --------------------------------------------------------------------------------------------
def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def structure_spec(model: nn.Module) -> dict[str, Any]:
    """JSON-serializable description of every pruned module of ``model``:
    ``{"format", "version", "modules": [{"name", "class", "kwargs", "method", "density"}, ...]}``
    (``kwargs`` rebuild an empty module: ``cls(**kwargs)``; ``density`` is the requested one, or the
    achieved one for a module :func:`prune` did not make)."""
    entries = []
    for name, m in model.named_modules():
        if not is_pruned_module(m):
            continue
        info = getattr(m, PRUNE_INFO_ATTR, None) or {"method": None, "density": float(m.density)}
        entries.append({"name": name, "class": type(m).__name__, "kwargs": _jsonable(m.spec()),
                        "method": info["method"], "density": info["density"]})
    return {"format": SPEC_FORMAT, "version": SPEC_VERSION, "modules": entries}


def _pair(v: Any) -> tuple[int, int] | str:
    return v if isinstance(v, str) else (v, v) if isinstance(v, int) else tuple(int(i) for i in v)


def _describe_dense(layer: nn.Module) -> tuple[str, dict[str, Any]] | None:
    """``(kind, signature)`` of a dense layer for comparison with a spec entry, or None."""
    kind = _kind(layer)
    if kind == "conv2d":
        return "conv2d", dict(in_channels=layer.in_channels, out_channels=layer.out_channels,
                              kernel_size=_pair(layer.kernel_size), stride=_pair(layer.stride),
                              padding=_pair(layer.padding), dilation=_pair(layer.dilation),
                              padding_mode=layer.padding_mode, bias=layer.bias is not None, groups=layer.groups)
    if kind in ("linear", "conv1d"):
        out, in_ = _weight_matrix(layer).shape
        return "linear", dict(in_features=in_, out_features=out, bias=layer.bias is not None)
    return None


def _describe_entry(cls: type[nn.Module], kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if cls in (DSFConv2d, SparseConv2d):
        return "conv2d", dict(in_channels=kwargs["in_channels"], out_channels=kwargs["out_channels"],
                              kernel_size=_pair(kwargs["kernel_size"]), stride=_pair(kwargs.get("stride", 1)),
                              padding=_pair(kwargs.get("padding", 0)), dilation=_pair(kwargs.get("dilation", 1)),
                              padding_mode=kwargs.get("padding_mode", "zeros"), bias=kwargs.get("bias", True),
                              groups=1)
    return "linear", dict(in_features=kwargs["in_features"], out_features=kwargs["out_features"],
                          bias=kwargs.get("bias", True))


def _fmt(sig: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sig.items())


def _check_spec(spec: Any) -> list[dict[str, Any]]:
    if not isinstance(spec, Mapping) or spec.get("format") != SPEC_FORMAT or "modules" not in spec:
        raise ValueError(f"not a dsf-lightning structure spec (expected a dict with format={SPEC_FORMAT!r} "
                         f"and 'modules'), got {type(spec).__name__}")
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"structure spec version {spec.get('version')!r} is not supported (expected {SPEC_VERSION})")
    return list(spec["modules"])


def _same_structure(model: nn.Module, entries: list[dict[str, Any]]) -> bool:
    """Whether ``model`` already holds exactly the pruned modules ``entries`` describe."""
    have = {e["name"]: (e["class"], e["kwargs"]) for e in structure_spec(model)["modules"]}
    want = {e["name"]: (e["class"], _jsonable(e["kwargs"])) for e in entries}
    return have == want


def _apply(model: nn.Module, spec: Mapping[str, Any]) -> list[tuple[str, nn.Module]]:
    """:func:`apply_structure_spec`, returning ``[(name, replaced module)]`` so a caller can undo it."""
    entries = _check_spec(spec)
    modules = dict(model.named_modules())
    plan: list[tuple[str, nn.Module]] = []
    for e in entries:  # check every entry before replacing anything: a bad spec leaves the model as it was
        name, cls_name = e.get("name"), e.get("class")
        cls = _PRUNED_BY_NAME.get(cls_name)
        if cls is None:
            raise ValueError(f"layer {name!r}: unknown pruned module class {cls_name!r} "
                             f"(known: {sorted(_PRUNED_BY_NAME)})")
        layer = modules.get(name)
        if layer is None or not name:
            close = difflib.get_close_matches(str(name), [n for n, m in modules.items() if _kind(m)], n=3)
            raise ValueError(f"layer {name!r} of the structure spec is not in {type(model).__name__}"
                             f"{f'; close names: {close}' if close else ''}")
        if is_pruned_module(layer):
            raise ValueError(f"layer {name!r} is already pruned ({type(layer).__name__}); "
                             f"apply the spec to a dense model")
        try:
            expected_kind, expected = _describe_entry(cls, e["kwargs"])
        except (KeyError, TypeError) as err:
            raise ValueError(f"layer {name!r}: malformed structure spec entry {e!r}") from err
        found = _describe_dense(layer)
        if found != (expected_kind, expected):
            found_s = f"{type(layer).__name__}({_fmt(found[1])})" if found else type(layer).__name__
            raise ValueError(f"layer {name!r} does not match the structure spec: expected a dense {expected_kind} "
                             f"({_fmt(expected)}) for {cls_name}, found {found_s}")
        w = layer.weight
        new = cls(**e["kwargs"], device=w.device, dtype=w.dtype)
        new.train(layer.training)
        new.requires_grad_(w.requires_grad)
        setattr(new, PRUNE_INFO_ATTR, {"method": e.get("method"), "density": e.get("density")})
        plan.append((name, new))
    return [(name, replace_module(model, name, new)) for name, new in plan]


def apply_structure_spec(model: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild the pruned structure of ``spec`` in a dense ``model`` (in place; returns it).

    Every entry's name must hold a dense layer of the matching shape (``nn.Linear``/``Conv1D`` for
    ``DSFLinear``/``SparseLinear``, ``nn.Conv2d`` with the same geometry for the conv classes); it is
    replaced by an empty pruned module of the spec's shape on that layer's device and dtype, ready
    for ``load_state_dict``. Raises ``ValueError`` naming the layer (expected vs found) otherwise,
    before anything is replaced.
    """
    _apply(model, spec)
    return model


def _check_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Strict key and shape check with an error naming the layers, before ``load_state_dict`` (which
    would copy the matching tensors before raising)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and isinstance(v, Tensor) and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(xs)}): {xs[:5]}" for label, xs in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if xs]
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(parts))


def save_pruned(model: nn.Module, path: str | os.PathLike) -> None:
    """``torch.save({"state_dict": model.state_dict(), "dsf_structure": structure_spec(model)}, path)``."""
    torch.save({"state_dict": model.state_dict(), "dsf_structure": structure_spec(model)}, path)


def load_pruned(model: nn.Module, source: str | os.PathLike | Mapping[str, Any],
                spec: Mapping[str, Any] | None = None) -> nn.Module:
    """Load a pruned checkpoint into ``model`` (dense, or already of the same pruned structure).

    Args:
        source: a path written by :func:`save_pruned`, the dict it holds
            (``{"state_dict", "dsf_structure"}``), or a bare state dict together with ``spec``.
        spec: the structure spec; default: the checkpoint's ``"dsf_structure"``.

    The structure is applied (:func:`apply_structure_spec`) unless the model already has it, then the
    state dict is loaded strictly. Any mismatch raises ``ValueError`` naming the layer(s)/keys and
    leaves ``model`` as it was.
    """
    if isinstance(source, (str, os.PathLike)):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping):
        raise ValueError(f"load_pruned expects a path or a mapping, got {type(source).__name__}")
    if "state_dict" in source and "dsf_structure" in source:
        state_dict, spec = source["state_dict"], spec if spec is not None else source["dsf_structure"]
    else:
        state_dict = source
    if spec is None:
        raise ValueError("no structure spec: pass spec=structure_spec(pruned_model), or a checkpoint from save_pruned")
    entries = _check_spec(spec)
    replaced = [] if _same_structure(model, entries) else _apply(model, spec)
    try:
        _check_state_dict(model, state_dict)
        model.load_state_dict(state_dict, strict=True)
    except Exception:
        for name, old in reversed(replaced):  # undo: the caller's model stays dense
            replace_module(model, name, old)
        raise
    return model


def merge(model: nn.Module) -> nn.Module:
    """Replace every pruned module by a plain ``nn.Linear``/``nn.Conv2d`` holding its dense product
    (``to_dense``; a layer that was an HF ``Conv1D`` becomes the equivalent ``nn.Linear``). In place;
    returns ``model`` (or the dense layer when ``model`` itself is a pruned module)."""
    pruned = [(n, m) for n, m in model.named_modules() if is_pruned_module(m)]
    for name, m in pruned:
        dense = m.to_dense()
        dense.requires_grad_(all(p.requires_grad for p in m.parameters()))
        if not name:  # the model itself is a pruned layer: nothing to put it into
            return dense
        replace_module(model, name, dense)
    return model
