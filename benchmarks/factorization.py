"""Time DSF's default factorization against Algorithm 1 as the reference code runs it, on real weights.

Data-free projection ``W ~= S F`` of real trained matrices (``benchmarks/real_weights.py``: SmolLM2-135M,
all-MiniLM-L6-v2, a trained ResNet-20), or seeded synthetic ones (``--synthetic``). Per matrix, in the
same process and back to back (order alternating between repeats, after a warm-up):

* ``ours``: ``double_sparse_factorize(W, density)`` with every default (the ``"auto"`` split);
* the baseline, ``--baseline topk`` (default): :mod:`topk_dsf`, the reference code's Algorithm 1
  (40 outer x 5 inner iterations, two inverses per step) with ``topk`` masks, given the split the
  paper used for the family (``--baseline-split paper``: 0.16 / 0.25 of ``r^2`` for transformer
  matrices, the ResNet notebooks' ``max(0.05, density / 2)`` of ``r^2`` for convs; half the budget in
  the initial magnitude pruning for transformers, as the LLM script) or ours (``--baseline-split ours``,
  the same nonzeros per factor as ``ours`` got, to time the engine alone);
  ``--baseline naive``: :mod:`naive_dsf` (full sorts, the library's earlier loop) with the same split;
* ``magnitude``: magnitude pruning at the same budget, for scale.

Errors are ``||W - S F||_F^2 / ||W||_F^2``; the speed-up is baseline seconds / ours (median over
``--repeats``), summarized by the geometric mean over matrices.

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

from dsf_lightning.factorization import double_sparse_factorize, magnitude_prune, nnz_budget  # noqa: E402

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["smollm2", "minilm", "resnet20"])
    parser.add_argument("--matrices", nargs="+", default=None, help="names to run (default: one per shape)")
    parser.add_argument("--resnet", default="lightning_logs/demo/resnet20-32-dense-s0.pt",
                        help="ResNet-20 (width 32) state dict, e.g. what `make demo` writes")
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
    else:
        mats = real_weights.load(args.families, args.resnet)
        names = args.matrices or [n for n in DEFAULT_MATRICES if n in mats]
        mats = {n: mats[n] for n in names}
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, nproc "
          f"{os.cpu_count()}, density {args.density}, repeats {args.repeats}, baseline {args.baseline} "
          f"(split: {args.baseline_split})", flush=True)
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)

    warm = synthetic_weight(64, 96).to(args.device)
    double_sparse_factorize(warm, args.density)
    topk_dsf(warm, 200, nnz_budget(args.density, warm.numel()) - 200, outer_iters=2)

    print("| matrix | shape | baseline s | ours s | speed-up | baseline rel. err | ours rel. err | ours / baseline err "
          "| magnitude rel. err | ours square share of budget |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    ratios, err_ratios = [], []
    flip = False
    for name, w in mats.items():
        w = w.to(args.device)
        out, fan_in = w.shape
        budget = nnz_budget(args.density, w.numel())
        ours_split = double_sparse_factorize(w, args.density, outer_iters=1).info["square_nnz"]
        sq = ours_split if args.baseline_split == "ours" or name.startswith("synthetic.") else \
            paper_square_nnz(name, args.density, out, fan_in)

        def run_ours(w=w):
            res = double_sparse_factorize(w, args.density)
            return res.relative_error, res.info["square_fraction"]

        def run_base(w=w, name=name, sq=sq, budget=budget):
            if args.baseline == "topk":
                init = 1.0 if name.startswith("resnet20.") else 0.5
                second, first = topk_dsf(w, sq, budget - sq, init_fraction=init)
            else:
                second, first = naive_dsf_split(w, sq, budget - sq)
            return rel_error(w, second, first), sq / budget

        times: dict[str, list[float]] = {"base": [], "ours": []}
        errs: dict[str, tuple[float, float]] = {}
        for _ in range(args.repeats):
            order = [("ours", run_ours), ("base", run_base)] if flip else [("base", run_base), ("ours", run_ours)]
            flip = not flip
            for side, fn in order:
                sync(args.device)
                t = time.perf_counter()
                res = fn()
                sync(args.device)
                times[side].append(time.perf_counter() - t)
                errs.setdefault(side, res)
        tb, to = statistics.median(times["base"]), statistics.median(times["ours"])
        mag = magnitude_prune(w, args.density).relative_error
        ratios.append(tb / to)
        err_ratios.append(errs["ours"][0] / errs["base"][0])
        print(f"| {name} | {out}x{fan_in} | {tb:.2f} | {to:.2f} | {tb / to:.2f}x | {errs['base'][0]:.4f} | "
              f"{errs['ours'][0]:.4f} | {err_ratios[-1]:.3f} | {mag:.4f} | {errs['ours'][1]:.2f} "
              f"(baseline {errs['base'][1]:.2f}) |", flush=True)
    print(f"\ngeometric-mean speed-up over {len(ratios)} matrices: {statistics.geometric_mean(ratios):.2f}x "
          f"(ours takes {1 / statistics.geometric_mean(ratios):.2f} of the baseline's time); ours' error / "
          f"baseline's: geometric mean {statistics.geometric_mean(err_ratios):.3f}, worst {max(err_ratios):.3f}")
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
