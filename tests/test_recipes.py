"""The recipes end to end on CPU: ResNet-20 on a generated CIFAR-10 copy (single process and 2-process
DDP/gloo), ResNet-50 on a generated ImageFolder, a real tiny run's offline W&B record (config, names,
pre/post metrics), and bad input failing before any training.

The generated CIFAR copy holds random images in torchvision's format (``cifar-10-batches-py`` pickles);
torchvision checks the files' md5 sums against the real dataset's, so the processes that read it
replace ``torchvision.datasets.cifar.check_integrity`` by an existence check. The DDP run executes
this file as a script (``python tests/test_recipes.py <recipe arguments>``): Lightning's ``ddp``
relaunches ``sys.argv`` for rank 1, so the patch is applied in both processes.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from wandb_offline import wandb_records  # noqa: E402  (tests/ is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
os.environ.setdefault("WANDB_SILENT", "true")
FAST = '{"outer_iters": 2}'


def _patch_cifar_integrity() -> None:
    import torchvision.datasets.cifar as cifar

    cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)


if __name__ == "__main__":  # the DDP test's script: python tests/test_recipes.py <recipe arguments>
    sys.path.insert(0, ROOT)
    torch.set_num_threads(1)
    _patch_cifar_integrity()
    from dsf_lightning.recipes import resnet20_main

    sys.exit(resnet20_main(sys.argv[1:]))

pl = pytest.importorskip("lightning.pytorch")

from dsf_lightning import recipes  # noqa: E402
from dsf_lightning.recipes import resnet20_main, resnet20_parser, resnet50_main, resnet50_parser  # noqa: E402


# ------------------------------------------------------------------------------------------------
# generated data
# ------------------------------------------------------------------------------------------------
def make_cifar(root, n_per_batch: int = 8, seed: int = 0) -> str:
    """``root/cifar-10-batches-py`` with 5 train batches and a test batch of random images."""
    import numpy as np

    rng = np.random.default_rng(seed)
    folder = os.path.join(str(root), "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n_per_batch).tolist(),
                 "filenames": [f"{name}_{i}.png" for i in range(n_per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n_per_batch,
                     "num_vis": 3072}, f)
    return str(root)


def make_image_folder(root, classes: int = 2, per_class: int = 2, size: int = 64) -> str:
    """``root/{train,val}/class<k>/<i>.png``: tiny random RGB PNGs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = os.path.join(str(root), split, f"class{c}")
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(os.path.join(d, f"{i}.png"))
    return str(root)


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    _patch = pytest.importorskip("torchvision.datasets.cifar")
    monkeypatch.setattr(_patch, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return make_cifar(tmp_path / "data")


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if any ``Trainer.fit`` starts (bad input must be caught before)."""
    def fit(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(pl.Trainer, "fit", fit)


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------
def test_resnet20_cifar_fast_dev_run(tmp_path, cifar_dir):
    args = resnet20_parser().parse_args([
        "--dataset", "cifar10", "--data-dir", cifar_dir, "--fast-dev-run", "--batch-size", "4", "--num-workers", "0",
        "--accelerator", "cpu", "--factorization-options", FAST, "--output-dir", str(tmp_path / "out"),
        "--no-progress-bar"])
    result = recipes.run_resnet20(args)
    m = result["metrics"]
    for k in ("dense/val_acc", "pre_finetune/val_acc", "pre_finetune/val_acc5", "post_finetune/val_acc",
              "post_finetune/val_loss", "dsf/achieved_density"):
        assert k in m, (k, sorted(m))
    assert m["dsf/achieved_density"] <= 0.1 + 1e-9
    assert result["world_size"] == 1
    assert json.load(open(tmp_path / "out" / "results.json"))["metrics"] == pytest.approx(m)


def test_resnet50_imagefolder_fast_dev_run(tmp_path):
    data = make_image_folder(tmp_path / "imagenet")
    args = resnet50_parser().parse_args([
        "--data-dir", data, "--weights", "none", "--method", "magnitude", "--density", "0.1", "--fast-dev-run",
        "--batch-size", "2", "--num-workers", "0", "--accelerator", "cpu", "--output-dir", str(tmp_path / "out"),
        "--no-progress-bar"])
    result = recipes.run_resnet50(args)
    m = result["metrics"]
    for k in ("dense/val_acc", "pre_finetune/val_acc", "post_finetune/val_acc", "post_finetune/val_acc5"):
        assert k in m, (k, sorted(m))
    assert m["dsf/layers_pruned"] == 52  # 53 convs + fc of ResNet-50, minus the stem conv and fc


def test_resnet20_real_tiny_run_wandb_offline(tmp_path):
    """--fast-dev-run replaces loggers by a DummyLogger, so W&B is checked on a real 1-epoch run
    (digits default, 2 batches) starting from a --dense-ckpt (one W&B run: prune + fine-tune)."""
    from dsf_lightning.models import resnet20

    torch.manual_seed(0)
    ckpt = tmp_path / "dense.pt"
    torch.save(resnet20().state_dict(), ckpt)
    out = tmp_path / "out"
    code = resnet20_main([
        "--dense-ckpt", str(ckpt), "--method", "dsf", "--density", "0.2", "--seed", "3", "--max-epochs", "1",
        "--limit-batches", "2", "--batch-size", "16", "--num-workers", "0", "--accelerator", "cpu",
        "--factorization-options", FAST, "--wandb", "offline", "--wandb-dir", str(tmp_path),
        "--output-dir", str(out), "--no-progress-bar"])
    assert code == 0
    rec = wandb_records(tmp_path)
    assert rec["run"]["name"] == "resnet20-16-dsf-d0.2-s3"
    assert rec["run"]["group"] == "resnet20-16-digits" and rec["run"]["project"] == "dsf-lightning"
    assert set(rec["run"]["tags"]) == {"resnet20-16", "dsf", "density=0.2"}
    cfg = rec["config"]
    assert cfg["method"] == "dsf" and cfg["density"] == 0.2 and cfg["seed"] == 3 and cfg["max_epochs"] == 1
    assert cfg["dense_ckpt"] == str(ckpt) and cfg["lr_schedule"] == "linear"  # args and module hparams
    hist = rec["history"]
    results = json.load(open(out / "results.json"))["metrics"]
    for k in ("dense/val_acc", "pre_finetune/val_acc", "pre_finetune/val_loss", "post_finetune/val_acc",
              "post_finetune/val_acc5"):
        assert hist[k] == pytest.approx(results[k], rel=1e-6), k
    assert "val_acc" in hist and "train_loss_epoch" in hist
    # the checkpoint carries the pruned structure: it loads into a fresh dense ResNet-20
    from dsf_lightning.callbacks import load_pruned_checkpoint
    from dsf_lightning.models import ImageClassifier
    from dsf_lightning.modules import is_pruned_module

    loaded = load_pruned_checkpoint(ImageClassifier, str(out / "checkpoints" / "last.ckpt"), backbone=resnet20())
    assert is_pruned_module(loaded.backbone.layer1[0].conv1) and not is_pruned_module(loaded.backbone.conv1)
    assert loaded.hparams.lr_schedule == "linear"


def test_resnet20_ddp_two_processes(tmp_path):
    data = make_cifar(tmp_path / "data")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--dataset", "cifar10", "--data-dir", data, "--devices", "2",
         "--accelerator", "cpu", "--fast-dev-run", "--batch-size", "4", "--num-workers", "0",
         "--factorization-options", FAST, "--output-dir", str(out), "--wandb", "off", "--no-progress-bar"],
        env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.load(open(out / "results.json"))
    assert result["world_size"] == 2
    assert result["args"]["strategy"] is None  # default: ddp chosen for 2 devices
    assert {"pre_finetune/val_acc", "post_finetune/val_acc", "dense/val_acc"} <= set(result["metrics"])


# ------------------------------------------------------------------------------------------------
# bad input: clear errors before any training
# ------------------------------------------------------------------------------------------------
def test_missing_cifar_dir(tmp_path, no_training, capsys):
    missing = str(tmp_path / "nope")
    code = resnet20_main(["--dataset", "cifar10", "--data-dir", missing, "--fast-dev-run"])
    err = capsys.readouterr().err
    assert code == 2
    assert os.path.join(missing, "cifar-10-batches-py") in err and "--download" in err


def test_missing_imagenet_dir(tmp_path, no_training):
    (tmp_path / "train").mkdir()
    args = resnet50_parser().parse_args(["--data-dir", str(tmp_path), "--weights", "none"])
    with pytest.raises(FileNotFoundError, match=r"missing \[.*val'\].*'train/' and 'val/'"):
        recipes.run_resnet50(args)


def test_mismatched_weights_file(tmp_path, no_training, capsys):
    import torchvision

    data = make_image_folder(tmp_path / "imagenet", per_class=1)
    bad = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), bad)
    code = resnet50_main(["--data-dir", data, "--weights", str(bad)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(bad) in err and "missing keys" in err and "layer1.0.conv3.weight" in err and "shape mismatches" in err


def test_dense_ckpt_of_other_width(tmp_path, no_training):
    from dsf_lightning.models import resnet20

    ckpt = tmp_path / "w32.pt"
    torch.save(resnet20(width=32).state_dict(), ckpt)
    args = resnet20_parser().parse_args(["--dense-ckpt", str(ckpt), "--width", "16"])
    with pytest.raises(ValueError, match=r"w32\.pt.*shape mismatches: .*conv1\.weight: file \(32, 3, 3, 3\) vs model "
                                         r"\(16, 3, 3, 3\)"):
        recipes.run_resnet20(args)


def test_unknown_method_and_bad_options(tmp_path, no_training, capsys):
    with pytest.raises(SystemExit) as e:
        resnet20_main(["--method", "random"])
    assert e.value.code == 2 and "invalid choice: 'random'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        resnet20_main(["--density", "1.5"])
    assert "density must be in (0, 1]" in capsys.readouterr().err
    assert resnet20_main(["--method", "wanda"]) == 2
    assert "--calibration-batches" in capsys.readouterr().err
    assert resnet20_main(["--factorization-options", '{"no_such_option": 1}']) == 2
    assert "no_such_option" in capsys.readouterr().err


def test_image_size_is_checked_before_training(no_training, capsys):
    assert resnet20_main(["--dataset", "cifar10", "--image-size", "16"]) == 2
    assert "--image-size 16 applies to --dataset digits only" in capsys.readouterr().err
    assert resnet20_main(["--image-size", "4"]) == 2
    assert "--image-size must be >= 8" in capsys.readouterr().err


def test_imagenet_weights_without_network_say_what_to_do(tmp_path, no_training, monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", offline)
    with pytest.raises(RuntimeError, match=r"--weights PATH.*--weights none"):
        recipes.load_torchvision_resnet50("imagenet")


def test_help_reads_like_documentation(capsys):
    for main in (resnet20_main, resnet50_main):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default: dsf)" in out and "160 epochs" in out and "train/ and val/" in out and "(default: 0.01)" in out


def test_wandb_credentials_detection(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not recipes.wandb_has_credentials()
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert recipes.wandb_has_credentials()
    monkeypatch.setenv("NETRC", str(tmp_path / "other"))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert recipes.wandb_has_credentials()


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------
def test_digits_datamodule_is_seeded_and_stratified():
    from dsf_lightning.data import DigitsDataModule

    a, b = DigitsDataModule(seed=1), DigitsDataModule(seed=1)
    a.setup("fit")
    b.setup("fit")
    assert len(a.train_set) + len(a.val_set) == 1797 and len(a.val_set) == 360
    assert torch.equal(a.val_set.y, b.val_set.y) and torch.equal(a.val_set.x, b.val_set.x)
    counts = torch.bincount(a.val_set.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    x, y = next(iter(a.val_dataloader()))
    assert x.shape == (128, 3, 32, 32) and y.dtype == torch.int64


def test_image_classifier_schedules():
    from torch import nn

    from dsf_lightning.models import ImageClassifier

    def lrs(schedule, epochs, **kw):
        seen = []

        class Rec(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, idx):
                seen.append(trainer.optimizers[0].param_groups[0]["lr"])

        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
        m = ImageClassifier(nn.Linear(4, 3), 3, lr=0.1, lr_schedule=schedule, **kw)
        pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=[Rec()]).fit(m, loader, loader)
        return seen

    step = lrs("step", 4, milestones=(1, 3))  # 4 steps per epoch
    assert step == pytest.approx([0.1] * 4 + [0.01] * 8 + [0.001] * 4)
    lin = lrs("linear", 2)  # 8 steps: 0.1 * (1 - s/8)
    assert lin == pytest.approx([0.1 * (1 - s / 8) for s in range(8)])
