"""The LLM recipe fine-tuning a DSF-pruned SmolLM2 with ``--strategy ddp`` and ``--strategy fsdp``, side by side.

Both runs prune the same model the same way (the prune is unsharded and deterministic), then fine-tune on the
same windows: DDP with the whole model on every rank, FSDP2 with it sharded by decoder block. Per run, from
its ``results.json``: rank 0's training state after the first step (``TrainingMemory``: parameters, gradients,
AdamW state, buffers), its peak memory, the fine-tune's seconds, perplexity before and after fine-tuning, and
the nonzeros outside the masks; then the exports compared: the packed files' bit patterns (``torch.equal``)
and the largest difference of any value, relative to that tensor's largest magnitude.

The same command runs on CPUs (gloo) and on a machine with several GPUs (NCCL; one GPU cannot hold 2 NCCL
ranks)::

    OMP_NUM_THREADS=1 python benchmarks/sharded_finetune.py --blocks 2 --devices 2 --accelerator cpu
    python benchmarks/sharded_finetune.py --devices 8 --accelerator gpu --steps 50 --seq-len 512  # 8 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def _model_folder(blocks: int | None, where: Path) -> str:
    """The offline SmolLM2-135M, cut to its first ``blocks`` decoder blocks when given, as a saved folder."""
    from dsf_lightning.data import load_smollm2

    model, tok = load_smollm2()
    if blocks is not None:
        model.model.layers = model.model.layers[:blocks]
        model.config.num_hidden_layers = blocks
    folder = where / f"smollm2-{blocks or 'all'}-blocks"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def _run(strategy: str, model: str, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(ROOT / "recipes" / "llama.py"), "--model", model, "--strategy", strategy,
           "--devices", str(args.devices), "--accelerator", args.accelerator, "--method", "dsf",
           "--density", str(args.density), "--seq-len", str(args.seq_len), "--calibration-samples",
           str(args.calibration_samples), "--eval-samples", str(args.eval_samples), "--finetune-steps",
           str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--output-dir", str(out),
           "--wandb", "off", "--no-progress-bar", "--factorization-options", args.factorization_options]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads((out / "results.json").read_text())


def _compare_packed(a: Path, b: Path) -> tuple[bool, float]:
    """Whether every bit pattern is equal, and the largest value difference relative to its tensor's scale."""
    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        raise SystemExit(f"the packed exports hold different tensors: {sorted(ta.keys() ^ tb.keys())[:5]}")
    masks = all(torch.equal(ta[k], tb[k]) for k in ta if not ta[k].is_floating_point())
    worst = max(float((ta[k].float() - tb[k].float()).abs().max() / tb[k].float().abs().max().clamp_min(1e-30))
                for k in ta if ta[k].is_floating_point() and ta[k].numel())
    return masks, worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=None, help="cut SmolLM2 to its first N decoder blocks")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=2, help="per process")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--calibration-samples", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=8)
    p.add_argument("--factorization-options", default='{"outer_iters": 4}')
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary folder)")
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="sharded-finetune-"))
    out.mkdir(parents=True, exist_ok=True)
    model = _model_folder(args.blocks, out)
    runs = {s: _run(s, model, out / s, args) for s in ("ddp", "fsdp")}
    print(f"SmolLM2 ({args.blocks or 'all'} blocks), DSF at {args.density}, {args.devices} x {args.accelerator}, "
          f"{args.steps} steps of {args.batch_size} x {args.seq_len} tokens per process\n")
    print("| strategy | rank 0 training state (MiB) | of which buffers | peak (MiB) | fine-tune s | ppl pruned | "
          "ppl fine-tuned | nonzeros outside masks |")
    print("|---|---|---|---|---|---|---|---|")
    for s, r in runs.items():
        mem, ppl = r["finetune_memory"], r["perplexity"]
        state = mem["training_state_bytes"]
        text = next(iter(ppl["pre_finetune"]))
        print(f"| {s} | {state['total'] / 2**20:.2f} | {state['buffers'] / 2**20:.2f} | "
              f"{(mem['peak_bytes'] or 0) / 2**20:.0f} ({mem.get('peak_kind', '')}) | {r['finetune_seconds']:.1f} | "
              f"{ppl['pre_finetune'][text]:.4f} | {ppl['post_finetune'][text]:.4f} | {r['nonzeros_outside_masks']} |")
    ddp, fsdp = (runs[s]["finetune_memory"]["training_state_bytes"] for s in ("ddp", "fsdp"))
    sharded = (fsdp["total"] - fsdp["buffers"]) / (ddp["total"] - ddp["buffers"])
    masks, worst = _compare_packed(out / "fsdp" / "packed" / "dsf-packed.safetensors",
                                   out / "ddp" / "packed" / "dsf-packed.safetensors")
    print(f"\nfsdp / ddp rank-0 training state: {fsdp['total'] / ddp['total']:.3f}x "
          f"(without the replicated buffers: {sharded:.3f}x)")
    print(f"packed exports: bit patterns equal: {masks}; largest value difference: {worst:.2e} of the tensor's "
          f"largest magnitude (fp16 export)")


if __name__ == "__main__":
    main()
