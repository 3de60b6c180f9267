"""DSF against magnitude, Wanda and SparseGPT on the attention weights of a ViT trained here (on the digits).

A torchvision ``VisionTransformer`` (32x32 images, patch 4, 4 blocks, hidden 64, 4 heads) is trained from
scratch on scikit-learn's digits (``DigitsDataModule``, nothing to download) with ``ImageClassifier``.
Then, per density, a copy is pruned one-shot (layer-wise, Grams of each layer's own inputs from 8 training
batches) with ``dsf``, ``magnitude``, and the Gram-aware ``wanda`` and ``sparsegpt``;
``nn.MultiheadAttention``'s ``in_proj_weight`` (as its q, k, v blocks) and ``out_proj.weight`` are pruned
through their exposed layers. Per layer kind: the mean relative layer error
``tr((W - P) G (W - P)^T) / tr(W G W^T)`` of each method; then the validation accuracy of each pruned
model, without fine-tuning.

    OMP_NUM_THREADS=2 python benchmarks/attention_weights.py --epochs 30 --densities 0.3 0.5
"""

from __future__ import annotations

import argparse
import copy
import statistics

import lightning.pytorch as pl
import torch
from torchvision.models import VisionTransformer

import dsf_lightning as dsf
from dsf_lightning.data import DigitsDataModule
from dsf_lightning.models import ImageClassifier

KINDS = {"q": "attention q", "k": "attention k", "v": "attention v", "o": "attention out_proj", "0": "MLP fc1",
         "3": "MLP fc2"}


def _accuracy(module: ImageClassifier, dm: DigitsDataModule) -> float:
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return trainer.validate(module, datamodule=dm, verbose=False)[0]["val_acc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--densities", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    pl.seed_everything(args.seed, verbose=False)
    dm = DigitsDataModule(batch_size=64, augment=False)
    vit = VisionTransformer(image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128,
                            num_classes=10, dropout=0.0)
    module = ImageClassifier(vit, 10, lr=3e-3, momentum=0.9, weight_decay=1e-4, lr_schedule="linear")
    pl.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_progress_bar=False,
               enable_model_summary=False, enable_checkpointing=False).fit(module, datamodule=dm)
    dense_acc = _accuracy(module, dm)
    dm.setup("fit")
    calibration = [x for (x, _), _ in zip(dm.train_dataloader(), range(8), strict=False)]
    print(f"ViT (4 blocks, hidden 64) trained {args.epochs} epochs on the digits: val accuracy {dense_acc:.4f}\n")
    methods = ("dsf", "magnitude", "wanda", "sparsegpt")
    print("| density | layer kind | layers | " + " | ".join(f"{m} rel. error" for m in methods) + " |")
    print("|---|---|---:|" + "---:|" * len(methods))
    accuracy = {}
    for density in args.densities:
        errors = {}
        for method in methods:
            pruned = copy.deepcopy(module)
            report = dsf.prune(pruned.backbone, density, method, calibration=calibration, progress=False)
            errors[method] = {r.name: r.relative_error for r in report.layers}
            accuracy[(density, method)] = _accuracy(pruned, dm)
        for kind, label in KINDS.items():
            names = [n for n in errors["dsf"] if n.rpartition(".")[2] == kind]
            means = [statistics.mean(errors[m][n] for n in names) for m in methods]
            print(f"| {density} | {label} | {len(names)} | " + " | ".join(f"{e:.4f}" for e in means) + " |")
    print("\n| density | " + " | ".join(f"val accuracy, {m}" for m in methods) + " | dense |")
    print("|---|" + "---:|" * (len(methods) + 1))
    for density in args.densities:
        row = " | ".join(f"{accuracy[(density, m)]:.4f}" for m in methods)
        print(f"| {density} | {row} | {dense_acc:.4f} |")


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
