"""The callback's helpers on their own: metric reductions (LogRecorder, evaluate_module, across 2 gloo
processes) and BatchNorm recalibration."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from torchmetrics import MeanMetric  # noqa: E402

from dsf_lightning.callbacks.batchnorm import recalibrate_batchnorm  # noqa: E402
from dsf_lightning.callbacks.evaluation import LogRecorder, evaluate_module  # noqa: E402


def test_log_recorder_reductions():
    rec = LogRecorder()
    for value, n in ((1.0, 2), (4.0, 1)):
        rec.log("mean", torch.tensor(value), batch_size=n)
        rec.log("sum", value, reduce_fx="sum", batch_size=n)
        rec.log("max", value, reduce_fx=torch.max, batch_size=n)
        rec.log("min", value, reduce_fx="min", batch_size=n)
        rec.log("step_only", value, on_epoch=False)
        rec.log("not_logged", value, logger=False)
    assert rec.result() == {"mean": pytest.approx((1 * 2 + 4 * 1) / 3), "sum": 5.0, "max": 4.0, "min": 1.0}


def test_log_recorder_batch_size_from_the_batch_and_metrics_objects():
    rec = LogRecorder()
    metric = MeanMetric()
    for rows, value in ((3, 1.0), (1, 5.0)):
        rec.batch = (torch.zeros(rows, 2), torch.zeros(rows))
        rec.log("loss", value)  # batch size 3, then 1: extracted from the batch as Lightning does
        metric.update(torch.full((rows,), value))
        rec.log("metric", metric)
    out = rec.result()
    assert out["loss"] == pytest.approx((3 * 1.0 + 5.0) / 4)
    assert out["metric"] == pytest.approx((3 * 1.0 + 5.0) / 4)  # compute()-d, not averaged again
    assert metric.update_count == 0  # reset after compute, as at the end of a Lightning epoch


class _TwoLoaders(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
        self.seen = []

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).sum()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        (x,) = batch
        self.seen.append((dataloader_idx, batch_idx, self.training))
        self.log("rows", float(x.shape[0]), reduce_fx="sum")
        self.log("value", x.mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _EvaluateAtFitStart(pl.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.rng = torch.get_rng_state()
        self.out = evaluate_module(trainer, pl_module)
        self.seen = list(pl_module.seen)  # Lightning's own validation may run later
        self.rng_after = torch.get_rng_state()
        self.training_after = (pl_module.training, pl_module.net[1].training)


def test_evaluate_module_several_loaders_limits_and_state(tmp_path):
    module = _TwoLoaders()
    probe = _EvaluateAtFitStart()
    loaders = [DataLoader(TensorDataset(torch.full((6, 4), float(i))), batch_size=2) for i in (1, 3)]
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, max_epochs=1, limit_train_batches=0, limit_val_batches=2,
                         callbacks=[probe],
                         default_root_dir=tmp_path)
    trainer.fit(module, loaders[0], loaders)
    assert probe.out == {"rows/dataloader_idx_0": 4.0, "rows/dataloader_idx_1": 4.0,
                         "value/dataloader_idx_0": 1.0, "value/dataloader_idx_1": 3.0}
    assert [s[:2] for s in probe.seen] == [(0, 0), (0, 1), (1, 0), (1, 1)]  # 2 batches each: the limit
    assert not any(training for *_, training in probe.seen)  # eval mode inside
    assert probe.training_after == (True, True)  # restored
    assert torch.equal(probe.rng, probe.rng_after)
    assert "log" not in module.__dict__  # the recorder is gone


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_on_two_ranks(rank: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        rec = LogRecorder()
        values = {0: [(1.0, 1), (2.0, 3)], 1: [(10.0, 4)]}[rank]
        for v, n in values:
            for fx in ("mean", "sum", "max", "min"):
                rec.log(fx, v, reduce_fx=fx, batch_size=n)
        out[rank] = rec.result(world_size=2)
    finally:
        dist.destroy_process_group()


def test_log_recorder_reduces_across_ranks():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_reduce_on_two_ranks, args=(_free_port(), out), nprocs=2)
        r0, r1 = dict(out[0]), dict(out[1])
    assert r0 == r1
    assert r0["mean"] == pytest.approx((1 * 1 + 2 * 3 + 10 * 4) / 8)
    assert (r0["sum"], r0["max"], r0["min"]) == (13.0, 10.0, 1.0)


def test_recalibrate_batchnorm_is_the_cumulative_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Dropout(0.2))
    model[1].running_mean.fill_(7.0)  # stale statistics, as after pruning
    model.eval()
    model[2].train()  # a submodule in its own mode must come back so
    batches = [(torch.randn(8, 3), None) for _ in range(4)]

    def forward(m, batch):
        return m(batch[0])

    assert recalibrate_batchnorm(model, batches, forward, limit=3)
    acts = torch.cat([model[0](x) for x, _ in batches[:3]]).detach()
    # momentum=None: the running mean is the plain average of the 3 batch means
    torch.testing.assert_close(model[1].running_mean, acts.view(3, 8, 5).mean(1).mean(0))
    assert model[1].num_batches_tracked == 3 and model[1].momentum == 0.1
    assert not model.training and not model[1].training and model[2].training
    assert not recalibrate_batchnorm(nn.Linear(2, 2), batches, forward, limit=3)
