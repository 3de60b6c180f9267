"""Leaving the masked training form: the merged dense state dict, packed storage, CSR inference on CPU.

Three exits from a pruned model (one holding :mod:`dsf_lightning.modules` layers):

* :func:`merged_state_dict` -- the dense product ``S F`` (or ``W * mask``) of every pruned layer
  under the original layer's keys (``<name>.weight``, ``<name>.bias``): it loads with
  ``strict=True`` into a fresh instance of the original dense architecture.
* :func:`save_packed` / :func:`load_packed` -- the storage format of the paper (section 4.4,
  appendices A.4/A.5): per masked tensor only its nonzero values (in 16-bit floats) and its mask
  as a bit vector, in one ``safetensors`` file whose metadata holds the pruned structure as JSON
  (the layout of the compressed storage, :mod:`~dsf_lightning.modules.storage`, in a file).
* :func:`to_csr` -- swaps :class:`~dsf_lightning.modules.DSFLinear` /
  :class:`~dsf_lightning.modules.SparseLinear` for inference modules holding ``torch.sparse_csr``
  matrices (:class:`CSRDSFLinear` with two, :class:`CSRLinear` with one), the setting of the
  paper's appendix A.3 CPU benchmark.

Packed file layout (``format = "dsf-packed"``, ``version = "3"`` in the metadata):

* ``<name>.<param>.values``: ``param[mask]`` (row-major mask order) in the chosen ``dtype``, for
  every masked parameter (``first``/``second`` of DSF layers, ``weight`` of Sparse layers);
* ``<name>.<param>.mask``: ``uint8`` bits of the mask, 8 per byte, most significant bit first
  (``numpy.packbits`` order), zero padded at the end (:func:`~dsf_lightning.modules.storage.pack_bits`);
* every other entry of ``model.state_dict()`` (biases, BatchNorm parameters and running
  statistics, embeddings, unpruned layers) under its own key. Floating tensors are stored in the
  chosen ``dtype`` too -- the whole checkpoint is a 16-bit model, as in the paper's size
  accounting -- and integer/bool tensors (``num_batches_tracked``) keep their dtype.
  ``dtype=None`` keeps every tensor's own dtype (lossless for float32 models);
* metadata ``structure``: the model's structure spec as JSON
  (:func:`~dsf_lightning.persistence.structure.structure_spec`), which rebuilds every pruned module empty;
* metadata ``sha256``: :func:`packed_digest` of every tensor (name, dtype, shape, bytes) and the other
  metadata. safetensors checks the header's layout but not the data, so a flipped bit would load as a
  wrong value; the digest turns any corruption into an error naming the file. Version 2 files (no digest)
  still load, unverified.

Loading casts every value to the dtype of the receiving model, so the round trip is bit-exact
when the model's values are representable in the stored dtype and equals rounding otherwise.
Mask buffers are not stored as tensors: they are the unpacked bits. Either storage exports and loads
(the structure spec says which one the loaded modules take).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from safetensors.torch import save as st_save_bytes
from torch import Tensor, nn

from dsf_lightning.modules import DSFLinear, SparseLinear
from dsf_lightning.modules.attention import folded_state_dict
from dsf_lightning.modules.storage import factor_keys, pack_bits, scatter_values, unpack_bits
from dsf_lightning.persistence.files import atomic_path
from dsf_lightning.persistence.structure import (
    module_prefix,
    pruned_modules,
    replace_module,
    structure_applied,
    structure_spec,
)

__all__ = [
    "CSRDSFLinear",
    "CSRLinear",
    "PACKED_FORMAT",
    "PACKED_VERSION",
    "load_packed",
    "merged_state_dict",
    "pack_bits",
    "pack_model",
    "packed_digest",
    "packed_size_bytes",
    "save_packed",
    "to_csr",
    "unpack_bits",
]

PACKED_FORMAT = "dsf-packed"
PACKED_VERSION = "3"
_UNVERIFIED_VERSIONS = ("2",)  # written before the digest: loaded without it


# ------------------------------------------------------------------------------------ model helpers

# ------------------------------------------------------------------------------------------- merge

@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every pruned layer replaced by its dense weight and bias.

    Keys of a pruned layer ``name`` become ``<name>.weight`` (the product ``S F`` for DSF layers,
    ``weight * mask`` for Sparse ones, shaped as ``nn.Linear`` / ``nn.Conv2d`` weights) and
    ``<name>.bias`` (if any), so the result loads with ``strict=True`` into the original dense
    architecture. Tensors are detached; dtype and device are the model's. A Linear layer pruned
    from a transformers ``Conv1D`` (weight ``(in, out)``) gets the ``nn.Linear`` orientation
    ``(out, in)``: transpose it yourself for a ``Conv1D`` architecture.
    """
    state = model.state_dict()
    pruned = dict(pruned_modules(model))
    for name, m in pruned.items():
        p = module_prefix(name)
        for k in list(m.state_dict().keys()):
            state.pop(p + k, None)
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        out[k] = v.detach()
    for name, m in pruned.items():
        p = module_prefix(name)
        out[p + "weight"] = m.merged_weight().detach().clone()
        if m.bias is not None:
            out[p + "bias"] = m.bias.detach().clone()
    return folded_state_dict(model, out)  # exposed attention weights under their own names


