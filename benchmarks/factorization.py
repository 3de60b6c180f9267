"""Time DSF's default factorization against Algorithm 1 as the reference code runs it, on real weights.

Data-free projection ``W ~= S F`` of real trained matrices (``benchmarks/real_weights.py``: SmolLM2-135M,
all-MiniLM-L6-v2, a trained ResNet-20), or seeded synthetic ones (``--synthetic``). Per row, in the
same process and back to back (order alternating between repeats, after a warm-up):

* ``ours``: ``double_sparse_factorize(W, density)`` with every default (the ``"auto"`` split). A ResNet-20
  row (``--resnet-layers shape``, the default) is every layer of the network with that row's shape, solved
  as a user's prune solves them: grouped by ``dsf_lightning.pipeline.jobs.batch_groups`` (small layers of one shape
  in one ``double_sparse_factorize_batch`` call, larger ones one by one); its times are per layer (the
  total over the layers / their number), its errors the mean over the layers and the worst layer's
  ours / baseline ratio; ``ours 1 by 1`` times the same layers one call each, for the batching's gain.
  ``--resnet-layers one`` times the one named matrix per shape instead;
* the baseline, ``--baseline topk`` (default): :mod:`topk_dsf`, the reference code's Algorithm 1
  (40 outer x 5 inner iterations, two inverses per step) with ``topk`` masks, given the split the
  paper used for the family (``--baseline-split paper``: 0.16 / 0.25 of ``r^2`` for transformer
  matrices, the ResNet notebooks' ``max(0.05, density / 2)`` of ``r^2`` for convs; half the budget in
  the initial magnitude pruning for transformers, as the LLM script) or ours (``--baseline-split ours``,
  the same nonzeros per factor as ``ours`` got, to time the engine alone);
  ``--baseline naive``: :mod:`naive_dsf` (full sorts, the library's earlier loop) with the same split;
* ``magnitude``: magnitude pruning at the same budget, for scale.

Errors are ``||W - S F||_F^2 / ||W||_F^2``; the speed-up is baseline seconds / ours (median over
``--repeats``), summarized by the geometric mean over rows.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/factorization.py --threads 1 \\
        --families smollm2 minilm resnet20 --resnet lightning_logs/demo/resnet20-32-dense-s0.pt
    .venv/bin/python benchmarks/factorization.py --synthetic 256x256 512x2048 --device cuda
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import real_weights  # noqa: E402
from naive_dsf import naive_admm, sort_mask  # noqa: E402,F401
from topk_dsf import topk_dsf  # noqa: E402

from dsf_lightning.factorization import (  # noqa: E402
    double_sparse_factorize,
    factorize_batch,
    magnitude_prune,
    nnz_budget,
)
from dsf_lightning.pipeline.jobs import LayerJob, batch_groups  # noqa: E402

#: One matrix per distinct shape of each family (the benchmark's shapes).
DEFAULT_MATRICES = [
    "smollm2.15.q_proj", "smollm2.15.k_proj", "smollm2.15.gate_proj", "smollm2.15.down_proj",
    "minilm.3.attention.self.query", "minilm.3.intermediate.dense", "minilm.3.output.dense",
    "resnet20.layer1.0.conv1", "resnet20.layer3.1.conv1", "resnet20.layer2.0.shortcut.0",
    "resnet20.layer3.0.shortcut.0",
]


def parse_shape(text: str) -> tuple[int, int]:
    try:
        out, fan_in = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 512x2048 (out x fan_in), got {text!r}") from None
    if out < 1 or fan_in < 1:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return out, fan_in


def synthetic_weight(out: int, fan_in: int, seed: int = 0) -> torch.Tensor:
    """``U diag(s) V^T + noise``: random orthogonal ``U, V``, power-law spectrum, 10% noise energy."""
    gen = torch.Generator().manual_seed(seed * 7919 + out * 31 + fan_in)
    r = min(out, fan_in)
    u, _ = torch.linalg.qr(torch.randn(out, r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(fan_in, r, generator=gen, dtype=torch.float64))
    s = torch.arange(1, r + 1, dtype=torch.float64) ** -0.6
    low = (u * s) @ v.T
    noise = torch.randn(out, fan_in, generator=gen, dtype=torch.float64)
    noise *= 0.1 ** 0.5 * low.norm() / noise.norm()
    w = low + noise
    return (w / w.std() * 0.02).to(torch.float32)


def paper_square_nnz(name: str, density: float, out: int, fan_in: int) -> int:
    """The split the paper's code used for this family: square-factor nonzeros."""
    r = min(out, fan_in)
    if name.startswith("resnet20."):
        share = max(0.05, density / 2)
    else:
        share = 0.16 if out == fan_in else 0.25
    return max(1, math.floor(share * r * r))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def rel_error(w: torch.Tensor, second: torch.Tensor, first: torch.Tensor) -> float:
    diff = (w - second @ first).to(torch.float64)
    return float(diff.square().sum() / w.to(torch.float64).square().sum())


