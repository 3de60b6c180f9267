"""The floating-point dtypes that weights (a model's, a teacher's, an export's) may be held in, by name."""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["DTYPES", "DTypeName", "dtype_named"]

DTypeName = Literal["float32", "bfloat16", "float16"]
#: the names the configs and command lines use -> the torch dtype
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_named(name: str, what: str = "dtype") -> torch.dtype:
    """The dtype called ``name``; ``ValueError`` naming ``what`` and the valid names otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{what} must be one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]
