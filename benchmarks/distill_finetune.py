"""Fine-tuning a pruned SmolLM2 with and without distillation from the dense model: perplexity and step time.

Two parts:

* ``finetune``: the pruned model of a recipe run (``--pruned DIR``: its ``packed/`` export, written with
  ``--packed-dtype float32`` so it is the run's model exactly, and its ``results.json``: sequence length,
  windows, one-shot and dense perplexities) is fine-tuned once per ``--losses`` entry through
  :class:`~dsf_lightning.models.CausalLM` (the recipe's optimizer and schedule, the same fine-tuning windows
  of the calibration articles in the same order, the dense SmolLM2 as the teacher), then scored on the run's
  evaluation texts (held-out Wikipedia articles, and another domain the fine-tuning never sees). Reported per
  loss: perplexity per text, the share of the one-shot gap to dense closed, and the median step time.
* ``step-time``: the median training-step time of the pruned model at ``--batch x --seq-len`` tokens for each
  loss (steps 2..n, one process, the losses interleaved round by round): the teacher's cost per step.

    OMP_NUM_THREADS=1 python recipes/llama.py --method dsf --density 0.4 --seq-len 256 --calibration-samples 64 \\
        --eval-samples 128 --finetune-steps 0 --no-save-merged --packed-dtype float32 --output-dir DIR \\
        --eval wikipedia --eval-text lee_background.txt
    OMP_NUM_THREADS=1 python benchmarks/distill_finetune.py finetune --pruned DIR --steps 64
    OMP_NUM_THREADS=1 python benchmarks/distill_finetune.py finetune --pruned DIR --losses none --steps 32 64 128 \\
        --lr-schedules cosine linear
    OMP_NUM_THREADS=1 python benchmarks/distill_finetune.py step-time --pruned DIR --seq-len 512 --batch 2
    python benchmarks/distill_finetune.py step-time --pruned DIR --seq-len 2048 --batch 8 --accelerator gpu \\
        --precision bf16-mixed --teacher-dtype bfloat16     # the GPU measurement (not run here: no GPU)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from dsf_lightning.data.text import (
    TextDataModule,
    calibration_source,
    calibration_windows,
    consecutive_windows,
    eval_sources,
    eval_windows,
)
from dsf_lightning.distill import DistillConfig, distiller_for
from dsf_lightning.dtypes import DTYPES
from dsf_lightning.models.causal_lm import CausalLM, load_causal_lm, load_packed_causal_lm
from dsf_lightning.models.schedules import SCHEDULES, Schedule
from dsf_lightning.perplexity import perplexity
from dsf_lightning.recipes.llm.config import LLMFinetuneConfig

#: the losses compared: ``name -> DistillConfig``
LOSSES = {"none": DistillConfig("none"),
          "logits": DistillConfig("logits", weight=0.5, temperature=1.0),
          "squarehead": DistillConfig("squarehead", weight=1.0),
          "squarehead+kd": DistillConfig("squarehead", weight=1.0, logit_weight=1.0)}


def _sync() -> None:
    if torch.cuda.is_available():  # GPU steps are asynchronous: time what ran, not what was queued
        torch.cuda.synchronize()


class StepTimes(pl.Callback):
    """Wall seconds of every training step (batch start to batch end)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        _sync()
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           i: int) -> None:
        _sync()
        self.seconds.append(time.perf_counter() - self._t)


def fit(pruned: torch.nn.Module, dense: torch.nn.Module, loss: str, train: torch.Tensor, *, steps: int,
        batch: int, lr: float, warmup: int, seed: int, schedule: Schedule = "cosine",
        teacher_dtype: str | None = None, accelerator: str = "cpu", precision: str = "32",
        ) -> tuple[torch.nn.Module, list[float], dict[str, float]]:
    """A copy of ``pruned`` fine-tuned ``steps`` AdamW steps with ``loss``; its step times and last logged terms."""
    model = copy.deepcopy(pruned)
    module = CausalLM(model, lr=lr, warmup_steps=warmup, lr_schedule=schedule,
                      distiller=distiller_for(dense, replace(LOSSES[loss], teacher_dtype=teacher_dtype)))
    times = StepTimes()
    trainer = pl.Trainer(accelerator=accelerator, precision=precision, devices=1, max_steps=steps, max_epochs=-1,
                         gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[times], num_sanity_val_steps=0, limit_val_batches=0)
    pl.seed_everything(seed, workers=True, verbose=False)  # the same windows in the same order for every loss
    trainer.fit(module, datamodule=TextDataModule(train, batch_size=batch))
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train")}
    return model.eval(), times.seconds, logged


def setup(pruned_dir: Path) -> tuple[dict[str, Any], torch.nn.Module, torch.nn.Module, Any]:
    run = json.loads((pruned_dir / "results.json").read_text())
    pruned, tok = load_packed_causal_lm(pruned_dir / "packed")
    dense, _, _ = load_causal_lm(run["config"]["model"]["name_or_path"], run["config"]["model"]["dtype"])
    return run, pruned, dense, tok


