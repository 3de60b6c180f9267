"""Per-layer time of DSF on a stack of equal-shape layers: one batch call against one call per layer.

The measurement behind the pipeline's batching cap (``dsf_lightning/pipeline/jobs.py``: ``BATCH_MAX_COST``,
``BATCH_MAX_STACK``). For each ``OUTxIN:B`` (B layers of that shape; seeded synthetic weights as in
``benchmarks/factorization.py``) and, with ``--resnet``, every shape of the trained ResNet-20 with all its
layers of that shape: ``double_sparse_factorize_batch`` on the stack against ``double_sparse_factorize``
on each layer, back to back, order alternating between repeats, median per-layer seconds. Also checks
that the batch's masks equal the single calls' (and says whether the factors are bit-identical).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/batching.py --threads 1 \\
        --resnet lightning_logs/demo/resnet20-32-dense-s0.pt --shapes 256x256:4 384x384:4 256x2304:2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import real_weights  # noqa: E402
from factorization import synthetic_weight  # noqa: E402

from dsf_lightning.factorization import double_sparse_factorize, double_sparse_factorize_batch  # noqa: E402


def parse_item(text: str) -> tuple[int, int, int]:
    shape, _, count = text.partition(":")
    out, fan_in = (int(v) for v in shape.lower().split("x"))
    return out, fan_in, int(count or 2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", type=parse_item, default=[], metavar="OUTxIN:B")
    parser.add_argument("--resnet", default=None, help="ResNet-20 (width 32) state dict: all its shapes too")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--outer-iters", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    stacks: dict[str, torch.Tensor] = {}
    if args.resnet:
        by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
        for w in real_weights.resnet20_weights(args.resnet).values():
            by_shape.setdefault(tuple(w.shape), []).append(w)
        stacks.update({f"resnet20 {o}x{i}": torch.stack(ws) for (o, i), ws in by_shape.items() if len(ws) > 1})
    for o, i, b in args.shapes:
        stacks[f"synthetic {o}x{i} ({b})"] = torch.stack([synthetic_weight(o, i, seed=s) for s in range(b)])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, density {args.density}, outer iterations "
          f"{args.outer_iters}, repeats {args.repeats}")
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    opts = {"outer_iters": args.outer_iters}
    double_sparse_factorize_batch(torch.stack([synthetic_weight(32, 64)] * 2), args.density, outer_iters=2)

    print("| stack | layers | stacked weights | one by one s/layer | batch s/layer | batch / one by one "
          "| masks equal | factors bit-identical |")
    print("|---|---:|---:|---:|---:|---:|---|---|", flush=True)
    flip = False
    for label, ws in stacks.items():
        count = ws.shape[0]

        def single(ws=ws):
            return [double_sparse_factorize(w, args.density, **opts) for w in ws]

        def batch(ws=ws):
            return double_sparse_factorize_batch(ws, args.density, **opts)

        times: dict[str, list[float]] = {"single": [], "batch": []}
        got: dict[str, list] = {}
        for _ in range(args.repeats):
            order = [("batch", batch), ("single", single)] if flip else [("single", single), ("batch", batch)]
            flip = not flip
            for side, fn in order:
                t = time.perf_counter()
                res = fn()
                times[side].append((time.perf_counter() - t) / count)
                got.setdefault(side, res)
        pairs = list(zip(got["single"], got["batch"]))
        masks = all(torch.equal(a.first_mask, b.first_mask) and torch.equal(a.second_mask, b.second_mask)
                    for a, b in pairs)
        bits = all(torch.equal(a.first, b.first) and torch.equal(a.second, b.second) for a, b in pairs)
        ts, tb = statistics.median(times["single"]), statistics.median(times["batch"])
        print(f"| {label} | {count} | {ws[0].numel() * count} | {ts:.3f} | {tb:.3f} | {tb / ts:.2f} | "
              f"{'yes' if masks else 'NO'} | {'yes' if bits else 'no'} |", flush=True)
    print(f"load average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
