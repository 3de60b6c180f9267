"""Offline demo: the ResNet-20 recipe end to end on real handwritten digits, DSF against magnitude.

``python -m dsf_lightning.recipes.demo`` (what ``make demo`` runs) uses the logic of
``recipes/resnet20_cifar10.py`` on its offline default, scikit-learn's 1,797 real 8x8 digits
(upsampled to 3x16x16, stratified 80/20 train/val split). It trains a ResNet-20 of width 32 (the
paper's "Resnet-20-32") densely for 30 epochs (SGD lr 0.1, momentum 0.9, batch 32, weight decay
5e-3, lr x0.1 at 50% and 75% of the epochs); then, for every density of the sweep (0.1, 0.05, 0.02),
every seed (0, 1: pruning and the fine-tuning data order) and each method, starts from the same dense
weights, prunes every layer but the first conv and the last linear to the density (data-free weight
projection, as in the paper's fine-tuning experiments, section 5.4), evaluates, re-estimates the
BatchNorm statistics on 10 training batches and evaluates again (the paper does not;
``--bn-recalibration-batches 0`` skips it), fine-tunes 2 epochs (lr 0.01 decaying linearly to zero:
at 0.1, the recipe's CIFAR rate, fine-tuning lowered DSF below its BN-recalibrated accuracy; RESULTS.md,
"Demo fine-tuning") and evaluates again. Each run writes ``<output dir>/<run name>/results.json`` and an
offline W&B run under ``./wandb`` (project ``dsf-digits``, group ``resnet20-32-digits``). It ends with the
``dsf-compare`` table of its runs (mean +- std over the seeds, a column per stage), one sentence computed
from it (:func:`~dsf_lightning.runs.compare.verdict`: where DSF leads, ties or trails magnitude after
fine-tuning) and the plot (``<output dir>/resnet20-32-val_acc.png``). Deterministic for given seeds on
CPU; nothing is downloaded.

Why its dense defaults differ from the paper's CIFAR-10 recipe: benchmarks/RESULTS.md, "Vision demo".

The LLM run on SmolLM2-135M is ``make demo-llm`` (``recipes/llama.py``); the one-block layer-wise
comparison of every method is ``python benchmarks/llm_block.py``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from dataclasses import replace

import lightning.pytorch as pl

from dsf_lightning import __version__
from dsf_lightning.config import PruneConfig
from dsf_lightning.persistence.files import write_json
from dsf_lightning.pipeline.allocation import ALLOCATIONS
from dsf_lightning.recipes import (
    RECIPE_METHODS,
    DenseConfig,
    FinetuneConfig,
    LoggingConfig,
    ResNet20Config,
    ResNet20DataConfig,
    ResNet20ModelConfig,
    RunConfig,
    build_prune_callback,
    identity,
    load_weights_file,
    prune_and_finetune,
    train_dense,
)
from dsf_lightning.runs.compare import markdown_table, plot, verdict
from dsf_lightning.runs.records import find_runs, run_name

#: the sweep of ``make demo``: one density at or below 0.05, where the methods separate
DENSITIES = (0.1, 0.05, 0.02)
#: fine-tuning's peak learning rate (measured: RESULTS.md, "Demo fine-tuning")
FINETUNE_LR = 0.01


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, ResNet20Config]:
    """The demo's options and the ResNet-20 recipe config they describe (method: the first one)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["dsf", "magnitude"], choices=RECIPE_METHODS,
                   help="methods to compare, each from the same dense weights (default: dsf magnitude)")
    p.add_argument("--densities", type=float, nargs="+", default=list(DENSITIES),
                   help=f"kept fractions per pruned layer, a run per density, method and seed (default: "
                        f"{' '.join(map(str, DENSITIES))})")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                   help="how the density is spread over the layers (default: uniform, every layer at --density; "
                        "global: the model-wide budget, equal marginal error per nonzero)")
    p.add_argument("--dense-epochs", type=int, default=30, help="dense training epochs (default: 30)")
    p.add_argument("--finetune-epochs", type=int, default=2, help="fine-tuning epochs per method (default: 2)")
    p.add_argument("--width", type=int, choices=(16, 32), default=32,
                   help="ResNet-20 base width: 32 is the paper's wider network, 16 the original (default: 32)")
    p.add_argument("--image-size", type=int, default=16, help="side the 8x8 digits are upsampled to (default: 16)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--weight-decay", type=float, default=5e-3, help="SGD weight decay, dense and fine-tuning "
                   "(default: 5e-3, see above)")
    p.add_argument("--factorization-options", default="{}",
                   help="JSON object of DSF options, e.g. '{\"square_share\": 0.1}' (default: {}, the vision preset)")
    p.add_argument("--bn-recalibration-batches", type=int, default=10,
                   help="N > 0: also re-estimate BatchNorm statistics on N train batches after pruning and report "
                        "that accuracy; 0 skips it, as in the paper (default: 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dense model's init and data split (default: 0)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="seeds of pruning and fine-tuning (data order), each from the same dense weights; the "
                        "table gives mean and std over them (default: 0 1)")
    p.add_argument("--finetune-lr", type=float, default=FINETUNE_LR,
                   help=f"peak SGD learning rate of fine-tuning, decaying linearly to zero (default: {FINETUNE_LR})")
    p.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto",
                   help="W&B logging (default: auto = offline without credentials)")
    p.add_argument("--output-dir", default=os.path.join("lightning_logs", "demo"),
                   help="where the dense weights, each run's results.json and the compare plot are saved; the "
                        "closing table compares every run there (default: lightning_logs/demo)")
    p.add_argument("--dense-weights", default=None,
                   help="start from these dense weights (a state dict an earlier run saved under --output-dir) "
                        "instead of training them")
    opts = p.parse_args(argv)
    try:
        opts.factorization_options = json.loads(opts.factorization_options)
        config = ResNet20Config(
            data=ResNet20DataConfig(dataset="digits", image_size=opts.image_size),
            model=ResNet20ModelConfig(width=opts.width),
            dense=DenseConfig(epochs=opts.dense_epochs),
            prune=_prune(opts, opts.methods[0], opts.densities[0], opts.seeds[0]),
            finetune=FinetuneConfig(max_epochs=opts.finetune_epochs, lr=opts.finetune_lr, batch_size=opts.batch_size,
                                    weight_decay=opts.weight_decay,
                                    bn_recalibration_batches=opts.bn_recalibration_batches),
            run=RunConfig(num_workers=0, accelerator="cpu", precision="32", seed=opts.seed, progress_bar=False),
            logging=LoggingConfig(output_dir=opts.output_dir, wandb=opts.wandb))
    except ValueError as e:  # json.JSONDecodeError is one too
        p.error(str(e))
    return opts, config


