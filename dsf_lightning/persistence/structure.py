"""The pruned structure of a model: its spec, rebuilding it in a dense model, save/load, back to dense.

A *structure spec* is the one JSON-serializable description of which layers are pruned and how::

    {"format": "dsf-lightning/structure", "version": 1,
     "modules": [{"name", "class", "kwargs", "method", "density"}, ...]}

``kwargs`` rebuild an empty pruned module (``cls(**kwargs)``); ``method`` and ``density`` are what the
prune asked for. Checkpoints (:func:`save_pruned`, the callback's ``checkpoint["dsf_structure"]``) and
the packed export carry it, so a fresh dense model can take a pruned state dict:

>>> save_pruned(model, "pruned.pt")                              # state dict + structure spec
>>> fresh = load_pruned(build_dense_model(), "pruned.pt")         # same function, bit for bit
>>> to_dense(fresh)                                               # plain nn.Linear / nn.Conv2d again
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from dsf_lightning.layers import Signature, dense_signature, layer_kind, linear_as_conv1d, signature
from dsf_lightning.modules import PRUNED_MODULE_TYPES, ConvGeometry, MaskedLayer, is_pruned_module
from dsf_lightning.modules.attention import Exposure, expose_attention, fold_attention, is_exposed
from dsf_lightning.persistence.files import read_torch_file, save_torch_file

__all__ = [
    "CHECKPOINT_KEY",
    "PRUNE_INFO_ATTR",
    "PrunedCheckpointMixin",
    "SHARDED_CHECKPOINT_META",
    "apply_structure_spec",
    "check_state_dict",
    "load_pruned",
    "merge",
    "module_prefix",
    "to_dense",
    "nonzeros_outside_masks",
    "pruned_modules",
    "replace_module",
    "save_pruned",
    "rebuild_sharded_structure",
    "structure_applied",
    "structure_spec",
]

SPEC_FORMAT = "dsf-lightning/structure"
SPEC_VERSION = 1
#: Where Lightning checkpoints of pruned runs hold the structure spec.
CHECKPOINT_KEY = "dsf_structure"
#: Per-module attribute holding ``{"method", "density"}`` of a pruned module. It lives on the module
#: (not on the model) so the spec stays right when the model is wrapped (e.g. in a LightningModule)
#: and names gain a prefix.
PRUNE_INFO_ATTR = "_dsf_prune_info"
_CLASSES: dict[str, type[MaskedLayer]] = {cls.__name__: cls for cls in PRUNED_MODULE_TYPES}


def pruned_modules(model: nn.Module) -> list[tuple[str, MaskedLayer]]:
    """``(name, module)`` of every pruned layer of ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if is_pruned_module(m)]