def naive_dsf_split(weight: torch.Tensor, nnz_a: int, nnz_b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:mod:`naive_dsf`'s Algorithm 1 with a given split (its module function takes the library's rule)."""
    out, fan_in = weight.shape
    transposed = out > fan_in
    w = weight.t() if transposed else weight
    a = torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
    b = w * sort_mask(w.abs(), nnz_b)
    ua, ub = torch.zeros_like(a), torch.zeros_like(b)
    for k in range(1, 41):
        rho0 = min(1.0, k / 37) ** 3
        b, ub, _ = naive_admm(a.t() @ a, a.t() @ w, nnz_b, b, ub, rho0=rho0)
        at, uat, _ = naive_admm(b @ b.t(), b @ w.t(), nnz_a, a.t(), ua.t(), rho0=rho0)
        a, ua = at.t(), uat.t()
    return (b.t(), a.t()) if transposed else (a, b)


def user_groups(layers: dict[str, torch.Tensor], density: float) -> list[list[str]]:
    """The layer names as a user's prune solves them: ``pipeline.jobs.batch_groups`` of data-free DSF jobs."""
    jobs = [LayerJob(n, "dsf", w, density, None) for n, w in layers.items()]
    return [[j.name for j in g] for g in batch_groups(jobs)]


def run_ours(layers: dict[str, torch.Tensor], groups: list[list[str]], density: float) -> list[tuple[float, float]]:
    """``(relative error, square fraction)`` per layer, each group in one call (a group of one: the 2-D call)."""
    out = []
    for names in groups:
        if len(names) == 1:
            facts = [double_sparse_factorize(layers[names[0]], density)]
        else:
            facts = factorize_batch("dsf", torch.stack([layers[n] for n in names]), density, names=names)
        out += [(f.relative_error, f.info["square_fraction"]) for f in facts]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["smollm2", "minilm", "resnet20"])
    parser.add_argument("--matrices", nargs="+", default=None, help="names to run (default: one per shape)")
    parser.add_argument("--resnet", default="lightning_logs/demo/resnet20-32-dense-s0.pt",
                        help="ResNet-20 (width 32) state dict, e.g. what `make demo` writes")
    parser.add_argument("--resnet-layers", choices=("shape", "one"), default="shape",
                        help="a ResNet-20 row times every layer of its shape as a prune solves them (default), "
                             "or the named matrix alone")
    parser.add_argument("--synthetic", nargs="*", type=parse_shape, default=None, metavar="OUTxIN",
                        help="time seeded synthetic matrices of these shapes instead of real weights")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--baseline", choices=("topk", "naive"), default="topk")
    parser.add_argument("--baseline-split", choices=("paper", "ours"), default="paper")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each side per matrix")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.synthetic is not None:
        mats = {f"synthetic.{o}x{i}": synthetic_weight(o, i) for o, i in (args.synthetic or [(256, 256)])}
        names = list(mats)
    else:
        mats = real_weights.load(args.families, args.resnet)
        names = args.matrices or [n for n in DEFAULT_MATRICES if n in mats]
    rows = {}  # row name -> the layers it times
    for name in names:
        shape = mats[name].shape
        if name.startswith("resnet20.") and args.resnet_layers == "shape":
            rows[name] = {n: w for n, w in mats.items() if n.startswith("resnet20.") and w.shape == shape}
        else:
            rows[name] = {name: mats[name]}
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, nproc "
          f"{os.cpu_count()}, density {args.density}, repeats {args.repeats}, baseline {args.baseline} "
          f"(split: {args.baseline_split}), resnet layers: {args.resnet_layers}", flush=True)
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)

    warm = synthetic_weight(64, 96).to(args.device)
    double_sparse_factorize(warm, args.density)
    factorize_batch("dsf", torch.stack([warm, warm]), args.density, outer_iters=2)
    topk_dsf(warm, 200, nnz_budget(args.density, warm.numel()) - 200, outer_iters=2)

    print("| matrix | shape | layers (ours' calls) | baseline s/layer | ours s/layer | speed-up | baseline rel. err | "
          "ours rel. err | ours / baseline err (worst layer) | magnitude rel. err | ours square share of budget "
          "| ours 1 by 1 s/layer |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    ratios, err_ratios, worst_ratios = [], [], []
    flip = False
    for name, layers in rows.items():
        layers = {n: w.to(args.device) for n, w in layers.items()}
        w = layers[name]
        out, fan_in = w.shape
        budget = nnz_budget(args.density, w.numel())
        ours_split = double_sparse_factorize(w, args.density, outer_iters=1).info["square_nnz"]
        sq = ours_split if args.baseline_split == "ours" or name.startswith("synthetic.") else \
            paper_square_nnz(name, args.density, out, fan_in)
        groups = user_groups(layers, args.density)
        multi = len(layers) > 1

        def ours(layers=layers, groups=groups):
            return run_ours(layers, groups, args.density)

        def one_by_one(layers=layers):
            return run_ours(layers, [[n] for n in layers], args.density)

        def base(layers=layers, name=name, sq=sq, budget=budget):
            res = []
            for lw in layers.values():
                if args.baseline == "topk":
                    init = 1.0 if name.startswith("resnet20.") else 0.5
                    second, first = topk_dsf(lw, sq, budget - sq, init_fraction=init)
                else:
                    second, first = naive_dsf_split(lw, sq, budget - sq)
                res.append((rel_error(lw, second, first), sq / budget))
            return res

        sides = [("base", base), ("ours", ours)] + ([("one", one_by_one)] if multi else [])
        times: dict[str, list[float]] = {side: [] for side, _ in sides}
        errs: dict[str, list[tuple[float, float]]] = {}
        for _ in range(args.repeats):
            order = sides[::-1] if flip else sides
            flip = not flip
            for side, fn in order:
                sync(args.device)
                t = time.perf_counter()
                res = fn()
                sync(args.device)
                times[side].append((time.perf_counter() - t) / len(layers))
                errs.setdefault(side, res)
        tb, to = statistics.median(times["base"]), statistics.median(times["ours"])
        per_layer = [o[0] / b[0] for o, b in zip(errs["ours"], errs["base"])]
        mean = {side: statistics.fmean(e[0] for e in errs[side]) for side in ("base", "ours")}
        mag = statistics.fmean(magnitude_prune(lw, args.density).relative_error for lw in layers.values())
        ratios.append(tb / to)
        err_ratios.append(statistics.fmean(per_layer))
        worst_ratios.append(max(per_layer))
        label = f"{name} +{len(layers) - 1}" if multi else name
        calls = " + ".join(str(len(g)) for g in groups) if multi else "1"
        one = f"{statistics.median(times['one']):.3f}" if multi else "-"
        print(f"| {label} | {out}x{fan_in} | {len(layers)} ({calls}) | {tb:.3f} | {to:.3f} | {tb / to:.2f}x | "
              f"{mean['base']:.4f} | {mean['ours']:.4f} | {err_ratios[-1]:.3f} ({worst_ratios[-1]:.3f}) | {mag:.4f} | "
              f"{errs['ours'][0][1]:.2f} (baseline {errs['base'][0][1]:.2f}) | {one} |", flush=True)
    print(f"\ngeometric-mean speed-up over {len(ratios)} rows: {statistics.geometric_mean(ratios):.2f}x "
          f"(ours takes {1 / statistics.geometric_mean(ratios):.3f} of the baseline's time); ours' error / "
          f"baseline's (mean over each row's layers): geometric mean {statistics.geometric_mean(err_ratios):.3f}, "
          f"worst row {max(err_ratios):.3f}, worst layer {max(worst_ratios):.3f}")
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