def _prune(opts: argparse.Namespace, method: str, density: float, seed: int) -> PruneConfig:
    # the DSF options would be unknown options of the baselines
    return PruneConfig(density=density, method=method, family="vision", seed=seed,
                       allocation=opts.allocation,
                       factorization_options=opts.factorization_options if method == "dsf" else {})


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    opts, config = parse_args(argv)
    from dsf_lightning.data import DigitsDataModule
    from dsf_lightning.models import ImageClassifier, resnet20

    model = f"resnet20-{opts.width}"
    start = time.perf_counter()
    # every run's config and callback is built (and so checked) before training starts
    runs = {}
    for density in opts.densities:
        for seed in opts.seeds:
            for method in opts.methods:
                run_config = replace(config, prune=_prune(opts, method, density, seed),
                                     run=replace(config.run, seed=seed))
                runs[(density, seed, method)] = run_config, build_prune_callback(run_config)
    dm = DigitsDataModule(batch_size=config.finetune.batch_size, num_workers=0, seed=config.run.seed,
                          image_size=config.data.image_size)

    pl.seed_everything(config.run.seed, workers=True)
    backbone = resnet20(num_classes=dm.num_classes, width=opts.width)
    ft = config.finetune
    dense = ImageClassifier(backbone, dm.num_classes, lr=config.dense.lr, momentum=ft.momentum,
                            weight_decay=ft.weight_decay, lr_schedule="step", milestones=config.dense.schedule())
    t = time.perf_counter()
    if opts.dense_weights is not None:
        load_weights_file(backbone, opts.dense_weights, "--dense-weights")
        print(f"dense: weights from {opts.dense_weights}", flush=True)
    else:
        dense_metrics = train_dense(config, dense, dm, model=model, dataset="digits", epochs=config.dense.epochs,
                                    save_to=os.path.join(opts.output_dir, f"{model}-dense-s{config.run.seed}.pt"))
        print(f"dense: {config.dense.epochs} epochs in {time.perf_counter() - t:.0f}s, "
              f"val_acc {100 * dense_metrics.get('val_acc', float('nan')):.2f}%", flush=True)
    dense_state = copy.deepcopy(backbone.state_dict())

    results: dict[str, dict[str, float]] = {}
    run_dirs = []
    for (density, seed, method), (run_config, callback) in runs.items():
        pl.seed_everything(seed, workers=True)  # same fine-tuning data order for every method of a seed
        pruned = resnet20(num_classes=dm.num_classes, width=opts.width)
        pruned.load_state_dict(dense_state)
        module = ImageClassifier(pruned, dm.num_classes, lr=ft.lr, momentum=ft.momentum,
                                 weight_decay=ft.weight_decay, lr_schedule=ft.lr_schedule)
        t = time.perf_counter()
        metrics, _ = prune_and_finetune(run_config, module, dm, callback, model=model, dataset="digits",
                                        checkpoint_dir=None)
        metrics["seconds"] = time.perf_counter() - t
        metrics["prune_seconds"] = callback.report.seconds
        who = identity(run_config, model)
        results[run_name(who)] = metrics
        run_dirs.append(os.path.join(opts.output_dir, run_name(who)))
        write_json(os.path.join(run_dirs[-1], "results.json"),
                   {"identity": who, "version": __version__, "metrics": metrics, "prune": callback.report.totals(),
                    "config": run_config.to_dict()})
        print(f"{method} d{density:g} s{seed}: pre-fine-tune {100 * metrics['pre_finetune/val_acc']:.2f}%, "
              f"post-fine-tune {100 * metrics['post_finetune/val_acc']:.2f}% ({metrics['seconds']:.0f}s)", flush=True)

    # the same table and plot as `dsf-compare`, over this invocation's runs
    records = find_runs(run_dirs)
    val = len(dm.val_set)  # setup() ran in the first fit
    print(f"\nResNet-20 (width {opts.width}) on scikit-learn digits ({opts.image_size}x{opts.image_size}), "
          f"{config.dense.epochs} dense epochs, then per density, method and seed {ft.max_epochs} fine-tuning "
          f"epochs (lr {ft.lr:g} linear to 0), data-free pruning, {opts.allocation} allocation; "
          f"`dsf-compare {' '.join(run_dirs[:1])} ...`:\n" + markdown_table(records, "val_acc"))
    if len(opts.methods) > 1 and "dsf" in opts.methods:
        baseline = next(m for m in opts.methods if m != "dsf")
        print("\n" + verdict(records, "val_acc", "dsf", baseline, resolution=100.0 / val))
    print(f"plot: {plot(records, 'val_acc', os.path.join(opts.output_dir, f'{model}-val_acc.png'), model)}")
    print(f"\ntotal {time.perf_counter() - start:.0f}s")
    return results


if __name__ == "__main__":
    main()
