"""Time the prune step of ``DSFPruneCallback`` (its ``on_fit_start`` hook) on CPU, 1 vs N processes.

The callback builds the pruned structure in ``setup`` and prunes in ``on_fit_start``: it (layer-wise)
records calibration Grams and all-reduces them, factorizes every target layer (under DDP each rank its
share, chosen by cost, then every layer's factors are broadcast from their owner) and fills the pruned
modules. This
script wraps a model in a minimal LightningModule (a trivial ``training_step``, no validation,
``evaluate=False``), runs ``trainer.fit`` with ``max_steps=1`` under
``Trainer(accelerator="cpu", devices=N, strategy="ddp" if N > 1 else "auto")`` (gloo) and reports,
per run (maximum over ranks):

* ``prune s``: ``cb.report.seconds`` -- calibration forward passes, Gram all-reduce, factorization,
  broadcast and filling the modules;
* ``hook s``: wall time of the whole ``on_fit_start`` hook (a timing subclass);
* ``hook CPU s``: the process CPU time of the hook per rank (``time.process_time``; less sensitive
  than wall time to other jobs sharing the cores, but it counts gloo's helper threads too);
* ``busy s``: the summed per-layer seconds of the layers the rank factorized itself (its load;
  the LPT split's balance is ``max busy / mean busy``).

Every run is launched as a subprocess running this file (``--worker``), as
``tests/test_callback_ddp.py`` does, because Lightning's ``ddp`` strategy relaunches ``sys.argv``
for the other ranks; each rank writes ``rank<r>.json`` into a temporary folder. Each process gets
``--threads`` torch threads (default 1: two processes use two cores).

Models:

* ``resnet20``: CIFAR ResNet-20 (``width`` 16), random weights, data-free by default
  (``--calibration-batches 0``), vision preset: 21 convs (2 of them 1x1 shortcuts) + fc, minus the stem and
  the head = 20 layers.
* ``smollm2``: the real SmolLM2-135M (``load_smollm2()``, 30 LLaMA decoder blocks), targets the 7
  projections of the decoder blocks given by ``--blocks`` (default 2 blocks: 14 layers, a few
  minutes on one core). All 30 blocks have the same shapes (q/o 576x576, k/v 192x576,
  gate/up 1536x576, down 576x1536), so the factorization time of the full model is
  ``30 / len(blocks)`` times that of the run (and the DDP split of 30 x 7 layers balances better,
  not worse). The calibration pass, by contrast, always runs the whole model: its cost does not
  grow with the number of target blocks. Layer-wise by default: ``--calibration-batches`` windows of
  ``--seq-len`` tokens (``--batch-size`` per batch) from gensim's Wikipedia dump.

``--calibration-batches`` is the *total* over all ranks: with N processes every rank records
``total / N`` batches of its own shard (every N-th batch of the calibration loader), so 1 and N
processes calibrate on the same samples.

    .venv/bin/python benchmarks/prune_step.py --model resnet20 --compare
    .venv/bin/python benchmarks/prune_step.py --model smollm2 --density 0.5 --compare
    .venv/bin/python benchmarks/prune_step.py --model smollm2 --devices 2 --blocks 0 1 2 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["resnet20", "smollm2"], default="resnet20")
    p.add_argument("--devices", type=int, default=1, help="DDP processes (1: no DDP)")
    p.add_argument("--compare", action="store_true",
                   help="run with 1 process, then with --devices-compare processes (same settings); print the ratio")
    p.add_argument("--devices-compare", type=int, default=2, help="processes of the second --compare run")
    p.add_argument("--density", type=float, default=None, help="default: 0.1 (resnet20), 0.5 (smollm2)")
    p.add_argument("--method", default="dsf")
    p.add_argument("--width", type=int, default=16, help="resnet20 width")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 1],
                   help="smollm2 decoder blocks to prune (7 projections each)")
    p.add_argument("--calibration-batches", type=int, default=None,
                   help="total over all ranks; 0 = data-free. Default: 0 (resnet20), 8 (smollm2)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 images (resnet20), 2 sequences (smollm2)")
    p.add_argument("--seq-len", type=int, default=128, help="smollm2 calibration window length")
    p.add_argument("--outer-iters", type=int, default=None, help="DSF outer iterations (default: the method's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--json", default=None, help="write the summary (and per-rank records) here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # output folder: run one trainer.fit
    a = p.parse_args(argv)
    if a.density is None:
        a.density = 0.1 if a.model == "resnet20" else 0.5
    if a.calibration_batches is None:
        a.calibration_batches = 0 if a.model == "resnet20" else 8
    if a.batch_size is None:
        a.batch_size = 16 if a.model == "resnet20" else 2
    if a.devices < 1 or a.devices_compare < 2:
        p.error("--devices must be >= 1 and --devices-compare >= 2")
    for n in ({1, a.devices_compare} if a.compare else {a.devices}):
        if a.calibration_batches % n:
            p.error(f"--calibration-batches ({a.calibration_batches}) must be divisible by the process count {n}")
    return a


# ------------------------------------------------------------------------------------------------
# worker: one trainer.fit (every DDP rank runs this)
# ------------------------------------------------------------------------------------------------
def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from dsf_lightning.callbacks import DSFPruneCallback

    class TimedPrune(DSFPruneCallback):
        """Wall and CPU time of the whole ``on_fit_start`` hook, where the callback prunes."""

        hook_seconds = hook_cpu_seconds = float("nan")

        def on_fit_start(self, trainer, pl_module):
            t0, c0 = time.perf_counter(), time.process_time()
            super().on_fit_start(trainer, pl_module)
            self.hook_seconds = time.perf_counter() - t0
            self.hook_cpu_seconds = time.process_time() - c0

    devices = a.devices
    per_rank = a.calibration_batches // devices
    g = torch.Generator().manual_seed(0)
    if a.model == "resnet20":
        import torch.nn.functional as F

        from dsf_lightning.models.resnet20 import resnet20

        class Net(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = resnet20(num_classes=10, width=a.width)

            def forward(self, x):
                return self.model(x)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return F.cross_entropy(self(x), y)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        pl.seed_everything(0, verbose=False)
        module = Net()
        n = max(a.calibration_batches, 1) * a.batch_size
        data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
        include = None
    else:
        from dsf_lightning.data.offline import load_smollm2, token_batches, wikipedia_texts

        class LM(pl.LightningModule):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, ids):
                return self.model(input_ids=ids).logits

            def training_step(self, batch, batch_idx):
                (ids,) = batch
                return self.model(input_ids=ids, labels=ids).loss

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.0)

        model, tok = load_smollm2()
        module = LM(model)
        n = max(a.calibration_batches, 1) * a.batch_size
        if a.calibration_batches:
            ids = token_batches(tok, wikipedia_texts(max_articles=200), a.seq_len, n, seed=0)
        else:
            ids = torch.randint(0, tok.vocab_size, (n, a.seq_len), generator=g)
        data = TensorDataset(ids)
        blocks = "|".join(str(b) for b in a.blocks)
        include = [rf"model\.model\.layers\.({blocks})\.(self_attn|mlp)\.\w+_proj"]

    # the calibration loader is a plain DataLoader: under DDP the callback gives rank r every N-th batch
    loader = DataLoader(data, batch_size=a.batch_size, shuffle=False)
    opts = {} if a.outer_iters is None else {"outer_iters": a.outer_iters}
    cb = TimedPrune(a.density, a.method, calibration_batches=per_rank,
                    calibration_loader=loader if per_rank else None, include=include,
                    factorization_options=opts, evaluate=False, progress=False)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=1, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb])
    t0 = time.perf_counter()
    trainer.fit(module, DataLoader(data, batch_size=a.batch_size, shuffle=False))
    fit_s = time.perf_counter() - t0
    rank = trainer.global_rank
    owned = set(cb.owned_layers)
    rec = {
        "rank": rank, "world": trainer.world_size, "threads": torch.get_num_threads(),
        "layers": len(cb.report.layers), "owned": sorted(owned),
        "prune_s": cb.report.seconds, "hook_s": cb.hook_seconds, "hook_cpu_s": cb.hook_cpu_seconds,
        "fit_s": fit_s,
        "busy_s": sum(r.seconds for r in cb.report.layers if r.name in owned),
        "layer_seconds": {r.name: r.seconds for r in cb.report.layers},
        "shapes": {r.name: list(r.shape) for r in cb.report.layers},
        "calibration_tokens": sum(cb.report.calibration_tokens.values()) // max(len(cb.report.calibration_tokens), 1),
        "mean_relative_error": cb.report.totals()["mean_relative_error"],
    }
    with open(os.path.join(a.worker, f"rank{rank}.json"), "w") as f:
        json.dump(rec, f)


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def _worker_argv(a: argparse.Namespace, devices: int, out: str) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--worker", out, "--model", a.model, "--devices", str(devices),
            "--density", str(a.density), "--method", a.method, "--width", str(a.width),
            "--blocks", *map(str, a.blocks), "--calibration-batches", str(a.calibration_batches),
            "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--threads", str(a.threads)]
    if a.outer_iters is not None:
        argv += ["--outer-iters", str(a.outer_iters)]
    return argv


def run(a: argparse.Namespace, devices: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="prune_step_") as out:
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
                   PYTHONWARNINGS="ignore", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
        for k in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT"):  # a fresh launch every time
            env.pop(k, None)
        t0 = time.perf_counter()
        proc = subprocess.run(_worker_argv(a, devices, out), env=env, cwd=out, capture_output=True, text=True,
                              timeout=a.timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
            raise SystemExit(f"run with {devices} process(es) failed (exit {proc.returncode})")
        ranks = []
        for r in range(devices):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    busy = [r["busy_s"] for r in ranks]
    return {"devices": devices, "layers": ranks[0]["layers"],
            "prune_s": max(r["prune_s"] for r in ranks), "hook_s": max(r["hook_s"] for r in ranks),
            "hook_cpu_s": [r["hook_cpu_s"] for r in ranks],
            "fit_s": max(r["fit_s"] for r in ranks), "process_wall_s": wall,
            "busy_s": busy, "serial_s": sum(ranks[0]["layer_seconds"].values()),
            "balance": max(busy) / (sum(busy) / len(busy)),
            "owned_counts": [len(r["owned"]) for r in ranks],
            "calibration_tokens": ranks[0]["calibration_tokens"],
            "mean_relative_error": ranks[0]["mean_relative_error"], "ranks": ranks}


def _line(s: dict) -> str:
    busy = " / ".join(f"{b:.2f}" for b in s["busy_s"])
    owned = " / ".join(map(str, s["owned_counts"]))
    cpu = " / ".join(f"{c:.2f}" for c in s["hook_cpu_s"])
    return (f"| {s['devices']} | {s['layers']} | {owned} | {s['prune_s']:.2f} | {s['hook_s']:.2f} | {busy} | "
            f"{s['balance']:.2f} | {cpu} | {s['fit_s']:.1f} | {s['process_wall_s']:.1f} |")


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return
    what = (f"model={a.model} method={a.method} density={a.density} calibration_batches={a.calibration_batches} "
            f"(total) threads/process={a.threads}")
    if a.model == "smollm2":
        what += f" blocks={a.blocks} batch={a.batch_size}x{a.seq_len} tokens"
    else:
        what += f" width={a.width}"
    print(what, flush=True)
    counts = [1, a.devices_compare] if a.compare else [a.devices]
    results = []
    for n in counts:
        s = run(a, n)
        results.append(s)
        print(f"devices={n}: {s['layers']} layers pruned, prune {s['prune_s']:.2f} s (max over ranks), "
              f"hook {s['hook_s']:.2f} s, per-rank busy {[round(b, 2) for b in s['busy_s']]} s, "
              f"fit {s['fit_s']:.1f} s, process wall {s['process_wall_s']:.1f} s, "
              f"mean rel. error {s['mean_relative_error']:.4f}", flush=True)
    print()
    print("| devices | layers | layers per rank | prune s (max) | hook s (max) | busy s per rank | "
          "balance | hook CPU s per rank | fit s | process wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in results:
        print(_line(s))
    summary = {"args": {k: v for k, v in vars(a).items() if k != "worker"}, "runs": results}
    if a.compare:
        one, many = results
        ratio = {k: many[k] / one[k] for k in ("prune_s", "hook_s")}
        ideal = max(many["busy_s"]) / one["busy_s"][0]
        summary["ratio"] = {**ratio, "busy_max_over_serial": ideal}
        print(f"\nratio {many['devices']}-process / 1-process: prune {ratio['prune_s']:.3f} "
              f"(speed-up {1 / ratio['prune_s']:.2f}x), hook {ratio['hook_s']:.3f} "
              f"(speed-up {1 / ratio['hook_s']:.2f}x); largest rank load / serial load {ideal:.3f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
