"""DSFPruneCallback in a real single-process ``Trainer(accelerator="cpu")``: metrics in CSV and offline
W&B, masks intact after fit, resume without re-factorizing, bad input. Tiny models and data."""

from __future__ import annotations

import csv
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")
torchvision = pytest.importorskip("torchvision")

from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger, WandbLogger  # noqa: E402
from numerics import rel_bound  # noqa: E402  (tests/ is on sys.path)
from wandb_offline import wandb_records  # noqa: E402  (tests/ is on sys.path)

import dsf_lightning.pipeline.jobs as jobs  # noqa: E402
from dsf_lightning.callbacks import DSFPruneCallback, load_pruned_checkpoint  # noqa: E402
from dsf_lightning.modules import is_pruned_module  # noqa: E402

os.environ.setdefault("WANDB_SILENT", "true")
FAST = {"outer_iters": 3}
LAYER1 = [r"model\.layer1\.\d\.conv\d"]


class ResNetModule(pl.LightningModule):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = torchvision.models.resnet18(weights=None, num_classes=10)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class LlamaModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
        self.model = LlamaForCausalLM(cfg)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def _loss(self, ids):
        return self.model(input_ids=ids, labels=ids).loss

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch[0])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        loss = self._loss(batch[0])
        self.log("val_loss", loss)
        self.log("val_ppl", loss.exp())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def images(n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=8, shuffle=False)


def tokens(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randint(0, 128, (n, 16), generator=g)), batch_size=4, shuffle=False)


def trainer(tmp_path, callbacks, loggers=None, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                logger=loggers if loggers is not None else False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                num_sanity_val_steps=0)
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


def csv_metrics(logger: CSVLogger) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if v not in ("", None):
                    out.setdefault(k, []).append(float(v))
    return out


def wandb_history(save_dir) -> dict[str, object]:
    """Last value of every history key of the offline W&B run under ``save_dir``."""
    return wandb_records(save_dir)["history"]


