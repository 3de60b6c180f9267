"""DSFPruneCallback under ``Trainer(accelerator="cpu", devices=2, strategy="ddp")`` (gloo).

Lightning's ``ddp`` strategy relaunches ``sys.argv`` for the other ranks, which inside pytest would
rerun pytest; so the test runs this file as a script (``python tests/test_callback_ddp.py OUT MODE
CALIB STORAGE``) in a subprocess, and every rank writes what it saw to ``OUT/rank<r>.pt``:

* the pruned layers' parameters and masks right after pruning (``on_fit_start``) and after training;
* the layers this rank factorized (``owned_layers``), the Grams the layer jobs were built from;
* the evaluation metrics it computed (all-reduced, so equal on every rank).

``MODE`` is ``ddp`` (2 processes) or ``single`` (1 process, twice the calibration batches: the same
samples the two DDP shards see together); ``STORAGE`` is the factors' ``masked`` or ``compressed`` storage.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from numerics import assert_rel_close, network_depth, rel_bound  # tests/ is on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [r"model\.layer[12]\.\d\.conv\d", r"model\.layer2\.0\.downsample\.0"]


def _run_script(out: str, mode: str, calib: int, storage: str) -> None:
    import hashlib

    import lightning.pytorch as pl
    import torch.nn.functional as F
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    import dsf_lightning.pipeline.one_pass as one_pass
    from dsf_lightning.callbacks import DSFPruneCallback
    from dsf_lightning.modules import is_pruned_module

    torch.set_num_threads(1)

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = torchvision.models.resnet18(weights=None, num_classes=10)

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    captured: dict = {}
    real_jobs = one_pass.layer_jobs

    def spy(plan, grams=None):
        captured["grams"] = None if grams is None else {k: v.clone().cpu() for k, v in grams.items()}
        return real_jobs(plan, grams)

    one_pass.layer_jobs = spy

    def pruned_state(module):
        return {k: v.detach().clone().cpu() for n, m in module.named_modules() if is_pruned_module(m)
                for k, v in m.state_dict(prefix=n + ".").items()}

    class Probe(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            captured["after_prune"] = pruned_state(pl_module)

    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    loader = DataLoader(ds, batch_size=4, shuffle=False)
    devices = 2 if mode == "ddp" else 1
    cb = DSFPruneCallback(0.3, include=INCLUDE, factorization_options={"outer_iters": 3}, progress=False,
                          calibration_batches=calib * (2 if mode == "single" else 1), storage=storage)
    pl.seed_everything(0)
    module = Net()
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if mode == "ddp" else "auto",
                         max_epochs=1, limit_train_batches=1, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb, Probe()])
    trainer.fit(module, loader, loader)
    h = hashlib.sha256()
    for k, v in sorted(captured["after_prune"].items()):
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    torch.save({"rank": trainer.global_rank, "world": trainer.world_size, "owned": cb.owned_layers,
                "layers": [r.name for r in cb.report.layers], "hash": h.hexdigest(),
                "after_prune": captured["after_prune"], "after_fit": pruned_state(module),
                "grams": captured["grams"], "tokens": cb.report.calibration_tokens,
                "metrics": cb.metrics, "rows": cb.report.to_rows()},
               os.path.join(out, f"rank{trainer.global_rank}.pt"))


def _launch(tmp_path, mode: str, calib: int, storage: str = "compressed") -> list[dict]:
    out = tmp_path / f"{mode}{calib}"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), mode, str(calib), storage], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    n = 2 if mode == "ddp" else 1
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(n)]


def _check_ddp(ranks: list[dict]) -> None:
    r0, r1 = ranks
    assert (r0["world"], r1["world"]) == (2, 2)
    # bit-identical factors on both ranks (the hash, and every tensor), before and after training
    assert r0["hash"] == r1["hash"]
    for key in ("after_prune", "after_fit"):
        assert r0[key].keys() == r1[key].keys()
        for k in r0[key]:
            assert torch.equal(r0[key][k], r1[key][k]), (key, k)
    # the layers were split: disjoint shares covering every layer, both ranks did some work
    owned0, owned1 = set(r0["owned"]), set(r1["owned"])
    assert owned0 and owned1 and not owned0 & owned1 and owned0 | owned1 == set(r0["layers"])
    assert [row.get("owner_rank") for row in r0["rows"]] == [0 if n in owned0 else 1 for n in r0["layers"]]
    # evaluation metrics are all-reduced: the same on both ranks
    assert r0["metrics"]["pre_finetune/val_loss"] == r1["metrics"]["pre_finetune/val_loss"]
    assert "post_finetune/val_loss" in r0["metrics"]


def test_ddp_data_free_matches_single_process(tmp_path):
    ddp = _launch(tmp_path, "ddp", 0, "masked")  # the masked storage here, the compressed one below
    _check_ddp(ddp)
    (single,) = _launch(tmp_path, "single", 0, "masked")
    assert single["owned"] == single["layers"] == ddp[0]["layers"]
    for k, v in single["after_prune"].items():  # data-free: same weights, same factors
        assert torch.equal(v, ddp[0]["after_prune"][k]), k
    # the pre-fine-tuning evaluation over both shards equals the single-process one over all data
    # the same batches, reduced across ranks: the mean's fp32 rounding over the ResNet-18's depth
    import torchvision

    want, depth = single["metrics"]["pre_finetune/val_loss"], network_depth(torchvision.models.resnet18(num_classes=10))
    assert ddp[0]["metrics"]["pre_finetune/val_loss"] == pytest.approx(want, rel=rel_bound(torch.float32, depth))


def test_ddp_layerwise_grams_are_all_reduced(tmp_path):
    ddp = _launch(tmp_path, "ddp", 2)  # 2 batches of 4 per rank, disjoint shards (DistributedSampler)
    _check_ddp(ddp)
    (single,) = _launch(tmp_path, "single", 2)  # 4 batches of 4: the same 16 images
    assert ddp[0]["tokens"] == single["tokens"]
    for name, g in single["grams"].items():
        assert torch.equal(ddp[0]["grams"][name], ddp[1]["grams"][name])
        # each rank's half summed, then the two halves: the accumulation order differs from one process's
        assert_rel_close(ddp[0]["grams"][name], g, depth=ddp[0]["tokens"][name] + 12)


if __name__ == "__main__":
    _run_script(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
