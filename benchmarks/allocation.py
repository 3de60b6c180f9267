"""Global budget allocation against uniform density at the same total budget (issue: "spend the budget well").

``vision``: the ResNet-20 demo (``python -m dsf_lightning.recipes.demo``) at one density for several seeds, each
seed's dense weights trained once and then pruned under every allocation rule (DSF and magnitude,
data-free, as the demo does); prints pre-fine-tuning, BN-recalibrated and post-fine-tuning accuracy.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/allocation.py vision --seeds 0 1 2

``llm``: the real SmolLM2-135M, every linear layer of its 30 decoder blocks pruned in one pass with
Grams from Wikipedia windows, under every allocation rule; prints held-out perplexity.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/allocation.py llm --methods wanda dsf --densities 0.5 0.3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

RULES = ("uniform", "global", "owl")


def vision(args: argparse.Namespace) -> None:
    from dsf_lightning.recipes.demo import main as demo

    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for seed in args.seeds:
        dense = os.path.join(args.output_dir, f"resnet20-{args.width}-dense-s{seed}.pt")
        for rule in args.rules:
            argv = ["--seed", str(seed), "--density", str(args.density), "--allocation", rule, "--width",
                    str(args.width), "--wandb", "off", "--output-dir", args.output_dir]
            if os.path.exists(dense):
                argv += ["--dense-weights", dense]
            for method, metrics in demo(argv).items():
                rows.setdefault((rule, method), []).append(metrics)
    stages = ("pre_finetune", "bn_recalibrated", "post_finetune")
    print(f"\nResNet-20-{args.width}, digits, density {args.density}, seeds {args.seeds}: val top-1 % "
          f"(mean over seeds; per seed in brackets)")
    print("| allocation | method | " + " | ".join(stages) + " |")
    print("|---|---|" + "---:|" * len(stages))
    for (rule, method), runs in rows.items():
        cells = []
        for s in stages:
            vals = [100 * r[f"{s}/val_acc"] for r in runs]
            cells.append(f"{statistics.mean(vals):.2f} [{', '.join(f'{v:.2f}' for v in vals)}]")
        print(f"| {rule} | {method} | " + " | ".join(cells) + " |")


def llm(args: argparse.Namespace) -> None:
    import copy

    import torch

    from dsf_lightning import PruneConfig, prune
    from dsf_lightning.data import load_smollm2, token_batches, wikipedia_texts
    from dsf_lightning.perplexity import perplexity

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    texts = wikipedia_texts()
    calib = token_batches(tokenizer, texts[: len(texts) // 2], args.seq_len, args.calibration_samples, seed=0)
    held_out = token_batches(tokenizer, texts[len(texts) // 2:], args.seq_len, args.eval_samples, seed=1)
    dense_ppl = perplexity(model, held_out)
    print(f"SmolLM2-135M dense held-out perplexity {dense_ppl:.2f} ({held_out.numel()} tokens); calibration "
          f"{calib.numel()} tokens")
    print("| method | density | allocation | perplexity | mean error vs magnitude | seconds |")
    print("|---|---:|---|---:|---:|---:|")
    for method in args.methods:
        for density in args.densities:
            for rule in args.rules:
                pruned = copy.deepcopy(model)
                cfg = PruneConfig(density=density, method=method, allocation=rule, calibration_batches=None)
                t = time.perf_counter()
                report = prune(pruned, cfg, calibration=list(calib.split(8)), progress=False,
                               forward=lambda m, ids: m(input_ids=ids, use_cache=False))
                seconds = time.perf_counter() - t
                print(f"| {method} | {density} | {rule} | {perplexity(pruned, held_out):.2f} | "
                      f"{report.totals()['mean_error_vs_magnitude']:.3f} | {seconds:.0f} |", flush=True)
                del pruned


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="task", required=True)
    v = sub.add_parser("vision", help="the ResNet-20 digits demo under every allocation rule")
    v.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    v.add_argument("--density", type=float, default=0.1)
    v.add_argument("--width", type=int, default=32)
    v.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    v.add_argument("--output-dir", default="lightning_logs/allocation")
    v.set_defaults(run=vision)
    m = sub.add_parser("llm", help="SmolLM2-135M, one-shot layer-wise, every allocation rule")
    m.add_argument("--methods", nargs="+", default=["wanda", "dsf"])
    m.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.3])
    m.add_argument("--rules", nargs="+", choices=RULES, default=list(RULES))
    m.add_argument("--calibration-samples", type=int, default=32)
    m.add_argument("--eval-samples", type=int, default=32)
    m.add_argument("--seq-len", type=int, default=512)
    m.set_defaults(run=llm)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