def finetune(args: argparse.Namespace) -> None:
    run, pruned, dense, tok = setup(Path(args.pruned))
    data = run["config"]["data"]
    seq_len, seed = data["seq_len"], run["config"]["prune"]["seed"]
    cap = max(4 * data["calibration_samples"], max(args.steps) * args.batch) * seq_len  # the recipe's rule
    _, stream = calibration_windows(tok, calibration_source(data["calibration"], data["calibration_text"]), seq_len,
                                    data["calibration_samples"], seed, max_tokens=cap)
    train = consecutive_windows(stream, seq_len)
    evals = {s.name: eval_windows(tok, s, seq_len, data["eval_samples"])[0]
             for s in eval_sources(data["eval"], data["eval_text"])}
    rows = {}
    for steps in args.steps:
        for schedule in args.lr_schedules:
            for loss in args.losses:
                warmup = LLMFinetuneConfig(steps=steps, warmup_steps=args.warmup).warmup  # the recipe's rule
                model, seconds, logged = fit(pruned, dense, loss, train, steps=steps, batch=args.batch, lr=args.lr,
                                             warmup=warmup, seed=args.seed, schedule=schedule)
                ppl = {n: perplexity(model, w, batch_size=4).perplexity for n, w in evals.items()}
                key = f"{loss} {schedule} {steps}"
                rows[key] = {"loss": loss, "lr_schedule": schedule, "steps": steps, "warmup": warmup,
                             "perplexity": ppl, "step_seconds": statistics.median(seconds[1:]), "logged": logged}
                print(key, json.dumps(rows[key]), flush=True)
    out = {"run": str(args.pruned), "dense": run["perplexity"]["dense"], "one_shot": run["perplexity"]["pre_finetune"],
           "batch": args.batch, "seq_len": seq_len, "lr": args.lr,
           "losses": {k: asdict(LOSSES[k]) for k in args.losses}, "train_windows": train.shape[0], "rows": rows}
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(table(out))


def table(out: dict[str, Any]) -> str:
    """Perplexity per text and loss, with the share of the one-shot gap to dense closed."""
    names = list(out["dense"])
    lines = ["| model | " + " | ".join(names) + " | step s |", "|---|" + "---:|" * (len(names) + 1),
             "| dense | " + " | ".join(f"{out['dense'][n]:.2f}" for n in names) + " | |",
             "| one-shot | " + " | ".join(f"{out['one_shot'][n]:.2f}" for n in names) + " | |"]
    for loss, r in out["rows"].items():
        cells = []
        for n in names:
            closed = (out["one_shot"][n] - r["perplexity"][n]) / (out["one_shot"][n] - out["dense"][n])
            cells.append(f"{r['perplexity'][n]:.2f} ({100 * closed:.0f}%)")
        lines.append(f"| {loss} | " + " | ".join(cells) + f" | {r['step_seconds']:.2f} |")
    return "\n".join(lines)


def step_time(args: argparse.Namespace) -> None:
    _, pruned, dense, _ = setup(Path(args.pruned))
    torch.manual_seed(0)
    train = torch.randint(0, pruned.config.vocab_size, (args.batch * args.steps[0], args.seq_len))
    times: dict[str, list[float]] = {k: [] for k in args.losses}
    for _ in range(args.rounds):  # interleaved: drift in the machine's speed hits every loss alike
        for loss in args.losses:
            _, seconds, _ = fit(pruned, dense, loss, train, steps=args.steps[0], batch=args.batch, lr=1e-4, warmup=0,
                                seed=0, teacher_dtype=args.teacher_dtype, accelerator=args.accelerator,
                                precision=args.precision)
            times[loss] += seconds[1:]
    base = statistics.median(times["none"])
    for loss, s in times.items():
        print(f"{loss}: median {statistics.median(s):.3f} s / step over {len(s)} steps, "
              f"{statistics.median(s) / base:.2f}x none")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("finetune", "step-time"))
    p.add_argument("--pruned", required=True, help="a recipe run's output dir (packed/ in float32, results.json)")
    p.add_argument("--losses", nargs="+", choices=tuple(LOSSES), default=list(LOSSES))
    p.add_argument("--steps", type=int, nargs="+", default=[64], help="finetune: one fine-tune per entry")
    p.add_argument("--lr-schedules", nargs="+", choices=SCHEDULES, default=["cosine"],
                   help="finetune: one fine-tune per entry")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps; default: 10%% of the steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=512, help="step-time only")
    p.add_argument("--rounds", type=int, default=2, help="step-time only")
    p.add_argument("--teacher-dtype", choices=tuple(DTYPES), help="step-time only; default: the dense model's")
    p.add_argument("--accelerator", default="cpu", help="step-time only (gpu: the ready GPU measurement)")
    p.add_argument("--precision", default="32", help="step-time only: Lightning's (bf16-mixed on a GPU)")
    p.add_argument("--output", default="distill_finetune.json")
    args = p.parse_args()
    if args.part == "step-time" and len(args.steps) != 1:
        p.error(f"step-time times one fit length: give one --steps value, got {args.steps}")
    if args.part == "finetune":
        finetune(args)
    else:
        step_time(args)


if __name__ == "__main__":
    main()
