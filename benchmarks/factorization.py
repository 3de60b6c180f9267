"""Time DSF (``double_sparse_factorize``) against a straightforward Algorithm 1 in the same run.

Data-free projection (``gram=None``, preset ``"vision"``: 40 outer x 5 inner iterations) of
seeded synthetic weights with a decaying spectrum plus noise. For every shape both
implementations run back to back (alternating which goes first), after a warm-up on a small
matrix, so the speed-up ratio is against a baseline measured under the same machine load.

    .venv/bin/python benchmarks/factorization.py
    .venv/bin/python benchmarks/factorization.py --sizes 256x256 1024x1024 --device cuda --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from naive_dsf import naive_dsf  # noqa: E402

from dsf_lightning.factorization import double_sparse_factorize, magnitude_prune  # noqa: E402

# 2048x2048 at 40 outer iterations takes ~30 min for the pair on 2 loaded cores: time it with
# ``--sizes 2048x2048 --outer-iters 8`` (the cost per outer iteration is constant).
DEFAULT_SIZES = ["256x256", "512x512", "1024x1024", "512x2048", "2048x512"]


def parse_shape(text: str) -> tuple[int, int]:
    try:
        out, fan_in = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like 512x2048 (out x fan_in), got {text!r}") from None
    if out < 1 or fan_in < 1:
        raise argparse.ArgumentTypeError(f"shape must be positive, got {text!r}")
    return out, fan_in


def synthetic_weight(out: int, fan_in: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
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
    return (w / w.std() * 0.02).to(torch.float32).to(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


OUTER_ITERS = 40


def run_ours(w: torch.Tensor, density: float) -> float:
    return double_sparse_factorize(w, density, outer_iters=OUTER_ITERS).relative_error


def run_naive(w: torch.Tensor, density: float) -> float:
    second, first = naive_dsf(w, density, outer_iters=OUTER_ITERS)
    diff = (w - second @ first).to(torch.float64)
    return float(diff.square().sum() / w.to(torch.float64).square().sum())


def timed(fn, w: torch.Tensor, density: float, device: str) -> tuple[float, float]:
    sync(device)
    start = time.perf_counter()
    err = fn(w, density)
    sync(device)
    return time.perf_counter() - start, err


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=parse_shape, default=[parse_shape(s) for s in DEFAULT_SIZES],
                        metavar="OUTxIN", help=f"weight shapes (default: {' '.join(DEFAULT_SIZES)})")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each implementation per shape")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outer-iters", type=int, default=40,
                        help="Algorithm 1's n (default 40, the paper's); fewer only to time big shapes")
    args = parser.parse_args(argv)
    global OUTER_ITERS
    OUTER_ITERS = args.outer_iters
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"nproc {os.cpu_count()}, density {args.density}, repeats {args.repeats}, "
          f"outer x inner iterations {args.outer_iters} x 5", flush=True)
    try:
        print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    except OSError:
        pass

    warm = synthetic_weight(64, 96, args.seed, args.device)
    for fn in (run_naive, run_ours):
        timed(fn, warm, args.density, args.device)

    header = ("| shape (out x in) | naive s | ours s | speed-up | naive rel. err | ours rel. err "
              "| magnitude rel. err |")
    print(header)
    print("|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|", flush=True)
    ratios = []
    flip = False
    for out, fan_in in args.sizes:
        w = synthetic_weight(out, fan_in, args.seed, args.device)
        times = {"naive": [], "ours": []}
        errs = {}
        for _ in range(args.repeats):
            order = [("ours", run_ours), ("naive", run_naive)] if flip else [("naive", run_naive), ("ours", run_ours)]
            flip = not flip
            for name, fn in order:
                t, e = timed(fn, w, args.density, args.device)
                times[name].append(t)
                errs.setdefault(name, e)
        mag = magnitude_prune(w, args.density).relative_error
        tn, to = statistics.median(times["naive"]), statistics.median(times["ours"])
        ratios.append(tn / to)
        print(f"| {out}x{fan_in} | {tn:.2f} | {to:.2f} | {tn / to:.2f}x | {errs['naive']:.4f} | "
              f"{errs['ours']:.4f} | {mag:.4f} |", flush=True)
    gmean = statistics.geometric_mean(ratios)
    print(f"\ngeometric-mean speed-up over {len(ratios)} shapes: {gmean:.2f}x (times are medians of "
          f"{args.repeats} run(s); errors are ||W - S F||_F^2 / ||W||_F^2)")
    try:
        print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    except OSError:
        pass


if __name__ == "__main__":
    main()
