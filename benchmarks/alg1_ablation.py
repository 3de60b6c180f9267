"""Measure each difference between DSF's loop and the reference code's Algorithm 1, one at a time.

A flag-driven copy of the Algorithm 1 loop (the library's fused ADMM, first step by Cholesky solve,
plain ``topk`` masks) in which every difference from the reference code can be switched alone:

* ``order``: ``other_first`` (the paper's text: the non-square factor's step first) or ``sq_first``
  (the reference code: the square factor's step first);
* ``k0``: the annealing counter's start, 1 (the paper: ``rho_0 = (1 / (n - 3))^3`` first) or 0 (the
  reference: ``rho_0 = 0`` first); ``lag``: ``rho_0 = min(1, k / (n - lag))^power``;
* ``ramp``: ``cubic`` (the library before issue 10: every warm-started call first reselects the mask
  on a cubic ramp, keeping ~2x the count) or ``target`` (the reference: the final count each time);
  ``mask_iters``: reselections per call; ``inner``: ADMM iterations per call (``inner_other`` for the
  non-square step only);
* ``ret``: what a call returns: ``library`` (the projection of the last x-update with the previous
  dual), ``reference`` (the last in-loop projection and its dual; the last x-update unused) or
  ``consistent`` (the last projection and its own dual);
* ``init_fraction``: the other factor's magnitude-pruned start keeps this fraction of its budget (the
  reference LLM script: 0.5);
* ``square_T``: a square ``W`` is transposed first (the reference), so its square factor is ``first``;
* ``damping``: the relative ridge; ``outer``: ``n``;
* ``anneal``: which steps get the annealed ``rho_0`` (``both``, ``other``, ``sq``); the others use 1.

Data-free projection of SmolLM2-135M block-15 matrices (``benchmarks/real_weights.py``) with the
paper's split (``square_share="llm"``); prints ``||W - S F||^2 / ||W||^2`` per matrix and variant, and
each variant's mean error and time relative to the first one.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/alg1_ablation.py --density 0.25 \\
        --variants '{"cubic ramp": {}, "target mask": {"ramp": "target"}}'

``--sweep-fractions`` instead factorizes every matrix of ``--families`` at each density with the
square factor given fixed fractions of the budget (0.1-0.6, capped at a dense square factor), with
the loop DSF uses now (:data:`DSF_LOOP`), and appends one JSON record per run to ``--jsonl``; it is
the sweep :func:`dsf_lightning.factorization.auto_square_fraction` was fitted to::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/alg1_ablation.py --sweep-fractions --families resnet20 \\
        --resnet lightning_logs/demo/resnet20-32-dense-s0.pt --jsonl sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import real_weights  # noqa: E402

from dsf_lightning.factorization import nnz_budget, square_factor_nnz  # noqa: E402
from dsf_lightning.factorization.admm import EPS, _ridge_cholesky, cubic_sparsity, damped  # noqa: E402


def plain_topk_mask(scores, k):
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[scores.flatten().topk(min(k, scores.numel()), sorted=False).indices] = True
    return mask.view_as(scores)


def admm(gram, rhs, nnz, z, u, *, iters=5, mask_iters=2, rho0=1.0, damping=1e-2, ramp="cubic", ret="library"):
    p, q = rhs.shape
    norm = gram.diagonal().sqrt() + EPS
    gram_n = damped(gram / norm[:, None] / norm[None, :], damping)
    rhs_n = rhs / norm[:, None]
    scale = norm[:, None]
    z, u = (z * scale).contiguous(), (u * scale).contiguous()
    x = torch.cholesky_solve(rhs_n + rho0 * (z - u), _ridge_cholesky(gram_n, rho0))
    inv = torch.cholesky_inverse(_ridge_cholesky(gram_n, 1.0))
    total = p * q
    final_sparsity = 1.0 - nnz / total
    mi = min(mask_iters, iters)
    mask = off = None
    for it in range(iters):
        xu = x.add_(u)
        if it < mi:
            last = ramp != "cubic" or it + 1 == mi
            keep = nnz if last else round(total * (1.0 - cubic_sparsity(it + 1, mi, final_sparsity)))
            mask = plain_topk_mask(xu.abs(), keep)
            off = (~mask).to(x.dtype)
        u = xu * off
        if ret == "reference" and it == iters - 1:
            return (xu - u) / scale, u / scale
        x = inv @ torch.add(rhs_n, xu.add_(u, alpha=-2.0))
    xu = x.add_(u)
    if ret == "library":
        return xu.masked_fill(~mask, 0) / scale, u / scale
    unew = xu * off
    return (xu - unew) / scale, unew / scale


def alternate(w, sq_nnz, other_nnz, *, outer=40, inner=5, mask_iters=2, damping=1e-2, order="other_first", k0=1,
              ramp="cubic", ret="library", init_fraction=1.0, square_T=False, power=3.0, lag=3, inner_other=None,
              anneal="both"):
    out, fan_in = w.shape
    transposed = out > fan_in or (square_T and out == fan_in)
    m = w.T if transposed else w
    sq = torch.eye(m.shape[0], dtype=m.dtype)
    other = m * plain_topk_mask(m.abs(), int(other_nnz * init_fraction))
    usq, uo = torch.zeros_like(sq), torch.zeros_like(other)
    kw = dict(mask_iters=mask_iters, damping=damping, ramp=ramp, ret=ret)
    for k in range(k0, outer + k0):
        rho0 = min(1.0, k / max(1, outer - lag)) ** power
        steps = ["other", "sq"] if order == "other_first" else ["sq", "other"]
        for step in steps:
            if step == "other":
                iters = inner if inner_other is None else inner_other
                r0 = rho0 if anneal in ("both", "other") else 1.0
                other, uo = admm(sq.T @ sq, sq.T @ m, other_nnz, other, uo, rho0=r0, iters=iters, **kw)
            else:
                r0 = rho0 if anneal in ("both", "sq") else 1.0
                s, us = admm(other @ other.T, other @ m.T, sq_nnz, sq.T, usq.T, rho0=r0, iters=inner, **kw)
                sq, usq = s.T, us.T
    return (other.T, sq.T) if transposed else (sq, other)


#: The loop of ``double_sparse_factorize`` after issue 10, in this harness's flags.
DSF_LOOP = dict(ramp="target", mask_iters=1, inner=2, lag=1, damping=0.03, outer=40)
FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)


def sweep_fractions(mats, densities, jsonl) -> None:
    import math

    from dsf_lightning.factorization import magnitude_prune

    with open(jsonl, "a") as sink:
        for name, w in mats.items():
            r = min(w.shape)
            for density in densities:
                budget = nnz_budget(density, w.numel())
                mag = magnitude_prune(w, density).relative_error
                done = set()
                for f in FRACTIONS:
                    sq = min(r * r, max(1, math.floor(f * budget)))
                    if sq >= budget or sq in done:
                        continue
                    done.add(sq)
                    t = time.perf_counter()
                    s, fac = alternate(w, sq, budget - sq, **DSF_LOOP)
                    d = (w - s @ fac).double()
                    rel = float(d.square().sum() / w.double().square().sum())
                    sink.write(json.dumps({"name": name, "shape": list(w.shape), "density": density, "fraction": f,
                                           "sq_nnz": sq, "budget": budget, "rel": rel, "mag": mag,
                                           "ratio": rel / mag, "s": time.perf_counter() - t}) + "\n")
                    sink.flush()
                print(name, density, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--density", type=float, default=0.25)
    p.add_argument("--variants", help="JSON {label: {flag: value}}; the first is the reference row")
    p.add_argument("--matrices", nargs="+", default=[f"smollm2.15.{n}" for n in real_weights.SMOLLM2_PROJECTIONS])
    p.add_argument("--sweep-fractions", action="store_true")
    p.add_argument("--families", nargs="+", default=["resnet20"])
    p.add_argument("--resnet", default="lightning_logs/demo/resnet20-32-dense-s0.pt")
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    p.add_argument("--jsonl", default="sweep_fractions.jsonl")
    a = p.parse_args()
    torch.set_num_threads(1)
    if a.sweep_fractions:
        sweep_fractions(real_weights.load(a.families, a.resnet), a.densities, a.jsonl)
        return
    if not a.variants:
        p.error("--variants is required without --sweep-fractions")
    variants = json.loads(a.variants)
    mats = real_weights.load(["smollm2"])
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    err: dict = {}
    sec: dict = {}
    for name in a.matrices:
        w = mats[name]
        sq = square_factor_nnz("llm", a.density, *w.shape)
        other = nnz_budget(a.density, w.numel()) - sq
        for label, flags in variants.items():
            t = time.perf_counter()
            s, f = alternate(w, sq, other, **flags)
            sec.setdefault(label, []).append(time.perf_counter() - t)
            d = (w - s @ f).double()
            err.setdefault(label, []).append(float(d.square().sum() / w.double().square().sum()))
            print(f"{name:24s} {label:24s} {err[label][-1]:.5f} {sec[label][-1]:.1f}s", flush=True)
    base = next(iter(variants))
    print(f"\n| variant | mean error / {base} | mean time / {base} | per matrix |")
    print("|---|---:|---:|---|")
    for label in variants:
        r = [e / b for e, b in zip(err[label], err[base])]
        t = [x / y for x, y in zip(sec[label], sec[base])]
        print(f"| {label} | {sum(r) / len(r):.4f} | {sum(t) / len(t):.2f} | " + " ".join(f"{x:.3f}" for x in r) + " |")


if __name__ == "__main__":
    main()