def masks_of(module: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    out = {}
    for name, m in module.named_modules():
        if is_pruned_module(m):
            for i, (_, mask) in enumerate(m.masked_parameters()):
                out[f"{name}.{i}"] = (mask.clone(), int(mask.sum()))
    return out


def assert_masks_intact(module: nn.Module, before: dict[str, tuple[torch.Tensor, int]]) -> None:
    assert before
    after = masks_of(module)
    assert after.keys() == before.keys()
    for name, m in module.named_modules():
        if is_pruned_module(m):
            for i, (p, mask) in enumerate(m.masked_parameters()):
                key = f"{name}.{i}"
                assert torch.equal(mask, before[key][0]) and int(mask.sum()) == before[key][1]
                assert torch.count_nonzero(p.detach()[~mask]) == 0, key  # masked entries exactly zero


class MaskProbe(pl.Callback):
    """Snapshots the masks at on_fit_start (after pruning, before training)."""

    def on_fit_start(self, trainer, pl_module):
        self.masks = masks_of(pl_module)


@pytest.fixture
def count_factorize(monkeypatch):
    """The methods of every layer factorized, one entry per layer (batched layers included)."""
    calls: list[str] = []
    real, real_batch = jobs.factorize, jobs.factorize_batch

    def counting(method, *a, **kw):
        calls.append(method)
        return real(method, *a, **kw)

    def counting_batch(method, weights, *a, **kw):
        calls.extend([method] * len(weights))
        return real_batch(method, weights, *a, **kw)

    monkeypatch.setattr(jobs, "factorize", counting)
    monkeypatch.setattr(jobs, "factorize_batch", counting_batch)
    return calls


# ---------------------------------------------------------------------------------------------
def test_resnet18_metrics_in_csv_and_wandb(tmp_path):
    csv_logger = CSVLogger(tmp_path / "csv")
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="dsf-test")
    cb = DSFPruneCallback(0.3, include=LAYER1, factorization_options=FAST, log_dense=True,
                          bn_recalibration_batches=2, progress=False)
    probe = MaskProbe()
    module = ResNetModule()
    tr = trainer(tmp_path, [cb, probe], [csv_logger, wandb_logger])
    tr.fit(module, images(), images())
    import wandb

    wandb.finish()

    assert cb.factorization_runs == 1 and len(cb.report.layers) == 4
    assert isinstance(module.model.layer1[0].conv1, nn.Module) and is_pruned_module(module.model.layer1[0].conv1)
    assert not is_pruned_module(module.model.conv1)  # outside include
    assert_masks_intact(module, probe.masks)
    expected = [f"{p}/{m}" for p in ("dense", "pre_finetune", "bn_recalibrated", "post_finetune")
                for m in ("val_loss", "val_acc")]
    got_csv = csv_metrics(csv_logger)
    for k in expected + ["dsf/mean_error_vs_magnitude", "dsf/achieved_density"]:
        assert k in got_csv, (k, sorted(got_csv))
    # post_finetune is the module's own validation over the same batches as Lightning's last one
    # the same 2 batches' losses, averaged by two reducers (fp32 sum and scale): 3 roundings each
    mean_rel = rel_bound(torch.float32, 3)
    assert got_csv["post_finetune/val_loss"][-1] == pytest.approx(got_csv["val_loss"][-1], rel=mean_rel)
    assert got_csv["dsf/achieved_density"][-1] <= 0.3
    hist = wandb_history(tmp_path)
    for k in expected:
        assert hist[k] == got_csv[k][-1], k  # the same floats in both loggers
    assert hist["dsf/layers/_type"] == "table-file" and hist["dsf/layers/nrows"] == 4
    row = cb.report.to_rows()[0]
    assert {"name", "out", "fan_in", "first_density", "second_density", "error_vs_magnitude", "seconds"} <= set(row)
    # the table row is the layer's record: the ratio is its error over magnitude pruning's (random-init
    # weights here, so no claim that DSF wins), and the square (64, 64) factor holds at most the
    # vision preset's 30% of the budget
    assert row["error_vs_magnitude"] == pytest.approx(row["relative_error"] / row["magnitude_relative_error"])
    assert row["nnz"] <= row["budget"] and row["second_density"] * 64 * 64 <= 0.3 * row["budget"] + 1


def test_llama_layerwise_calibration_csv(tmp_path):
    csv_logger = CSVLogger(tmp_path / "csv")
    cb = DSFPruneCallback(0.4, calibration_batches=2, factorization_options=FAST, progress=False)
    probe = MaskProbe()
    module = LlamaModule()
    tr = trainer(tmp_path, [cb, probe], [csv_logger])
    tr.fit(module, tokens(), tokens())
    assert len(cb.report.layers) == 14  # 2 blocks x (q, k, v, o, gate, up, down); lm_head stays dense
    assert all(c == 2 * 4 * 16 for c in cb.report.calibration_tokens.values())
    assert_masks_intact(module, probe.masks)
    got = csv_metrics(csv_logger)
    for k in ("pre_finetune/val_loss", "pre_finetune/val_ppl", "post_finetune/val_loss", "post_finetune/val_ppl"):
        assert k in got
    assert "dense/val_loss" not in got  # log_dense=False


def test_calibration_from_the_train_dataloader_hook_when_max_epochs_is_minus_one(tmp_path):
    """max_epochs=-1 (train until max_steps): Lightning loads no train dataloader to count steps, so the callback
    takes the module's own train_dataloader hook (public API either way)."""
    class HookModule(LlamaModule):
        def train_dataloader(self):
            return tokens()

    cb = DSFPruneCallback(0.4, method="wanda", calibration_batches=2, progress=False, evaluate=False)
    trainer(tmp_path, [cb], max_epochs=-1, max_steps=1, limit_val_batches=0).fit(HookModule())
    assert len(cb.report.layers) == 14
    assert all(c == 2 * 4 * 16 for c in cb.report.calibration_tokens.values())


