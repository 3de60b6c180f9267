"""Measure the pruned modules: fine-tune step time, packed storage size, CSR inference on CPU.

Measured, not timed-tested. Every ratio is against a baseline measured in the same run, and the
timed variants run round-robin (one step of each in turn), so machine load hits all of them alike.

1. Fine-tune step (forward + backward + SGD momentum step) of a ResNet-20 (CIFAR, batch of
   3x32x32) with every conv except the first DSF-pruned at ``--density`` (data-free projection,
   ``outer_iters=5``), in the fused / two-step / auto forward modes (masked storage) and auto in the
   compressed storage, and of a magnitude-pruned one (SparseConv2d) in either storage, relative to the
   dense network; likewise a small LLaMA
   (``LlamaForCausalLM``, random init) with all decoder linears replaced.
2. Packed file size (:func:`dsf_lightning.persistence.export.packed_size_bytes`, fp16 values + bitmasks)
   at densities 0.1 and 0.5, relative to the dense fp16 state dict and to magnitude pruning.
3. CPU inference of the CSR path (paper appendix A.3): a chain of ``--csr-layers`` 1024x1024
   layers, single thread, dense ``nn.Linear`` vs :class:`~dsf_lightning.persistence.export.CSRLinear` at
   density d vs :class:`~dsf_lightning.persistence.export.CSRDSFLinear` (two CSR matrices of d/2 each, i.e.
   twice the sparse products at equal nnz, as in the paper's Table 5). Random masks.

    .venv/bin/python benchmarks/modules.py                       # everything, ~3 min on 2 loaded cores
    .venv/bin/python benchmarks/modules.py --skip csr --steps 20
    .venv/bin/python benchmarks/modules.py --only csr --csr-layers 48 --csr-batches 1 16 64
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from dsf_lightning.factorization import factorize
from dsf_lightning.models import resnet20
from dsf_lightning.modules import pruned_module_from_factorization
from dsf_lightning.persistence.export import CSRDSFLinear, CSRLinear, pack_model, packed_size_bytes

warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
SECTIONS = ("step", "size", "csr")


# ------------------------------------------------------------------------------------------ models

def resnet_targets(model: nn.Module) -> list[str]:
    """Every Conv2d except the stem (``conv1``); the fc stays dense."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "conv1"]


