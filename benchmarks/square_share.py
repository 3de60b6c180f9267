"""How much of a layer's budget should DSF's square factor get? (the ``"vision"`` preset's rule)

For every layer the vision preset prunes in a trained ResNet-20, factorize the weight (data-free
projection, library defaults otherwise) with the square factor given a fraction ``f`` of the
layer's nonzero budget, and print the DSF / magnitude error ratio per layer shape and its mean
over layers. ``old`` is the reference code's ``max(0.05, density / 2)`` share of ``r^2``.

Dense weights: what ``make demo`` saves, e.g.::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/square_share.py \\
        lightning_logs/demo/resnet20-32-dense-s0.pt --width 32 --densities 0.05 0.1 0.2
"""

from __future__ import annotations

import argparse
import collections
import math

import torch

from dsf_lightning.factorization import factorize
from dsf_lightning.factorization.dsf import vision_square_share
from dsf_lightning.models import resnet20
from dsf_lightning.surgery import find_targets


def share_for(rule: str | float, density: float, out: int, fan_in: int) -> float:
    """The square factor's own density under ``rule`` (``"old"`` or a budget fraction)."""
    if rule == "old":
        return max(0.05, density / 2)
    return vision_square_share(density, out, fan_in, float(rule))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", help="ResNet-20 state dict (the demo's dense weights)")
    p.add_argument("--width", type=int, choices=(16, 32), default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--densities", type=float, nargs="+", default=[0.1])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    a = p.parse_args()
    torch.set_num_threads(1)
    model = resnet20(a.num_classes, width=a.width)
    model.load_state_dict(torch.load(a.weights, map_location="cpu", weights_only=True))
    targets, _ = find_targets(model, preset="vision")
    rules: list[str | float] = ["old", *a.fractions]
    for density in a.densities:
        by_shape: dict[tuple[int, int], dict[str | float, list[float]]] = collections.defaultdict(
            lambda: collections.defaultdict(list))
        magnitude_rel = []
        for layer in targets.values():
            w = layer.weight.detach().flatten(1).float()
            mag = factorize("magnitude", w, density)
            magnitude_rel.append(mag.relative_error)
            for rule in rules:
                share = share_for(rule, density, *w.shape)
                err = factorize("dsf", w, density, square_share=share).error
                by_shape[tuple(w.shape)][rule].append(err / mag.error)
        print(f"\ndensity {density}: DSF / magnitude error (magnitude relative error, mean over layers: "
              f"{sum(magnitude_rel) / len(magnitude_rel):.3f})")
        print("| shape | layers | " + " | ".join("old" if r == "old" else f"f={r:g}" for r in rules) + " |")
        print("|---|---:|" + "---:|" * len(rules))
        for shape, cols in by_shape.items():
            n = len(cols["old"])
            print(f"| {shape[0]}x{shape[1]} | {n} | " + " | ".join(f"{sum(v) / n:.3f}" for v in cols.values()) + " |")
        means = [sum(sum(c[r]) for c in by_shape.values()) / len(targets) for r in rules]
        best = min(range(len(rules)), key=lambda i: means[i])
        print(f"| mean | {len(targets)} | " + " | ".join(
            f"**{m:.3f}**" if i == best else f"{m:.3f}" for i, m in enumerate(means)) + " |")
        if not all(math.isfinite(m) for m in means):
            raise SystemExit("non-finite error")


if __name__ == "__main__":
    main()
