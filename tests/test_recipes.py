"""The recipes end to end on CPU: ResNet-20 on a generated CIFAR-10 copy (single process and 2-process
DDP/gloo), ResNet-50 on a generated ImageFolder, a real tiny run's offline W&B record (config, names,
pre/post metrics), the run config through flags and YAML files, and bad input failing before any training.

The generated CIFAR copy holds random images in torchvision's format (``cifar-10-batches-py`` pickles);
torchvision checks the files' md5 sums against the real dataset's, so the processes that read it
replace ``torchvision.datasets.cifar.check_integrity`` by an existence check. The DDP run executes
this file as a script (``python tests/test_recipes.py <recipe arguments>``): Lightning's ``ddp``
relaunches ``sys.argv`` for rank 1, so the patch is applied in both processes.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml
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
from dsf_lightning.recipes import (  # noqa: E402
    ResNet20Config,
    resnet20_main,
    resnet20_parser,
    resnet50_main,
    resnet50_parser,
)


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
    out = tmp_path / "out"
    config = resnet20_parser().parse([
        "--dataset", "cifar10", "--data-dir", cifar_dir, "--fast-dev-run", "--batch-size", "4", "--num-workers", "0",
        "--accelerator", "cpu", "--factorization-options", FAST, "--output-dir", str(out), "--no-progress-bar"])
    result = recipes.run_resnet20(config)
    m = result["metrics"]
    for k in ("dense/val_acc", "pre_finetune/val_acc", "pre_finetune/val_acc5", "post_finetune/val_acc",
              "post_finetune/val_loss", "dsf/achieved_density"):
        assert k in m, (k, sorted(m))
    assert m["dsf/achieved_density"] <= 0.1 + 1e-9
    assert result["world_size"] == 1
    written = json.load(open(out / "results.json"))
    assert written["metrics"] == m and written["config"] == config.to_dict()  # JSON keeps floats exactly
    # config.yaml is the run's config: --config reads it back to the same config
    assert resnet20_parser().parse(["--config", str(out / "config.yaml")]) == config


def test_resnet50_imagefolder_fast_dev_run(tmp_path):
    data = make_image_folder(tmp_path / "imagenet")
    config = resnet50_parser().parse([
        "--data-dir", data, "--weights", "none", "--method", "magnitude", "--density", "0.1", "--fast-dev-run",
        "--batch-size", "2", "--num-workers", "0", "--accelerator", "cpu", "--output-dir", str(tmp_path / "out"),
        "--no-progress-bar"])
    result = recipes.run_resnet50(config)
    m = result["metrics"]
    for k in ("dense/val_acc", "pre_finetune/val_acc", "post_finetune/val_acc", "post_finetune/val_acc5"):
        assert k in m, (k, sorted(m))
    assert m["dsf/layers_pruned"] == 52  # 53 convs + fc of ResNet-50, minus the stem conv and fc


def test_resnet20_real_tiny_run_wandb_offline(tmp_path):
    """--fast-dev-run replaces loggers by a DummyLogger, so W&B is checked on a real 1-epoch run
    (digits default, 2 batches) starting from a --dense-ckpt (one W&B run: prune + fine-tune), distilling the
    stage features and logits of the dense model (each term logged; the teacher in no checkpoint)."""
    from dsf_lightning.models import resnet20

    torch.manual_seed(0)
    ckpt = tmp_path / "dense.pt"
    torch.save(resnet20().state_dict(), ckpt)
    out = tmp_path / "out"
    code = resnet20_main([
        "--dense-ckpt", str(ckpt), "--method", "dsf", "--density", "0.2", "--seed", "3", "--max-epochs", "1",
        "--limit-batches", "2", "--batch-size", "16", "--num-workers", "0", "--accelerator", "cpu",
        "--factorization-options", FAST, "--wandb", "offline", "--wandb-dir", str(tmp_path),
        "--output-dir", str(out), "--no-progress-bar", "--distill", "features", "--distill-logit-weight", "0.5"])
    assert code == 0
    rec = wandb_records(tmp_path)
    assert rec["run"]["name"] == "resnet20-16-dsf-d0.2-s3"
    assert rec["run"]["group"] == "resnet20-16-digits" and rec["run"]["project"] == "dsf-digits"
    assert set(rec["run"]["tags"]) == {"resnet20-16", "dsf", "density=0.2", "allocation=uniform",
                                       "dsf+distill=features+outer_iters=2"}  # a distilling run: its own variant
    written = json.load(open(out / "results.json"))
    assert rec["config"]["identity"] == written["identity"] == {
        "model": "resnet20-16", "method": "dsf", "density": 0.2, "seed": 3, "allocation": "uniform",
        "options": {**json.loads(FAST), "distill": "features"}}
    # the summary holds every stage's metrics, the prune time, nnz and the package version
    summ = rec["summary"]
    assert summ["pre_finetune/val_acc"] == written["metrics"]["pre_finetune/val_acc"]  # the same floats
    assert summ["post_finetune/val_acc"] == written["metrics"]["post_finetune/val_acc"]
    assert summ["prune_seconds"] > 0 and summ["nnz"] <= 0.2 * summ["dense_numel"] and summ["version"]
    # the fine-tune's own memory record: storage, training state read from the tensors, peak
    memory = written["finetune_memory"]
    assert summ["finetune_memory"] == memory and memory["peak_kind"] == "sampled RSS"
    assert memory["storage"] == written["config"]["prune"]["storage"]
    state = memory["training_state_bytes"]
    assert state["total"] == state["parameters"] + state["gradients"] + state["optimizer"] + state["buffers"]
    assert state["gradients"] == state["parameters"] and memory["peak_bytes"] > state["total"]
    # dsf-compare reads the run back once (results.json and its W&B copy are the same run)
    from dsf_lightning.runs.records import find_runs

    (record,) = find_runs([tmp_path])
    assert record.metrics["post_finetune"]["val_acc"] == written["metrics"]["post_finetune/val_acc"]
    cfg = rec["config"]  # the nested run config and the module's hparams
    assert cfg["prune"]["method"] == "dsf" and cfg["prune"]["density"] == 0.2 and cfg["prune"]["seed"] == 3
    assert cfg["run"]["seed"] == 3 and cfg["finetune"]["max_epochs"] == 1 and cfg["dense"]["ckpt"] == str(ckpt)
    assert cfg["logging"]["output_dir"] == str(out) and cfg["lr_schedule"] == "linear"
    hist = rec["history"]
    results = json.load(open(out / "results.json"))["metrics"]
    for k in ("dense/val_acc", "pre_finetune/val_acc", "pre_finetune/val_loss", "post_finetune/val_acc",
              "post_finetune/val_acc5"):
        assert hist[k] == results[k], k
    assert "val_acc" in hist and "train_loss_epoch" in hist
    assert {"train/ce_epoch", "train/kd_epoch", "train/features_epoch"} <= set(hist)
    assert cfg["distill"] == {"kind": "features", "weight": 1.0, "temperature": 1.0, "logit_weight": 0.5,
                              "teacher_dtype": None}
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all(k.startswith(("backbone.", "train_acc", "val_acc")) for k in state)  # no teacher
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
    assert result["config"]["run"]["strategy"] is None  # default: ddp chosen for 2 devices
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
    config = resnet50_parser().parse(["--data-dir", str(tmp_path), "--weights", "none"])
    with pytest.raises(FileNotFoundError, match=r"missing \[.*val'\].*'train/' and 'val/'"):
        recipes.run_resnet50(config)


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
    config = resnet20_parser().parse(["--dense-ckpt", str(ckpt), "--width", "16"])
    with pytest.raises(ValueError, match=r"w32\.pt.*shape mismatches: .*conv1\.weight: file \(32, 3, 3, 3\) vs model "
                                         r"\(16, 3, 3, 3\)"):
        recipes.run_resnet20(config)


def test_unknown_method_and_bad_options(tmp_path, no_training, capsys):
    with pytest.raises(SystemExit) as e:
        resnet20_main(["--method", "random"])
    assert e.value.code == 2 and "invalid choice: 'random'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        resnet20_main(["--density", "1.5"])
    assert "density must be a number in (0, 1], got '1.5'" in capsys.readouterr().err
    assert resnet20_main(["--method", "wanda"]) == 2
    err = capsys.readouterr().err
    assert "method 'wanda' needs calibration data" in err and "--calibration-batches" in err
    assert resnet20_main(["--factorization-options", '{"no_such_option": 1}']) == 2
    assert "no_such_option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        resnet20_main(["--distill", "squarehead"])
    assert "argument --distill: invalid choice: 'squarehead'" in capsys.readouterr().err
    assert resnet20_main(["--distill", "logits", "--distill-weight", "2"]) == 2
    assert "distill weight must be in [0, 1] (the KD share of the loss) for kind 'logits', got 2.0" in \
        capsys.readouterr().err


def test_image_size_is_checked_before_training(no_training, capsys):
    assert resnet20_main(["--dataset", "cifar10", "--image-size", "16"]) == 2
    err = capsys.readouterr().err
    assert "data: image_size 16 applies to dataset 'digits' only" in err and "(see --dataset, --image-size)" in err
    assert resnet20_main(["--image-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "data: image_size must be an int >= 8 (the digits are 8x8), got 4 (see --image-size)" in err
    assert resnet20_main(["--max-epochs", "0"]) == 2
    assert "finetune: max_epochs must be an int >= 1, got 0 (see --max-epochs)" in capsys.readouterr().err


def test_errors_while_training_keep_their_traceback(tmp_path, monkeypatch):
    """Only parsing and prepare() count as bad input (exit status 2); an error in fit propagates."""
    def fit(*a, **k):
        raise ValueError("raised inside training")

    monkeypatch.setattr(pl.Trainer, "fit", fit)
    with pytest.raises(ValueError, match="raised inside training"):
        resnet20_main(["--dense-epochs", "1", "--num-workers", "0", "--accelerator", "cpu", "--wandb", "off",
                       "--output-dir", str(tmp_path / "out"), "--no-progress-bar"])
    assert (tmp_path / "out" / "config.yaml").is_file()  # written before training


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
    assert "--print-config" in out and "--no-progress-bar" in out and "(default: 160)" in out


# ------------------------------------------------------------------------------------------------
# the run config: flags, YAML files, --print-config
# ------------------------------------------------------------------------------------------------
FLAGS20 = ["--calibration-batches", "2", "--density", "0.3", "--seed", "4", "--dense-milestones", "5", "7",
           "--nesterov", "--no-progress-bar", "--devices", "auto", "--factorization-options", '{"outer_iters": 3}']


def test_print_config_round_trips_through_config(tmp_path, no_training, capsys):
    for main, parser, flags in ((resnet20_main, resnet20_parser, FLAGS20),
                                (resnet50_main, resnet50_parser, ["--weights", "none", "--lr", "0.2"])):
        with pytest.raises(SystemExit) as e:
            main(["--print-config", *flags])
        assert e.value.code == 0
        printed = capsys.readouterr().out
        (tmp_path / "run.yaml").write_text(printed)
        config = parser().parse(flags)
        assert parser().parse(["--config", str(tmp_path / "run.yaml")]) == config
        assert yaml.safe_load(printed) == config.to_dict()
    config = resnet20_parser().parse(FLAGS20)
    assert config.run.seed == config.prune.seed == 4 and config.dense.milestones == (5, 7)  # --seed sets both
    assert config.prune.family == "vision" and config.run.devices == "auto" and not config.run.progress_bar
    assert ResNet20Config.from_dict(config.to_dict()) == config


def test_flags_override_the_config_file(tmp_path):
    (tmp_path / "run.yaml").write_text("prune:\n  density: 0.3\n  method: magnitude\nfinetune:\n  lr: 1e-4\n"
                                       "  max_epochs: 7\nrun:\n  seed: 2\n")
    config = resnet20_parser().parse(["--config", str(tmp_path / "run.yaml"), "--max-epochs", "9", "--density", "0.2"])
    assert config.prune.density == 0.2 and config.finetune.max_epochs == 9  # the flags win
    assert config.prune.method == "magnitude" and config.finetune.lr == 1e-4 and config.run.seed == 2  # the file
    assert config.finetune.batch_size == 128 and config.dense.epochs == 160  # the defaults
    assert config.prune.seed == 0  # only --seed sets both seeds; the file set run.seed alone


def test_bad_config_files_are_clear_errors(tmp_path, no_training, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("prune:\n  densty: 0.2\n")
    assert resnet20_main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['prune.densty']" in err and "'density'" in err and str(bad) in err
    bad.write_text("trainer:\n  devices: 2\n")
    assert resnet20_main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "['trainer']" in err and "'run'" in err
    bad.write_text("finetune:\n  lr: fast\n")
    assert resnet20_main(["--config", str(bad)]) == 2
    assert "finetune.lr must be a float, got 'fast' (see --lr)" in capsys.readouterr().err
    assert resnet20_main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "--config: no such file" in capsys.readouterr().err


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
    cos = lrs("cosine", 2)  # 8 steps: 0.1 * (1 + cos(pi s/8)) / 2
    assert cos == pytest.approx([0.05 * (1 + math.cos(math.pi * s / 8)) for s in range(8)])


def test_limit_train_batches_shortens_training_only():
    """A short fine-tune is still scored on the whole validation set; --limit-batches alone cuts both."""
    from dsf_lightning.recipes.common import make_trainer

    def limits(*flags):
        config = resnet20_parser().parse(["--accelerator", "cpu", "--num-workers", "0", *flags])
        t = make_trainer(config, max_epochs=1, callbacks=[], logger=None, checkpoint_dir=None)
        return t.limit_train_batches, t.limit_val_batches

    assert limits("--limit-train-batches", "11") == (11, 1.0)
    assert limits("--limit-batches", "3") == (3, 3)
    assert limits("--limit-batches", "3", "--limit-train-batches", "11") == (11, 3)