def llama_targets(model: nn.Module) -> list[str]:
    """Every nn.Linear inside the decoder layers (q, k, v, o, gate, up, down)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]


def small_llama(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=args.llama_hidden, intermediate_size=args.llama_intermediate,
                      num_hidden_layers=args.llama_layers, num_attention_heads=args.llama_heads,
                      num_key_value_heads=args.llama_heads, vocab_size=args.llama_vocab,
                      max_position_embeddings=max(256, args.llama_seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


_FACT_CACHE: dict[tuple[int, str, str, float], object] = {}


def pruned_copy(model: nn.Module, targets: list[str], method: str, density: float,
                forward_mode: str = "fused", outer_iters: int = 5, storage: str = "masked") -> nn.Module:
    """A deep copy of ``model`` with ``targets`` replaced (factorizations cached across modes and storages)."""
    m = copy.deepcopy(model)
    for name in targets:
        layer = m.get_submodule(name)
        key = (id(model), name, method, density)
        if key not in _FACT_CACHE:
            opts = dict(outer_iters=outer_iters) if method == "dsf" else {}
            _FACT_CACHE[key] = factorize(method, layer.weight.detach().flatten(1), density, **opts)
        m.set_submodule(name, pruned_module_from_factorization(layer, _FACT_CACHE[key], forward_mode=forward_mode,
                                                               storage=storage))
    return m


# -------------------------------------------------------------------------------------------- timing

def round_robin(fns: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each fn, calling them in turn (warm-up calls first)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step_fn(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> Callable[[], None]:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        opt.step()

    return step


def bench_steps(args: argparse.Namespace) -> None:
    print(f"\n## Fine-tune step time (fwd+bwd+SGD), density {args.density}, {torch.get_num_threads()} thread(s), "
          f"median of {args.steps} after {args.warmup} warm-up")
    # ResNet-20
    torch.manual_seed(0)
    dense = resnet20(width=args.width)
    targets = resnet_targets(dense)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    t0 = time.perf_counter()
    variants = {"dense": dense}
    for mode in ("fused", "two_step", "auto"):
        variants[f"dsf {mode}"] = pruned_copy(dense, targets, "dsf", args.density, mode)
    variants["dsf auto, compressed"] = pruned_copy(dense, targets, "dsf", args.density, "auto", storage="compressed")
    variants["magnitude (SparseConv2d)"] = pruned_copy(dense, targets, "magnitude", args.density)
    variants["magnitude, compressed"] = pruned_copy(dense, targets, "magnitude", args.density, storage="compressed")
    print(f"(ResNet-20 width {args.width}: {len(targets)} convs pruned in {time.perf_counter() - t0:.1f} s)")
    ce = nn.CrossEntropyLoss()
    fns = {k: train_step_fn(m, lambda mm: ce(mm(x), y)) for k, m in variants.items()}
    res = round_robin(fns, args.warmup, args.steps)
    _print_times(f"ResNet-20 (width {args.width}), batch {args.batch}x3x32x32", res)

    # small LLaMA
    dense = small_llama(args)
    targets = llama_targets(dense)
    ids = torch.randint(0, args.llama_vocab, (args.llama_batch, args.llama_seq))
    t0 = time.perf_counter()
    variants = {"dense": dense}
    for mode in ("fused", "two_step", "auto"):
        variants[f"dsf {mode}"] = pruned_copy(dense, targets, "dsf", args.density, mode)
    variants["dsf auto, compressed"] = pruned_copy(dense, targets, "dsf", args.density, "auto", storage="compressed")
    variants["magnitude (SparseLinear)"] = pruned_copy(dense, targets, "magnitude", args.density)
    variants["magnitude, compressed"] = pruned_copy(dense, targets, "magnitude", args.density, storage="compressed")
    print(f"(LLaMA: {len(targets)} linears pruned in {time.perf_counter() - t0:.1f} s)")
    fns = {k: train_step_fn(m, lambda mm: mm(input_ids=ids, labels=ids).loss) for k, m in variants.items()}
    res = round_robin(fns, args.warmup, args.steps)
    _print_times(f"LLaMA h{args.llama_hidden}/i{args.llama_intermediate}/L{args.llama_layers}/V{args.llama_vocab}, "
                 f"batch {args.llama_batch}x{args.llama_seq}", res)
    if args.profile:
        _profile(variants["dsf fused"], lambda mm: mm(input_ids=ids, labels=ids).loss, "LLaMA dsf fused")
        _profile(variants["dense"], lambda mm: mm(input_ids=ids, labels=ids).loss, "LLaMA dense")


def _profile(model: nn.Module, loss_fn, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    step = train_step_fn(model, loss_fn)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(f"\n### profile: {title} (3 steps)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def _print_times(title: str, res: dict[str, float]) -> None:
    base = res["dense"]
    print(f"\n{title}")
    print("| variant | step ms | vs dense |")
    print("|---|---:|---:|")
    for k, v in res.items():
        print(f"| {k} | {v * 1e3:.1f} | {v / base:.2f}x |")


# ---------------------------------------------------------------------------------------------- size

def _bytes_under(tensors: dict[str, torch.Tensor], prefixes: list[str]) -> int:
    pre = tuple(p + "." for p in prefixes)
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(pre))


def bench_sizes(args: argparse.Namespace) -> None:
    print("\n## Packed size (fp16 values + 1-bit masks), relative to the dense fp16 state dict")
    print("| model | scope | density | dense fp16 KiB | magnitude KiB | DSF KiB | DSF/dense | magn./dense | "
          "DSF/magn. |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    torch.manual_seed(0)
    models = [(f"ResNet-20 w{args.width}", resnet20(width=args.width), resnet_targets),
              ("LLaMA small", small_llama(args), llama_targets)]
    for label, dense, tfn in models:
        targets = tfn(dense)
        dense_all = packed_size_bytes(dense, torch.float16)
        dense_t, _ = pack_model(dense, torch.float16)
        dense_layers = _bytes_under(dense_t, targets)
        for d in args.size_densities:
            row = {}
            for method in ("magnitude", "dsf"):
                m = pruned_copy(dense, targets, method, d)
                tensors, _ = pack_model(m, torch.float16)
                row[method] = (packed_size_bytes(m, torch.float16), _bytes_under(tensors, targets))
            for scope, base, i in (("whole file", dense_all, 0), ("pruned layers", dense_layers, 1)):
                mg, ds = row["magnitude"][i], row["dsf"][i]
                print(f"| {label} | {scope} | {d} | {base / 1024:.1f} | {mg / 1024:.1f} | {ds / 1024:.1f} | "
                      f"{ds / base:.3f} | {mg / base:.3f} | {ds / mg:.2f} |")


# ----------------------------------------------------------------------------------------------- CSR

def _random_sparse(n_out: int, n_in: int, density: float, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n_out, n_in, generator=gen)
    keep = torch.rand(n_out, n_in, generator=gen) < density
    return w * keep


@torch.no_grad()
def bench_csr(args: argparse.Namespace) -> None:
    n, L = args.csr_size, args.csr_layers
    print(f"\n## CSR inference, {L} layers of {n}x{n} (DSF: {2 * L} CSR products of half the nnz each), "
          f"1 thread, median of {args.csr_reps}")
    print("| density | batch | dense ms | CSR ms | CSR-DSF ms | CSR/dense | DSF/dense | DSF/CSR |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    dense = nn.Sequential(*[nn.Linear(n, n, bias=False) for _ in range(L)]).eval()
    for d in args.csr_densities:
        single = nn.Sequential(*[CSRLinear(_random_sparse(n, n, d, gen)) for _ in range(L)])
        double = nn.Sequential(*[CSRDSFLinear(_random_sparse(n, n, d / 2, gen), _random_sparse(n, n, d / 2, gen))
                                 for _ in range(L)])
        for b in args.csr_batches:
            x = torch.randn(b, n, generator=gen) / n ** 0.5
            res = round_robin({name: (lambda m=m, x=x: m(x)) for name, m in
                               (("dense", dense), ("csr", single), ("dsf", double))}, warmup=1, reps=args.csr_reps)
            de, cs, ds = res["dense"], res["csr"], res["dsf"]
            print(f"| {d} | {b} | {de * 1e3:.1f} | {cs * 1e3:.1f} | {ds * 1e3:.1f} | {cs / de:.2f} | {ds / de:.2f} | "
                  f"{ds / cs:.2f} |")
        del single, double


# ---------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    p.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="skip these sections")
    p.add_argument("--threads", type=int, default=1, help="torch threads for the step timing (CSR is always 1)")
    p.add_argument("--density", type=float, default=0.1, help="density of the step-time models")
    p.add_argument("--width", type=int, default=16, help="ResNet-20 width (16 original, 32 paper)")
    p.add_argument("--batch", type=int, default=64, help="ResNet-20 batch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant (median)")
    p.add_argument("--profile", action="store_true", help="profile the LLaMA fused and dense steps")
    p.add_argument("--llama-hidden", type=int, default=256)
    p.add_argument("--llama-intermediate", type=int, default=688)
    p.add_argument("--llama-layers", type=int, default=4)
    p.add_argument("--llama-heads", type=int, default=4)
    p.add_argument("--llama-vocab", type=int, default=1024)
    p.add_argument("--llama-batch", type=int, default=8)
    p.add_argument("--llama-seq", type=int, default=128)
    p.add_argument("--size-densities", type=float, nargs="+", default=[0.1, 0.5])
    p.add_argument("--csr-size", type=int, default=1024)
    p.add_argument("--csr-layers", type=int, default=48)
    p.add_argument("--csr-batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--csr-densities", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    p.add_argument("--csr-reps", type=int, default=5)
    args = p.parse_args(argv)
    sections = [s for s in (args.only or SECTIONS) if s not in args.skip]
    print(f"torch {torch.__version__}, MKL {torch.backends.mkl.is_available()}, sections {sections}")
    t_all = time.perf_counter()
    old = torch.get_num_threads()
    if "step" in sections:
        torch.set_num_threads(args.threads)
        bench_steps(args)
    if "size" in sections:
        bench_sizes(args)
    if "csr" in sections:
        torch.set_num_threads(1)
        bench_csr(args)
    torch.set_num_threads(old)
    print(f"\n(total {time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