# ------------------------------------------------------------------------------------------ packed

def _dtype_name(dtype: torch.dtype | None) -> str:
    return "none" if dtype is None else str(dtype).removeprefix("torch.")


def pack_model(model: nn.Module, dtype: torch.dtype | None = torch.float16
               ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata :func:`save_packed` writes (see the module docstring for the layout).

    Args:
        model: a model holding pruned modules (any number, also none).
        dtype: ``torch.float16``, ``torch.bfloat16`` (or any floating dtype) for the stored values and
            every other floating tensor; ``None`` keeps each tensor's dtype.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype or None, got {dtype}")
    cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype) if t.is_floating_point() else t)  # noqa: E731
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    for name, m in pruned_modules(model):
        p = module_prefix(name)
        for pname in m.factor_names:
            mask = m.factor_mask(pname)
            tensors[f"{p}{pname}.values"] = cast(m.factor(pname).detach()[mask]).cpu().contiguous()
            tensors[f"{p}{pname}.mask"] = pack_bits(mask).cpu()
            for k in factor_keys(pname):
                state.pop(p + k, None)
    for k, v in state.items():
        tensors[k] = cast(v.detach()).cpu().contiguous()
    # safetensors refuses tensors sharing storage (tied weights); copies are fine for a file.
    seen: set[int] = set()
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr()
        if v.numel() and ptr in seen:
            tensors[k] = v.clone()
        seen.add(ptr)
    metadata = {"format": PACKED_FORMAT, "version": PACKED_VERSION, "dtype": _dtype_name(dtype),
                "structure": json.dumps(structure_spec(model))}
    metadata["sha256"] = packed_digest(tensors, metadata)
    return tensors, metadata


def packed_digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 over the metadata (but ``sha256``) and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()


def save_packed(model: nn.Module, path: str | Path, dtype: torch.dtype | None = torch.float16) -> int:
    """Write ``model`` in the packed format to ``path`` (safetensors), atomically (a failed or interrupted
    write leaves the previous file at ``path``); returns the file size in bytes."""
    tensors, metadata = pack_model(model, dtype)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path).stat().st_size


def packed_size_bytes(model: nn.Module, dtype: torch.dtype | None = torch.float16) -> int:
    """Size in bytes of the file :func:`save_packed` would write (serialized in memory)."""
    tensors, metadata = pack_model(model, dtype)
    return len(st_save_bytes(tensors, metadata=metadata))