def test_llama_sequential_calibration(tmp_path):
    cb = DSFPruneCallback(0.4, calibration_batches=2, sequential=True, factorization_options=FAST, progress=False)
    module = LlamaModule()
    trainer(tmp_path, [cb]).fit(module, tokens(), tokens())
    assert len(cb.report.layers) == 14 and cb.report.working_set_bytes > 0
    assert all(c == 2 * 4 * 16 for c in cb.report.calibration_tokens.values())
    assert {"pre_finetune/val_loss", "post_finetune/val_ppl"} <= set(cb.metrics)
    assert all(m.nnz <= r.budget for r in cb.report.layers for m in [module.get_submodule(r.name)])


def _resume_module() -> ResNetModule:
    pl.seed_everything(0)
    return ResNetModule()


def _fit(tmp_path, cb, module, max_epochs, ckpt_path=None, checkpoint_dir=None):
    callbacks = [cb]
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, every_n_epochs=1))
    tr = trainer(tmp_path, callbacks, max_epochs=max_epochs, deterministic=True,
                 enable_checkpointing=checkpoint_dir is not None, limit_val_batches=1)
    tr.fit(module, images(16), images(8), ckpt_path=ckpt_path)
    return tr


@pytest.mark.parametrize("storage", ["compressed", "masked"])
def test_resume_rebuilds_structure_without_refactorizing(tmp_path, count_factorize, storage):
    kw = dict(include=LAYER1, factorization_options=FAST, progress=False, storage=storage)
    # uninterrupted: 2 epochs
    full = _resume_module()
    _fit(tmp_path / "a", DSFPruneCallback(0.3, **kw), full, 2)
    runs_full = count_factorize.count("dsf")
    assert runs_full == 4
    # interrupted after 1 epoch, then resumed in a fresh trainer, module and callback
    first = _resume_module()
    _fit(tmp_path / "b", DSFPruneCallback(0.3, **kw), first, 1, checkpoint_dir=tmp_path / "ckpt")
    ckpt = tmp_path / "ckpt" / "last.ckpt"
    assert "dsf_structure" in torch.load(ckpt, weights_only=False)
    count_factorize.clear()
    cb = DSFPruneCallback(0.3, **kw)
    resumed = _resume_module()
    _fit(tmp_path / "c", cb, resumed, 2, ckpt_path=str(ckpt))
    assert count_factorize == [] and cb.factorization_runs == 0 and cb.resumed
    full_sd, res_sd = full.state_dict(), resumed.state_dict()
    assert full_sd.keys() == res_sd.keys()
    for k in full_sd:
        assert torch.equal(full_sd[k], res_sd[k]), k

    # inference loaders: by class (hparams from the checkpoint) and into a dense instance
    for loaded in (load_pruned_checkpoint(ResNetModule, ckpt), load_pruned_checkpoint(ResNetModule(), ckpt)):
        assert type(loaded) is ResNetModule
        assert is_pruned_module(loaded.model.layer1[0].conv1)
        sd = torch.load(ckpt, weights_only=False)["state_dict"]
        for k, v in loaded.state_dict().items():
            assert torch.equal(v, sd[k]), k


def test_resume_with_another_method_is_a_clear_error(tmp_path, count_factorize):
    kw = dict(include=LAYER1, progress=False)
    _fit(tmp_path / "a", DSFPruneCallback(0.3, "magnitude", **kw), _resume_module(), 1, checkpoint_dir=tmp_path / "c")
    count_factorize.clear()
    with pytest.raises(ValueError, match=r"layer 'model\.layer1\.0\.conv1': the checkpoint holds \['weight_bits', "
                                         r"'weight_values'\] but DSFPruneCallback\(method='dsf', "
                                         r"storage='compressed'\) built DSFConv2d"):
        _fit(tmp_path / "b", DSFPruneCallback(0.3, factorization_options=FAST, **kw), _resume_module(), 2,
             ckpt_path=str(tmp_path / "c" / "last.ckpt"))
    assert count_factorize == []


