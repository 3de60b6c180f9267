"""The paper's Table 1 layout on SmolLM2-135M: perplexity per method and density, the whole model pruned sequentially.

Each cell is one run of the LLM recipe (``recipes/llama.py``) on the offline default: calibration 32 x 512
tokens of the embedded Wikipedia articles, perplexity on the held-out articles, no fine-tuning. Runs whose
``results.json`` already exists under ``--output-dir`` are read, not rerun, so the table can be filled by
several processes (``--only`` splits the work) and printed at the end:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llm_table.py --output-dir runs/table1 --only magnitude wanda
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/llm_table.py --output-dir runs/table1 --print
    # extra flags go to every run, e.g. zero-shot tasks; --zero-shot prints their table too
    .venv/bin/python benchmarks/llm_table.py --output-dir runs/zs --only magnitude --densities 0.5 \
        --eval-tasks wiki_next_sentence --eval-tasks wiki_cloze --eval-tasks-path tasks/
    .venv/bin/python benchmarks/llm_table.py --output-dir runs/zs --densities 0.5 --print --zero-shot

Rows: ``dense``, the baselines, DSF with its defaults, DSF without finalization (``finalize: []``),
DSF with the paper's fixed mask (``fixed_mask: true``), DSF refitting only the output-side factor (the
paper's LLM finalization), and Wanda / DSF under the global allocation of the model-wide budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

#: ``row name -> (method, factorization options, allocation)``
ROWS: dict[str, tuple[str, dict, str]] = {
    "magnitude": ("magnitude", {}, "uniform"),
    "wanda": ("wanda", {}, "uniform"),
    "sparsegpt": ("sparsegpt", {}, "uniform"),
    "admm": ("admm", {}, "uniform"),
    "dsf": ("dsf", {}, "uniform"),
    "dsf-no-finalization": ("dsf", {"finalize": []}, "uniform"),
    "dsf-fixed-mask": ("dsf", {"fixed_mask": True}, "uniform"),
    "dsf-finalize-second": ("dsf", {"finalize": ["second"]}, "uniform"),
    # the model-wide budget spread by the global rule (the allocation benchmark of the budget issue)
    "wanda-global": ("wanda", {}, "global"),
    "dsf-global": ("dsf", {}, "global"),
}


def run_dir(out: Path, row: str, density: float) -> Path:
    return out / f"{row}-d{density:g}"


def run(out: Path, row: str, density: float, extra: list[str]) -> None:
    method, options, allocation = ROWS[row]
    target = run_dir(out, row, density)
    if (target / "results.json").exists():
        return
    cmd = [sys.executable, "recipes/llama.py", "--method", method, "--density", str(density), "--seq-len", "512",
           "--calibration-samples", "32", "--finetune-steps", "0", "--no-save-merged", "--no-save-packed",
           "--no-progress-bar", "--wandb", "off", "--allocation", allocation, "--output-dir", str(target), *extra]
    if options:
        cmd += ["--factorization-options", json.dumps(options)]
    if any(json.loads(r.read_text())["perplexity"].get("dense") for r in out.glob("*/results.json")):
        cmd.append("--no-eval-dense")  # the same model and windows: another run holds the dense number
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def table(out: Path, densities: list[float]) -> str:
    results = {(row, d): json.loads((run_dir(out, row, d) / "results.json").read_text())
               for row in ROWS for d in densities if (run_dir(out, row, d) / "results.json").exists()}
    if not results:
        return "no runs yet"
    any_result = next(r for r in results.values() if r["perplexity"].get("dense"))
    text = next(iter(any_result["perplexity"]["dense"]))
    dense = any_result["perplexity"]["dense"][text]
    proto = any_result["protocol"]
    head = "| method | " + " | ".join(f"{d:g}" for d in densities) + " |"
    lines = [f"perplexity on `{text}` ({proto['eval'][text]['scored_tokens']} scored tokens), calibration "
             f"{proto['calibration']['tokens']} tokens, seq_len {proto['seq_len']}; cells: perplexity (prune "
             f"seconds)", "", head, "|---|" + "---:|" * len(densities), f"| dense | {dense:.2f} |" +
             " |" * (len(densities) - 1)]
    for row in ROWS:
        cells = []
        for d in densities:
            r = results.get((row, d))
            cells.append("-" if r is None else
                         f"{r['perplexity']['pre_finetune'][text]:.2f} ({r['prune_seconds']:.0f})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def zero_shot_table(out: Path, density: float) -> str:
    """Zero-shot accuracy +- stderr per task (runs made with ``--eval-tasks``): dense, then every method at
    ``density``."""
    results = {row: json.loads((run_dir(out, row, density) / "results.json").read_text())
               for row in ROWS if (run_dir(out, row, density) / "results.json").exists()}
    results = {row: r for row, r in results.items() if r.get("zero_shot")}
    if not results:
        return "no zero-shot runs yet"
    dense = next((r["zero_shot"]["dense"] for r in results.values() if "dense" in r["zero_shot"]), None)
    tasks = list(next(iter(results.values()))["zero_shot"]["pre_finetune"])
    cols = [(t, m) for t in tasks for m in ("acc", "acc_norm") if m in next(iter(results.values()))[
        "zero_shot"]["pre_finetune"][t]]
    lines = ["| model | " + " | ".join(f"{t} {m}" for t, m in cols) + " | mean acc |",
             "|---|" + "---:|" * (len(cols) + 1)]

    def row(name: str, scores: dict) -> str:
        cells = [f"{100 * scores[t][m]:.1f} +- {100 * scores[t][m + '_stderr']:.1f}" for t, m in cols]
        mean = sum(scores[t]["acc"] for t in tasks) / len(tasks)
        return f"| {name} | " + " | ".join(cells) + f" | {100 * mean:.1f} |"

    if dense is not None:
        lines.append(row("dense", dense))
    lines += [row(f"{name} {density:g}", r["zero_shot"]["pre_finetune"]) for name, r in results.items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/table1")
    p.add_argument("--densities", type=float, nargs="+", default=[0.5, 0.4, 0.3])
    p.add_argument("--only", nargs="+", choices=list(ROWS), default=list(ROWS), help="rows to run")
    p.add_argument("--print", action="store_true", help="only print the table of the runs done so far")
    p.add_argument("--zero-shot", action="store_true",
                   help="also print the zero-shot table (runs made with --eval-tasks) at the first density")
    args, extra = p.parse_known_args()
    out = Path(args.output_dir)
    if not args.print:
        for row in args.only:
            for d in args.densities:
                run(out, row, d, extra)
    print(table(out, args.densities))
    if args.zero_shot:
        print(zero_shot_table(out, args.densities[0]))


if __name__ == "__main__":
    main()
