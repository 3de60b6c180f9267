"""How should a layer's nonzero budget be split between DSF's two factors? Rules compared on real weights.

For every matrix of the chosen families (``benchmarks/real_weights.py``) and density, factorize the
weight (data-free projection, every other option at its default) under each split rule and print,
per shape class and density, the mean over matrices of DSF's error divided by magnitude pruning's at
the same budget (below 1: DSF better), and each rule's mean error relative to ``auto``'s.

Rules: ``auto`` (the default, :func:`dsf_lightning.factorization.auto_square_fraction`), ``vision``
(30% of the budget), ``paper`` (the split the paper's code used: 0.16 / 0.25 of ``r^2`` for transformer
matrices, i.e. ``square_share="llm"``, and ``max(0.05, density / 2)`` of ``r^2`` for the ResNet convs;
``n/a`` where it leaves nothing for the other factor), and ``--fractions``: fixed fractions of the
budget, to locate the best split per shape.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/split.py --families resnet20 smollm2 minilm \\
        --resnet lightning_logs/demo/resnet20-32-dense-s0.pt --densities 0.05 0.1 0.25 0.5
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import real_weights  # noqa: E402

from dsf_lightning.factorization import double_sparse_factorize, magnitude_prune  # noqa: E402
from dsf_lightning.factorization.dsf import vision_square_share  # noqa: E402


def paper_share(name: str, density: float, out: int, fan_in: int) -> float:
    """The square factor's own density under the paper code's rule for this family."""
    if name.startswith("resnet20."):
        return max(0.05, density / 2)
    return 0.16 if out == fan_in else 0.25


def rule_share(rule: str, name: str, density: float, out: int, fan_in: int) -> float | str:
    if rule in ("auto", "vision"):
        return rule
    if rule == "paper":
        return paper_share(name, density, out, fan_in)
    return vision_square_share(density, out, fan_in, float(rule))  # a fixed fraction of the budget


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=["resnet20", "smollm2", "minilm"])
    p.add_argument("--resnet", default="lightning_logs/demo/resnet20-32-dense-s0.pt")
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    p.add_argument("--fractions", type=float, nargs="*", default=[], help="fixed budget fractions to add")
    p.add_argument("--matrices", nargs="+", default=None, help="only these names")
    p.add_argument("--outer-iters", type=int, default=None, help="DSF outer iterations (default: DSF's)")
    p.add_argument("--jsonl", default=None, help="append one JSON record per run here")
    a = p.parse_args()
    torch.set_num_threads(1)
    mats = real_weights.load(a.families, a.resnet)
    if a.matrices:
        mats = {n: w for n, w in mats.items() if n in a.matrices}
    rules = ["auto", "vision", "paper", *[f"{f:g}" for f in a.fractions]]
    kw = {} if a.outer_iters is None else {"outer_iters": a.outer_iters}
    print(f"torch {torch.__version__}, 1 thread, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
          flush=True)
    # ratios[(family, class, density)][rule] = [DSF / magnitude error per matrix]
    ratios: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    sink = open(a.jsonl, "a") if a.jsonl else None
    for name, w in mats.items():
        fam = name.split(".")[0]
        cls = real_weights.shape_class(name, tuple(w.shape))
        for density in a.densities:
            mag = magnitude_prune(w, density).error
            for rule in rules:
                share = rule_share(rule, name, density, *w.shape)
                try:
                    res = double_sparse_factorize(w, density, square_share=share, **kw)
                except ValueError:
                    ratios[(fam, cls, density)][rule].append(math.nan)
                    continue
                ratios[(fam, cls, density)][rule].append(res.error / mag)
                if sink:
                    sink.write(json.dumps({"name": name, "shape": list(w.shape), "density": density, "rule": rule,
                                           "ratio": res.error / mag, "square_fraction": res.info["square_fraction"]})
                               + "\n")
                    sink.flush()
            print(f"{name} {tuple(w.shape)} d={density}: " + " ".join(
                f"{r}={ratios[(fam, cls, density)][r][-1]:.3f}" for r in rules), flush=True)

    print("\nDSF / magnitude error, mean over the matrices of each shape class (n/a: the rule does not fit "
          "the budget); last columns: paper / auto and vision / auto")
    print("| family | class | density | n | " + " | ".join(rules) + " | paper / auto | vision / auto |")
    print("|---|---|---:|---:|" + "---:|" * (len(rules) + 2))
    rel = collections.defaultdict(list)
    for key in sorted(ratios):
        row = ratios[key]
        n = len(row["auto"])
        means = {r: (statistics.fmean(v) if not any(math.isnan(x) for x in v) else math.nan) for r, v in row.items()}
        best = min(m for m in means.values() if not math.isnan(m))
        cells = [("**%.3f**" if m == best else "%.3f") % m if not math.isnan(m) else "n/a" for m in means.values()]
        pa = means["paper"] / means["auto"]
        va = means["vision"] / means["auto"]
        for r in ("paper", "vision"):
            if not math.isnan(means[r]):
                rel[r].append(means[r] / means["auto"])
        print(f"| {key[0]} | {key[1]} | {key[2]:g} | {n} | " + " | ".join(cells)
              + f" | {'n/a' if math.isnan(pa) else f'{pa:.3f}'} | {va:.3f} |")
    for r, v in rel.items():
        print(f"{r} / auto over {len(v)} (class, density) cells: mean {statistics.fmean(v):.3f}, "
              f"min {min(v):.3f}, max {max(v):.3f}")
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