def test_resume_in_the_other_storage_is_a_clear_error(tmp_path):
    """Lightning restores the optimizer state by position: it is of the saved storage's parameters."""
    kw = dict(include=LAYER1, factorization_options=FAST, progress=False)
    _fit(tmp_path / "a", DSFPruneCallback(0.3, storage="masked", **kw), _resume_module(), 1,
         checkpoint_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"the checkpoint holds \['first', 'first_mask', 'second', "
                                         r"'second_mask'\] but DSFPruneCallback\(method='dsf', storage='compressed'\)"
                                         r".* Resume with the method, storage and targets of the run that saved it"):
        _fit(tmp_path / "b", DSFPruneCallback(0.3, **kw), _resume_module(), 2,
             ckpt_path=str(tmp_path / "c" / "last.ckpt"))


def test_mixin_module_loads_pruned_checkpoints_with_its_own_load_from_checkpoint(tmp_path):
    from dsf_lightning.models import ImageClassifier

    module = ImageClassifier(torchvision.models.resnet18(weights=None, num_classes=10), 10, lr=0.01)
    cb = DSFPruneCallback(0.3, "magnitude", include=[r"backbone\.layer1\.\d\.conv\d"], progress=False)
    tr = trainer(tmp_path, [cb, ModelCheckpoint(dirpath=tmp_path / "c", save_last=True)], enable_checkpointing=True)
    tr.fit(module, images(8), images(8))
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "c" / "last.ckpt",
                                                  backbone=torchvision.models.resnet18(weights=None, num_classes=10))
    assert type(loaded) is ImageClassifier and is_pruned_module(loaded.backbone.layer1[1].conv2)
    for k, v in module.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(density=0.0), "density"),
    (dict(density=1.5), "density"),
    (dict(density=0.3, method="dfs"), "unknown method"),
    (dict(density=0.3, method="wanda"), "needs calibration"),
    (dict(density=0.3, calibration_batches=-1), "calibration_batches"),
    (dict(density=0.3, method="magnitude", factorization_options={"fixed_mask": True}), "fixed_mask"),
    (dict(density=0.3, factorization_options={"outer_iter": 3}), "no option"),
    (dict(density=0.3, densities={"model.fc": 2.0}), "densities"),
])
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSFPruneCallback(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(include=[r"model\.nothing.*"]), "no layer to prune"),
    (dict(include=LAYER1, densities={"model.layer1.0.conv9": 0.2}), "not a target layer"),
    (dict(include=LAYER1, calibration_batches=2, calibration_loader=[]), "calibration data is empty"),
    (dict(include=LAYER1, calibration_batches=2, calibration_loader=iter([])), "saw no calibration input"),
])
def test_bad_model_dependent_input_fails_before_factorizing(tmp_path, count_factorize, kwargs, match):
    module = ResNetModule()
    cb = DSFPruneCallback(0.3, factorization_options=FAST, progress=False, **kwargs)
    with pytest.raises(ValueError, match=match):
        trainer(tmp_path, [cb]).fit(module, images(8), images(8))
    assert count_factorize == []
    assert not any(is_pruned_module(m) for m in module.modules())


def test_unsupported_target_is_skipped_with_warning(tmp_path):
    module = ResNetModule()
    cb = DSFPruneCallback(0.3, method="magnitude", include=[r"model\.layer1\.0\.(conv1|bn1)"], evaluate=False,
                          progress=False)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        trainer(tmp_path, [cb], limit_train_batches=1).fit(module, images(8), images(8))
    assert any("unsupported" in str(x.message) and "model.layer1.0.bn1" in str(x.message) for x in w)
    assert [r.name for r in cb.report.layers] == ["model.layer1.0.conv1"]
