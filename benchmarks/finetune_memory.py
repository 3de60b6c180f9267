"""Fine-tuning memory and step time of dense, single-mask and DSF (masked / compressed) models (paper Table 6).

Two parts, each a table of the rows dense, single mask, DSF masked and DSF compressed:

* ``meta``: LLaMA-2-7B shapes, training state only. Trainable elements x (fp32 parameter + gradient + AdamW's
  two moments = 16 bytes) + every buffer's bytes, read from the tensors of the project's own modules: one module
  per distinct shape (masked ones on the meta device; compressed ones on the CPU with :func:`magnitude_pattern_`
  at the layer's nnz budget, since the values count is data), counted once per layer of that shape.
* ``smollm2``: the real SmolLM2-135M fine-tuned through :class:`~dsf_lightning.models.CausalLM` in a plain
  ``Trainer`` (AdamW, activation checkpointing), each row in its own process, one after the other. Per row,
  from :class:`~dsf_lightning.callbacks.TrainingMemory` (what every recipe run records): the training state
  read exactly from the tensors after an optimizer step (parameters, gradients, optimizer state, buffers) and
  the peak memory of the fine-tune steps (RSS sampled every 2 ms on a CPU, ``torch.cuda.max_memory_allocated``
  on a GPU); and the median step time after the first step. Patterns: :func:`magnitude_pattern_` at each
  layer's budget (memory and time depend on the counts, not on which entries are kept).
* ``sharded``: LLaMA-2-7B and LLaMA-2-70B shapes, training state per rank under FSDP2 on ``--ranks`` ranks
  (``CausalLM`` under ``ModelParallelStrategy``): every parameter with its gradient and AdamW moments is split
  over the ranks, and so are the compressed bit patterns (frozen parameters); the masked storage's bool masks are
  buffers, whole on every rank. Counted from the shapes and the
  budget rule; the count is checked against the modules' own tensors (``meta``'s count) for the 7B shapes.
* ``--longest-seq``, on a GPU only: per row, the longest sequence at batch 16 whose fine-tune step fits under
  ``--cap-gib`` (``torch.cuda.set_per_process_memory_fraction``), as Table 6 does.

    python benchmarks/finetune_memory.py meta [--density 0.5]
    python benchmarks/finetune_memory.py sharded --ranks 8 [--density 0.5]
    OMP_NUM_THREADS=1 python benchmarks/finetune_memory.py smollm2 --threads 1 --batch 2 --seq-len 512
    python benchmarks/finetune_memory.py smollm2 --device cuda --longest-seq --batch 16 --cap-gib 40  # a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsf_lightning.factorization import nnz_budget  # noqa: E402
from dsf_lightning.modules import DSFLinear, MaskedLayer, SparseLinear, pruned_module  # noqa: E402

GIB, MIB = 2 ** 30, 2 ** 20
ADAMW_BYTES = 16  # fp32 parameter, gradient, exp_avg, exp_avg_sq
# LLaMA-2-7B: 32 blocks of q/k/v/o (4096x4096), gate/up (11008x4096), down (4096x11008); untied embeddings
HIDDEN, INTER, BLOCKS, VOCAB = 4096, 11008, 32, 32000
SHAPES = {(HIDDEN, HIDDEN): 4 * BLOCKS, (INTER, HIDDEN): 2 * BLOCKS, (HIDDEN, INTER): BLOCKS}
DENSE_REST = 2 * VOCAB * HIDDEN + (2 * BLOCKS + 1) * HIDDEN  # embeddings, lm_head, RMSNorms: trained, not pruned
#: row -> (method, storage) of the prune; dense is not pruned
ROWS = {"dense": (None, None), "single mask": ("magnitude", "masked"), "DSF masked": ("dsf", "masked"),
        "DSF compressed": ("dsf", "compressed")}


def state_bytes(m: nn.Module) -> int:
    """Trainable elements x 16 bytes + buffer bytes."""
    params = sum(p.numel() for p in m.parameters() if p.requires_grad) * ADAMW_BYTES
    return params + sum(b.numel() * b.element_size() for b in m.buffers())


@torch.no_grad()
def magnitude_pattern_(m: MaskedLayer, density: float) -> None:
    """The layer's nnz budget on a module holding its dense weight (``build_structure``'s full masks: DSF as
    the weight times an identity square factor): the identity's diagonal, and the weight's largest entries
    for the rest. The model stays sane (random values overflow the logits into denormal gradients, which
    slow the CPU's GEMMs 30x); memory and step time depend on the counts only."""
    budget = nnz_budget(density, m.out_dim * m.fan_in)
    if len(m.factor_names) == 2:
        eye, name = ("second", "first") if m.out_dim <= m.fan_in else ("first", "second")
        square = m.factor(eye)
        m.set_factor_(eye, square, square != 0)
        budget -= int(m.factor_mask(eye).sum())
    else:
        name = "weight"
    w = m.factor(name)
    mask = torch.zeros(w.numel(), dtype=torch.bool)
    mask[w.abs().flatten().topk(budget).indices] = True
    m.set_factor_(name, w, mask.view(w.shape))


# ------------------------------------------------------------------------------------------ meta

def layer_state(row: str, out: int, in_: int, density: float) -> int:
    if row == "dense":
        return (out * in_) * ADAMW_BYTES
    if row == "single mask":
        return state_bytes(SparseLinear(in_, out, bias=False, device="meta"))
    if row == "DSF masked":
        return state_bytes(DSFLinear(in_, out, min(out, in_), bias=False, device="meta"))
    m = pruned_module(nn.Linear(in_, out, bias=False), two_factor=True)  # the values count is data: on the CPU
    magnitude_pattern_(m, density)
    return state_bytes(m.set_storage_("compressed"))


def meta(args: argparse.Namespace) -> None:
    rows = []
    for row in ROWS:
        pruned = sum(n * layer_state(row, o, i, args.density) for (o, i), n in SHAPES.items())
        rows.append((row, pruned + DENSE_REST * ADAMW_BYTES))
    dense = rows[0][1]
    print(f"LLaMA-2-7B shapes, AdamW fp32, density {args.density} (pruned layers), bytes from the modules' tensors")
    print("| model | training state | vs dense |\n|---|---:|---:|")
    for row, b in rows:
        print(f"| {row} | {b / GIB:.1f} GiB | {b / dense:.2f}x |")


#: Decoder shapes: hidden, intermediate, blocks, vocabulary, key/value width (grouped-query attention in 70B)
MODELS = {"LLaMA-2-7B": (4096, 11008, 32, 32000, 4096), "LLaMA-2-70B": (8192, 28672, 80, 32000, 1024)}


def model_shapes(hidden: int, inter: int, blocks: int, vocab: int, kv: int) -> tuple[dict, int]:
    """``{(out, in): count}`` of the pruned projections and the trained dense elements (embeddings, head, norms)."""
    shapes: dict[tuple[int, int], int] = {}
    for shape, n in (((hidden, hidden), 2), ((kv, hidden), 2), ((inter, hidden), 2), ((hidden, inter), 1)):
        shapes[shape] = shapes.get(shape, 0) + n * blocks
    return shapes, 2 * vocab * hidden + (2 * blocks + 1) * hidden


def layer_split(row: str, out: int, in_: int, density: float) -> tuple[int, int]:
    """``(sharded, whole)`` bytes of one layer under FSDP2: the parameter state, and the compressed storage's bit
    patterns (frozen parameters when sharded: ``MaskedLayer.patterns_to_parameters_``), split over the ranks;
    the masked storage's bool masks, buffers, whole on every rank."""
    r = min(out, in_)
    if row == "dense":
        return out * in_ * ADAMW_BYTES, 0
    if row == "single mask":
        return out * in_ * ADAMW_BYTES, out * in_  # bool mask
    if row == "DSF masked":
        return (r * in_ + out * r) * ADAMW_BYTES, r * in_ + out * r
    return nnz_budget(density, out * in_) * ADAMW_BYTES + -(-r * in_ // 8) + -(-out * r // 8), 0  # values, bits


def sharded(args: argparse.Namespace) -> None:
    h, i, b, v, kv = MODELS["LLaMA-2-7B"]
    shapes, rest = model_shapes(h, i, b, v, kv)
    assert shapes == SHAPES and rest == DENSE_REST
    for row in ROWS:  # the count from the shapes is the modules' own count (meta)
        split = sum(n * sum(layer_split(row, o, i_, args.density)) for (o, i_), n in shapes.items())
        assert split == sum(n * layer_state(row, o, i_, args.density) for (o, i_), n in shapes.items()), row
    print(f"training state per rank, AdamW fp32, density {args.density} (pruned layers), FSDP2 on {args.ranks} ranks "
          f"(parameters, gradients, moments and packed bit patterns split; bool masks whole)")
    print("| model | row | unsharded | per rank | of which buffers (whole) | per rank vs dense unsharded |\n"
          "|---|---|---:|---:|---:|---:|")
    for name, dims in MODELS.items():
        shapes, rest = model_shapes(*dims)
        dense = (sum(n * o * i_ for (o, i_), n in shapes.items()) + rest) * ADAMW_BYTES
        for row in ROWS:
            splits = {shape: layer_split(row, *shape, args.density) for shape in shapes}
            parts = [(n * splits[shape][0], n * splits[shape][1]) for shape, n in shapes.items()]
            params = rest * ADAMW_BYTES + sum(p for p, _ in parts)  # split over the ranks
            buffers = sum(b for _, b in parts)  # whole on every rank
            per_rank = params / args.ranks + buffers
            print(f"| {name} | {row} | {(params + buffers) / GIB:.1f} GiB | {per_rank / GIB:.2f} GiB | "
                  f"{buffers / GIB:.2f} GiB | {per_rank / dense:.3f}x |")


# --------------------------------------------------------------------------------------- smollm2

def _pruned_smollm2(row: str, density: float, device: str) -> tuple[nn.Module, object]:
    """The offline SmolLM2-135M with its LLM targets pruned as ``row`` says (:func:`magnitude_pattern_`),
    and its tokenizer."""
    from dsf_lightning.config import PruneConfig
    from dsf_lightning.models import load_causal_lm
    from dsf_lightning.pipeline.install import build_structure
    from dsf_lightning.pipeline.plan import plan_prune

    model, tokenizer, _ = load_causal_lm(None)
    method, storage = ROWS[row]
    if method is not None:
        plan = build_structure(model, plan_prune(model, PruneConfig(density, method, storage=storage)))
        for m in plan.targets.values():
            magnitude_pattern_(m, density)
    return model.to(device), tokenizer


def run_row(args: argparse.Namespace) -> dict:
    """Fine-tune one row for ``args.steps`` steps in a plain Trainer; its figures as a dict."""
    import lightning.pytorch as pl
    import psutil

    from dsf_lightning.callbacks import TrainingMemory
    from dsf_lightning.data.text import TextDataModule, calibration_source, calibration_windows
    from dsf_lightning.models import CausalLM

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    model, tokenizer = _pruned_smollm2(args.row, args.density, args.device)
    windows, _ = calibration_windows(tokenizer, calibration_source(), args.seq_len, args.batch * args.steps)
    module = CausalLM(model, lr=1e-4, weight_decay=0.01, gradient_checkpointing=True)
    gc.collect()
    if sys.platform == "linux":  # hand the heap freed by the prune back to the OS: the peak is of the fine-tune
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    figures: dict = {"row": args.row, "rss_before_fit": psutil.Process().memory_info().rss}

    class StepTimes(pl.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)

    times, memory = StepTimes(), TrainingMemory(interval=0.002)
    trainer = pl.Trainer(accelerator="gpu" if cuda else "cpu", devices=1, max_steps=args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[times, memory])
    trainer.fit(module, datamodule=TextDataModule(windows, batch_size=args.batch))
    figures.update(state=memory.figures["training_state_bytes"], peak=memory.figures["peak_bytes"],
                   peak_kind=memory.figures["peak_kind"], storage=memory.figures["storage"],
                   step_seconds=times.times, step_median=statistics.median(times.times[1:] or times.times))
    return figures


def longest_seq(args: argparse.Namespace) -> dict:
    """On a GPU: the longest sequence at ``args.batch`` whose AdamW step fits under ``args.cap_gib``."""
    from dsf_lightning.models.causal_lm import set_activation_checkpointing

    if not torch.cuda.is_available():
        raise SystemExit("--longest-seq needs a CUDA GPU")
    torch.cuda.set_per_process_memory_fraction(args.cap_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    model = _pruned_smollm2(args.row, args.density, "cuda")[0].train()
    set_activation_checkpointing(model, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def fits(seq: int) -> bool:
        try:
            ids = torch.randint(0, model.config.vocab_size, (args.batch, seq), device="cuda")
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return True
        except torch.cuda.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            return False
        finally:
            torch.cuda.empty_cache()

    lo, hi = 0, 128
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 64:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return {"row": args.row, "longest_seq": lo, "batch": args.batch, "cap_gib": args.cap_gib}


def _without_rows(argv: list[str]) -> list[str]:
    """``argv`` less ``--rows`` and its values (each row process gets ``--row``)."""
    out, skipping = [], False
    for a in argv:
        if a == "--rows":
            skipping = True
        elif skipping and not a.startswith("--"):
            continue
        else:
            skipping = False
            out.append(a)
    return out


def smollm2(args: argparse.Namespace) -> None:
    results = []
    for row in args.rows:  # one process per row: clean peaks, one measurement at a time
        cmd = [sys.executable, __file__, "row", "--row", row, *_without_rows(sys.argv[2:])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"row {row!r} failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{row}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    if args.longest_seq:
        print(f"longest sequence at batch {args.batch} under {args.cap_gib} GiB (SmolLM2-135M, density "
              f"{args.density})\n| model | tokens |\n|---|---:|")
        for r in results:
            print(f"| {r['row']} | {r['longest_seq']} |")
        return
    by_row = {r["row"]: r for r in results}
    dense, masked = by_row["dense"], by_row.get("DSF masked")

    def vs_masked(r: dict) -> str:
        return f"{r['step_median'] / masked['step_median']:.2f}x" if masked else "-"

    print(f"SmolLM2-135M, density {args.density}, batch {args.batch} x {args.seq_len} tokens, AdamW, activation "
          f"checkpointing, {args.threads} thread(s), {args.steps} steps (median after the first), {args.device}")
    print("| model | params | grads | optimizer | buffers | training state | vs dense | peak (" +
          results[0]["peak_kind"] + ") | vs dense | step s | vs dense | vs DSF masked |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["state"]
        print(f"| {r['row']} | {s['parameters'] / MIB:.0f} MiB | {s['gradients'] / MIB:.0f} MiB | "
              f"{s['optimizer'] / MIB:.0f} MiB | {s['buffers'] / MIB:.1f} MiB | {s['total'] / MIB:.0f} MiB | "
              f"{s['total'] / dense['state']['total']:.2f}x | {r['peak'] / MIB:.0f} MiB | "
              f"{r['peak'] / dense['peak']:.2f}x | {r['step_median']:.2f} | "
              f"{r['step_median'] / dense['step_median']:.2f}x | {vs_masked(r)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["meta", "sharded", "smollm2", "row"],
                   help="row: one SmolLM2 row (used by smollm2)")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW",
                   help=f"the rows to run, of {list(ROWS)} (dense is the reference: always include it)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--longest-seq", action="store_true", help="GPU: longest sequence at --batch under --cap-gib")
    p.add_argument("--cap-gib", type=float, default=40.0)
    p.add_argument("--ranks", type=int, default=8, help="sharded: the number of FSDP2 ranks")
    args = p.parse_args()
    if args.part == "meta":
        meta(args)
    elif args.part == "sharded":
        sharded(args)
    elif args.part == "smollm2":
        smollm2(args)
    else:
        print(json.dumps(longest_seq(args) if args.longest_seq else run_row(args)))


if __name__ == "__main__":
    main()