@torch.no_grad()
def nonzeros_outside_masks(model: nn.Module) -> int:
    """Entries of the pruned modules' masked parameters that are nonzero where their mask is off: 0 while the
    pruned pattern holds (a count over the tensors, for runs to prove their masks after fine-tuning)."""
    return sum(int(((p != 0) & ~m).sum()) for _, layer in pruned_modules(model) for p, m in layer.masked_parameters())


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted ``name`` (``"layer1.0.conv1"``, ``"model.layers.3.mlp.up_proj"``;
    ModuleList/Sequential indices included) and return the module it replaces."""
    if not name:
        raise ValueError("cannot replace the root module; pass a submodule name")
    try:
        old = model.get_submodule(name)
    except AttributeError as e:
        raise ValueError(f"no module named {name!r} in {type(model).__name__}") from e
    model.set_submodule(name, new)
    return old


def module_prefix(name: str) -> str:
    """The state-dict key prefix of the submodule ``name`` (``""`` for the model itself)."""
    return f"{name}." if name else ""


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


def _entry(name: str, m: MaskedLayer) -> dict[str, Any]:
    info = getattr(m, PRUNE_INFO_ATTR, None) or {"method": None, "density": float(m.density)}
    return {"name": name, "class": type(m).__name__, "kwargs": _jsonable(m.spec()),
            "method": info["method"], "density": info["density"]}


def structure_spec(model: nn.Module) -> dict[str, Any]:
    """JSON-serializable description of every pruned module of ``model`` (module docstring); ``density``
    is the requested one, or the achieved one for a module no prune made."""
    return {"format": SPEC_FORMAT, "version": SPEC_VERSION,
            "modules": [_entry(n, m) for n, m in pruned_modules(model)]}


def _spec_signature(cls: type[MaskedLayer], kwargs: Mapping[str, Any]) -> Signature:
    """The :func:`~dsf_lightning.layers.signature` of the dense layer a spec entry replaces."""
    return signature("conv2d" if issubclass(cls, ConvGeometry) else "linear", kwargs)


def _fmt(sig: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sig.items())


def _check_spec(spec: Any) -> list[dict[str, Any]]:
    if not isinstance(spec, Mapping) or spec.get("format") != SPEC_FORMAT or "modules" not in spec:
        raise ValueError(f"not a dsf-lightning structure spec (expected a dict with format={SPEC_FORMAT!r} "
                         f"and 'modules'), got {type(spec).__name__}")
    if spec.get("version") != SPEC_VERSION:
        raise ValueError(f"structure spec version {spec.get('version')!r} is not supported (expected {SPEC_VERSION})")
    return list(spec["modules"])


def _same_kwargs(m: MaskedLayer, kwargs: Mapping[str, Any]) -> bool:
    runtime = {"forward_mode"}  # a runtime choice, not structure
    mine = {k: v for k, v in _jsonable(m.spec()).items() if k not in runtime}
    return mine == {k: v for k, v in _jsonable(dict(kwargs)).items() if k not in runtime}


def _plan_entry(modules: Mapping[str, nn.Module], e: Mapping[str, Any]) -> nn.Module | None:
    """The empty pruned module entry ``e`` puts in place, or ``None`` when the layer already is that
    module; ``ValueError`` naming the layer when the model does not fit the entry."""
    name, cls_name = e.get("name"), e.get("class")
    cls = _CLASSES.get(cls_name)
    if cls is None:
        raise ValueError(f"layer {name!r}: unknown pruned module class {cls_name!r} (known: {sorted(_CLASSES)})")
    layer = modules.get(name) if name else None
    if layer is None:
        close = difflib.get_close_matches(str(name), [n for n, m in modules.items() if layer_kind(m)], n=3)
        raise ValueError(f"layer {name!r} of the structure spec is not in {type(modules['']).__name__}"
                         f"{f'; close names: {close}' if close else ''}")
    if is_pruned_module(layer):
        if type(layer) is cls and _same_kwargs(layer, e["kwargs"]):
            return None
        raise ValueError(f"layer {name!r} is already a {type(layer).__name__} {layer.spec()}, the structure spec "
                         f"has {cls_name} {e['kwargs']}; apply the spec to a dense model")
    try:
        expected_kind, expected = _spec_signature(cls, e["kwargs"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"layer {name!r}: malformed structure spec entry {e!r}") from err
    found = dense_signature(layer)
    if found != (expected_kind, expected):
        found_s = f"{type(layer).__name__}({_fmt(found[1])})" if found else type(layer).__name__
        raise ValueError(f"layer {name!r} does not match the structure spec: expected a dense {expected_kind} "
                         f"({_fmt(expected)}) for {cls_name}, found {found_s}")
    w = layer.weight
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in e["kwargs"].items()}
    new = cls(**kwargs, device=w.device, dtype=w.dtype)
    new.train(layer.training)
    new.requires_grad_(w.requires_grad)
    setattr(new, PRUNE_INFO_ATTR, {"method": e.get("method"), "density": e.get("density")})
    return new


@contextlib.contextmanager
def structure_applied(model: nn.Module, spec: Mapping[str, Any]) -> Iterator[nn.Module]:
    """:func:`apply_structure_spec` for the ``with`` block, undone if the block raises (the model then
    holds its original modules again): for loaders that fill the new modules and may find a mismatch."""
    entries = _check_spec(spec)
    # pruned attention weights live in layers that exposing nn.MultiheadAttention creates (modules.attention)
    exposure = expose_attention(model) if any(is_exposed(str(e.get("name"))) for e in entries) else Exposure()
    replaced = []
    try:
        modules = dict(model.named_modules())
        # check every entry before replacing anything: a bad spec leaves the model as it was
        plan = [(e["name"], new) for e in entries if (new := _plan_entry(modules, e)) is not None]
        exposure.keep_only({name for name, _ in plan})
        replaced = [(name, replace_module(model, name, new)) for name, new in plan]
        yield model
    except BaseException:
        for name, old in reversed(replaced):
            replace_module(model, name, old)
        exposure.undo()
        raise


def apply_structure_spec(model: nn.Module, spec: Mapping[str, Any]) -> nn.Module:
    """Rebuild the pruned structure of ``spec`` in ``model`` (in place; returns it).

    Every entry's name must hold a dense layer of the matching shape (``nn.Linear``/``Conv1D`` for
    ``DSFLinear``/``SparseLinear``, ``nn.Conv2d`` with the same geometry for the conv classes), which is
    replaced by an empty pruned module of the spec's shape on that layer's device and dtype, ready for
    ``load_state_dict``; or already hold exactly that pruned module, which stays. Otherwise
    ``ValueError`` naming the layer (expected vs found), before anything is replaced.
    """
    with structure_applied(model, spec):
        return model


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> None:
    """Strict key and shape check with an error naming the layers, before ``load_state_dict`` (which
    would copy the matching tensors before raising). Pruned factors may be in either storage; a compressed
    factor's values take the checkpoint's count of nonzeros."""
    state_dict = dict(state_dict)
    resized = set()
    for name, m in pruned_modules(model):
        m.state_to_storage_(state_dict, f"{name}." if name else "")
        if m.storage == "compressed":
            resized |= {f"{name}.{f}_values" if name else f"{f}_values" for f in m.factor_names}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state_dict.items()
              if k in own and k not in resized and isinstance(v, Tensor) and v.shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{label} ({len(xs)}): {xs[:5]}" for label, xs in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if xs]
        raise ValueError(f"checkpoint does not fit {type(model).__name__}: " + "; ".join(parts))


def save_pruned(model: nn.Module, path: str | os.PathLike) -> None:
    """``torch.save({"state_dict": model.state_dict(), "dsf_structure": structure_spec(model)}, path)``, atomically
    (a failed or interrupted save leaves the previous file at ``path``)."""
    save_torch_file({"state_dict": model.state_dict(), CHECKPOINT_KEY: structure_spec(model)}, path)


def load_pruned(model: nn.Module, source: str | os.PathLike | Mapping[str, Any],
                spec: Mapping[str, Any] | None = None) -> nn.Module:
    """Load a pruned checkpoint into ``model`` (dense, or already of the same pruned structure).

    Args:
        source: a path written by :func:`save_pruned`, the dict it holds
            (``{"state_dict", "dsf_structure"}``), or a bare state dict together with ``spec``.
        spec: the structure spec; default: the checkpoint's ``"dsf_structure"``.

    The structure is applied (:func:`apply_structure_spec`), then the state dict is loaded strictly.
    Any mismatch raises ``ValueError`` naming the layer(s)/keys and leaves ``model`` as it was; so does a
    truncated or corrupted file (:func:`~dsf_lightning.persistence.files.read_torch_file`, naming the file).
    """
    if isinstance(source, (str, os.PathLike)):
        source = read_torch_file(source, "save_pruned file")
    if not isinstance(source, Mapping):
        raise ValueError(f"load_pruned expects a path or a mapping, got {type(source).__name__}")
    if "state_dict" in source and CHECKPOINT_KEY in source:
        state_dict, spec = source["state_dict"], spec if spec is not None else source[CHECKPOINT_KEY]
    else:
        state_dict = source
    if spec is None:
        raise ValueError("no structure spec: pass spec=structure_spec(pruned_model), or a checkpoint from save_pruned")
    with structure_applied(model, spec):  # undone on a mismatch: the caller's model stays as it was
        check_state_dict(model, state_dict)
        model.load_state_dict(state_dict, strict=True)
    return model


@torch.no_grad()
def to_dense(model: nn.Module, layer_types: Mapping[str, str] | None = None) -> nn.Module:
    """Replace pruned modules by plain layers holding their dense product, in place (the way back from a prune).

    ``layer_types``: ``name -> class name of the dense layer it replaced`` (``PrunePlan.layer_types``): only
    those modules, and one that was an HF ``"Conv1D"`` comes back as a ``Conv1D``. Default: every pruned
    module, as ``nn.Linear`` / ``nn.Conv2d`` (a former ``Conv1D`` as the equivalent ``nn.Linear``). Training
    and grad flags are kept. Weights of ``nn.MultiheadAttention`` exposed as layers are folded back into plain
    parameters (:func:`~dsf_lightning.modules.attention.fold_attention`). Returns ``model`` (or the dense
    layer when ``model`` itself is a pruned module).
    """
    for name, m in pruned_modules(model):
        if layer_types is not None and name not in layer_types:
            continue
        dense = m.to_dense().requires_grad_(all(p.requires_grad for p in m.parameters()))
        if layer_types is not None and layer_types[name] == "Conv1D":
            dense = linear_as_conv1d(dense)
        if not name:  # the model itself is a pruned layer: nothing to put it into
            return dense
        replace_module(model, name, dense)
    return fold_attention(model)  # exposed attention weights: plain parameters again


#: the name this function had before (kept for callers of 0.1)
merge = to_dense


#: The file of a sharded Lightning checkpoint folder (``ModelParallelStrategy``) holding all but the tensors.
SHARDED_CHECKPOINT_META = "meta.pt"


@torch.no_grad()
def rebuild_sharded_structure(module: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Rebuild, in ``module`` (in place; returns it), the pruned structure of the sharded Lightning checkpoint
    ``folder`` (``ModelParallelStrategy``: a shard per rank, ``meta.pt``), each compressed factor sized to its
    saved count of nonzeros. A run resuming one calls it first::

        module = CausalLM(dense_model)
        rebuild_sharded_structure(module, folder)
        trainer.fit(module, ckpt_path=folder)

    Why not a hook: Lightning loads a sharded checkpoint into the model after sharding it
    (``configure_model``), in place, so every tensor must already have its saved size; a file checkpoint
    instead rebuilds the structure in ``on_load_checkpoint`` (:class:`PrunedCheckpointMixin`).
    A folder without a structure spec (a dense run) leaves ``module`` as it is.
    """
    from torch.distributed.checkpoint import FileSystemReader

    meta = read_torch_file(os.path.join(folder, SHARDED_CHECKPOINT_META), "sharded checkpoint metadata")
    spec = meta.get(CHECKPOINT_KEY)
    if spec is None:
        return module
    apply_structure_spec(module, spec)
    saved = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    for name, m in pruned_modules(module):
        if m.storage != "compressed":
            continue
        for f in m.factor_names:
            values = m.get_parameter(f"{f}_values")
            # Lightning saves the model's tensors under "state_dict"
            entry = saved.get(f"state_dict.{module_prefix(name)}{f}_values")
            if entry is not None and tuple(entry.size) != tuple(values.shape):
                values.data = values.new_zeros(tuple(entry.size))
    return module


class PrunedCheckpointMixin:
    """LightningModule mixin: ``load_from_checkpoint`` and resuming rebuild the pruned structure.

    Lightning calls ``on_load_checkpoint`` before it loads the state dict; this applies the
    checkpoint's ``"dsf_structure"`` there (:func:`apply_structure_spec`; a module already holding that
    structure is left as it is), so ``MyModule.load_from_checkpoint(path)`` returns the pruned model.
    Put it before ``LightningModule`` in the bases: ``class MyModule(PrunedCheckpointMixin, LightningModule)``.
    """

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        spec = checkpoint.get(CHECKPOINT_KEY)
        if spec is not None:
            apply_structure_spec(self, spec)  # type: ignore[arg-type]
        super().on_load_checkpoint(checkpoint)  # type: ignore[misc]