def _read_packed(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and metadata of a packed file, checked: ``FileNotFoundError``, or ``ValueError`` naming the
    file when it is truncated, corrupted (digest mismatch), not a packed file or of another version."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"load_packed: no such file {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"load_packed: {str(path)!r} is truncated or not a safetensors file ({e}); "
                         f"nothing was loaded") from e
    version = metadata.get("version")
    if ("sha256" in metadata or version == PACKED_VERSION) and metadata.get("sha256") != packed_digest(tensors,
                                                                                                     metadata):
        raise ValueError(f"load_packed: {str(path)!r} is corrupted: its contents do not match the sha256 digest "
                         f"written with them; nothing was loaded")
    if metadata.get("format") != PACKED_FORMAT:
        raise ValueError(f"load_packed: {path} is not a {PACKED_FORMAT!r} file (metadata format="
                         f"{metadata.get('format')!r})")
    if version not in (PACKED_VERSION, *_UNVERIFIED_VERSIONS):
        raise ValueError(f"load_packed: {path} has packed version {version!r}, this dsf-lightning "
                         f"reads version {PACKED_VERSION}; export it again with save_packed")
    try:
        json.loads(metadata["structure"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"load_packed: {str(path)!r} has no readable structure spec ({e})") from e
    return tensors, metadata


@torch.no_grad()
def load_packed(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a :func:`save_packed` file into ``model``, a fresh dense instance of the same architecture.

    The stored structure spec is applied first (:func:`~dsf_lightning.persistence.structure.apply_structure_spec`:
    every pruned layer must be the matching dense layer, or already that pruned module, else
    ``ValueError`` naming the layer), the pruned modules are filled with the unpacked values and masks,
    and every other tensor loads as in ``load_state_dict(strict=True)``. Values are cast to the receiving
    model's dtypes and devices. On any mismatch the model keeps its original modules. Returns ``model``.
    """
    tensors, metadata = _read_packed(path)
    spec = json.loads(metadata["structure"])
    with structure_applied(model, spec):
        expected = set(model.state_dict())
        for e in spec["modules"]:
            name = e["name"]
            m, p = model.get_submodule(name), module_prefix(name)
            for pname in m.factor_names:
                bits, values = tensors.pop(f"{p}{pname}.mask", None), tensors.pop(f"{p}{pname}.values", None)
                if bits is None or values is None:
                    raise ValueError(f"load_packed: layer {name!r} has no stored values/mask for {pname}")
                mask = unpack_bits(bits, m.factor_shape(pname))
                if values.numel() != int(mask.sum()):
                    raise ValueError(f"load_packed: layer {name!r} parameter {pname}: {values.numel()} values for "
                                     f"{int(mask.sum())} mask bits")
                m.set_factor_(pname, scatter_values(values, mask), mask)
                expected -= {p + k for k in factor_keys(pname)}
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise ValueError(f"load_packed: state mismatch: missing {missing[:10]}, unexpected {unexpected[:10]}")
        own = model.state_dict()
        for k in expected:
            own[k].copy_(tensors[k].to(device=own[k].device, dtype=own[k].dtype))
    return model


# --------------------------------------------------------------------------------------------- CSR

def _to_csr(dense: Tensor) -> Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        return dense.detach().to_sparse_csr()


class _CSRBase(nn.Module):
    """Inference-only layer ``(..., in) -> (..., out)`` running CSR matrices on ``x^T`` ``(in, tokens)``."""

    bias: Tensor | None
    in_features: int
    out_features: int

    def _matrices(self) -> list[Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        h = x.reshape(-1, self.in_features).T  # (in, tokens)
        for w in self._matrices():
            h = torch.sparse.mm(w, h)
        y = h.T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    @property
    def nnz(self) -> int:
        return sum(int(w.values().numel()) for w in self._matrices())


class CSRLinear(_CSRBase):
    """``y = x W^T + b`` with ``W`` a ``torch.sparse_csr`` ``(out, in)`` buffer (inference only, no grad).

    Build from a :class:`~dsf_lightning.modules.SparseLinear` with :meth:`from_module` (or via
    :func:`to_csr`). The input may have any leading dimensions.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight if weight.layout == torch.sparse_csr else _to_csr(weight))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_module(cls, m: SparseLinear) -> CSRLinear:
        return cls(_to_csr(m.factor("weight")), m.bias)

    def _matrices(self) -> list[Tensor]:
        return [self.weight]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}"


class CSRDSFLinear(_CSRBase):
    """``y = x F^T S^T + b`` with ``first`` ``F`` ``(rank, in)`` and ``second`` ``S`` ``(out, rank)`` as
    ``torch.sparse_csr`` buffers: two sparse products ``S (F x^T)`` (inference only, no grad)."""

    def __init__(self, first: Tensor, second: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.rank, self.in_features = first.shape
        self.out_features = second.shape[0]
        if second.shape[1] != self.rank:
            raise ValueError(f"CSRDSFLinear: second {tuple(second.shape)} does not match first {tuple(first.shape)}")
        self.register_buffer("first", first if first.layout == torch.sparse_csr else _to_csr(first))
        self.register_buffer("second", second if second.layout == torch.sparse_csr else _to_csr(second))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_module(cls, m: DSFLinear) -> CSRDSFLinear:
        return cls(_to_csr(m.factor("first")), _to_csr(m.factor("second")), m.bias)

    def _matrices(self) -> list[Tensor]:
        return [self.first, self.second]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"nnz={self.nnz}")


@torch.no_grad()
def to_csr(model: nn.Module) -> nn.Module:
    """Replace every ``DSFLinear`` / ``SparseLinear`` of ``model`` (in place) by :class:`CSRDSFLinear` /
    :class:`CSRLinear`; returns ``model``.

    For CPU inference (paper appendix A.3): the result has no gradients through those layers.
    ``DSFConv2d`` / ``SparseConv2d`` stay as they are -- a sparse convolution would need im2col
    plus CSR, which is not faster than the dense conv in PyTorch; merge them with ``to_dense()``
    for inference instead. A module that *is* a pruned Linear is returned converted.
    """
    if isinstance(model, DSFLinear):
        return CSRDSFLinear.from_module(model)
    if isinstance(model, SparseLinear):
        return CSRLinear.from_module(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, DSFLinear):
            replace_module(model, name, CSRDSFLinear.from_module(m))
        elif isinstance(m, SparseLinear):
            replace_module(model, name, CSRLinear.from_module(m))
    return model
