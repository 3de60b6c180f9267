"""Fine-tuning training state of dense, single-mask and DSF (masked / compressed) LLaMA-2-7B shapes (paper Table 6).

Training state = trainable elements x (fp32 parameter + gradient + AdamW's two moments = 16 bytes) + every
buffer's bytes, read from the tensors of the project's own modules: one module per distinct shape is built
(masked ones on the meta device; compressed ones on the CPU, with a random pattern at the layer's nnz budget,
since the values count is data) and counted once per layer of that shape.

    python benchmarks/finetune_memory.py [--density 0.5]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from dsf_lightning.factorization import nnz_budget
from dsf_lightning.modules import DSFLinear, MaskedLayer, SparseLinear

GIB = 2 ** 30
ADAMW_BYTES = 16  # fp32 parameter, gradient, exp_avg, exp_avg_sq
# LLaMA-2-7B: 32 blocks of q/k/v/o (4096x4096), gate/up (11008x4096), down (4096x11008); untied embeddings
HIDDEN, INTER, BLOCKS, VOCAB = 4096, 11008, 32, 32000
SHAPES = {(HIDDEN, HIDDEN): 4 * BLOCKS, (INTER, HIDDEN): 2 * BLOCKS, (HIDDEN, INTER): BLOCKS}
DENSE_REST = 2 * VOCAB * HIDDEN + (2 * BLOCKS + 1) * HIDDEN  # embeddings, lm_head, RMSNorms: trained, not pruned


def state_bytes(m: nn.Module) -> int:
    """Trainable elements x 16 bytes + buffer bytes."""
    params = sum(p.numel() for p in m.parameters() if p.requires_grad) * ADAMW_BYTES
    return params + sum(b.numel() * b.element_size() for b in m.buffers())


def _random_pattern_(m: MaskedLayer, density: float, seed: int = 0) -> None:
    """Masks with the layer's nnz budget in total, spread over the factors by their sizes."""
    g = torch.Generator().manual_seed(seed)
    budget = nnz_budget(density, m.out_dim * m.fan_in)
    sizes = [torch.Size(m.factor_shape(n)).numel() for n in m.factor_names]
    for i, name in enumerate(m.factor_names):
        k = budget * sizes[i] // sum(sizes) if i < len(sizes) - 1 else budget - sum(
            budget * s // sum(sizes) for s in sizes[:-1])
        flat = torch.zeros(sizes[i], dtype=torch.bool)
        flat[torch.randperm(sizes[i], generator=g)[:k]] = True
        shape = m.factor_shape(name)
        m.set_factor_(name, torch.randn(shape, generator=g), flat.view(shape))


def layer_state(kind: str, out: int, in_: int, density: float) -> int:
    if kind == "dense":
        return (out * in_) * ADAMW_BYTES
    if kind == "single mask":
        return state_bytes(SparseLinear(in_, out, bias=False, device="meta"))
    m = DSFLinear(in_, out, min(out, in_), bias=False, device="meta" if kind == "DSF masked" else "cpu")
    if kind == "DSF masked":
        return state_bytes(m)
    _random_pattern_(m, density)
    m.set_storage_("compressed")
    return state_bytes(m)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--density", type=float, default=0.5)
    args = p.parse_args()
    rows = []
    for kind in ("dense", "single mask", "DSF masked", "DSF compressed"):
        pruned = sum(n * layer_state(kind, o, i, args.density) for (o, i), n in SHAPES.items())
        rows.append((kind, pruned + DENSE_REST * ADAMW_BYTES))
    dense = rows[0][1]
    print(f"LLaMA-2-7B shapes, AdamW fp32, density {args.density} (pruned layers), bytes from the modules' tensors")
    print("| model | training state | vs dense |\n|---|---:|---:|")
    for kind, b in rows:
        print(f"| {kind} | {b / GIB:.1f} GiB | {b / dense:.2f}x |")


if __name__ == "__main__":
    main()
