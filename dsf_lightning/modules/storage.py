"""The two storages of a pruned factor: masked dense, or compressed (nonzero values + packed mask bits).

* ``"masked"``: the factor is a full-size parameter times a bool mask buffer. Every masked zero has a
  gradient and optimizer state (zero, but stored).
* ``"compressed"`` (the paper's appendix A.4): the parameter is the 1-D ``values`` of the mask's
  entries in row-major order, the mask a ``uint8`` buffer of 8 bits per byte (:func:`pack_bits`). The
  dense factor exists only inside the forward (:func:`scatter_values`); gradients and optimizer state
  scale with the nonzeros, and entries outside the mask are not representable.

Bits are most significant first, zero padded at the end (``numpy.packbits`` order), the packed
export's layout too: a compressed module's state is its packed form.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["STORAGES", "Storage", "check_storage", "factor_keys", "pack_bits", "scatter_values", "unpack_bits"]

Storage = Literal["masked", "compressed"]
STORAGES: tuple[Storage, ...] = ("masked", "compressed")
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)
_TABLES: dict[torch.device, Tensor] = {}


def check_storage(storage: str) -> Storage:
    """``storage`` if it is one of :data:`STORAGES`, else ``ValueError`` saying what is valid."""
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    return storage  # type: ignore[return-value]


def factor_keys(factor: str) -> tuple[str, ...]:
    """The state-dict keys factor ``factor`` may have, relative to its module: the masked storage's
    parameter and mask, the compressed storage's values and bits."""
    return factor, f"{factor}_mask", f"{factor}_values", f"{factor}_bits"


def pack_bits(mask: Tensor) -> Tensor:
    """Bool ``mask`` (any shape) -> 1-D ``uint8`` of ``ceil(numel / 8)`` bytes, on ``mask``'s device.

    Row-major order, 8 entries per byte, most significant bit first; the last byte is zero padded.
    Inverse: :func:`unpack_bits` with the mask's shape.
    """
    flat = mask.detach().reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def _table(device: torch.device) -> Tensor:
    """``(256, 8)`` bool: the bits of every byte value, most significant first."""
    if device not in _TABLES:
        byte = torch.arange(256, dtype=torch.int32)[:, None]
        shifts = torch.arange(7, -1, -1, dtype=torch.int32)
        _TABLES[device] = ((byte >> shifts) & 1).to(device=device, dtype=torch.bool)
    return _TABLES[device]


def unpack_bits(bits: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """``uint8`` ``bits`` from :func:`pack_bits` -> bool mask of ``shape`` (on ``bits``' device)."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (n + 7) // 8:
        raise ValueError(f"unpack_bits: expected a 1-D uint8 tensor of {(n + 7) // 8} bytes for shape {shape}, "
                         f"got {bits.dtype} of shape {tuple(bits.shape)}")
    # one gather from a byte table: 8x fewer passes than shifting and masking every bit
    return torch.index_select(_table(bits.device), 0, bits.int()).reshape(-1)[:n].reshape(shape)


def scatter_values(values: Tensor, mask: Tensor) -> Tensor:
    """The dense tensor of ``mask``'s shape holding ``values (nnz,)`` at the mask's entries (row-major) and
    zero elsewhere; differentiable in ``values`` (its gradient is the dense gradient at the mask)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)
