"""Image LightningDataModules: CIFAR-10, ImageNet folders, and the offline digits default.

* :class:`CIFAR10DataModule`: torchvision's ``CIFAR10(root=data_dir)``; downloads only with
  ``download=True``, otherwise needs an existing ``data_dir/cifar-10-batches-py``. Train: random
  crop 32 with padding 4 + horizontal flip; both splits normalized with the CIFAR-10 mean/std.
  Validation is the official 10,000-image test split (as in the paper's Table 3).
* :class:`ImageNetDataModule`: ``ImageFolder`` s ``data_dir/train`` and ``data_dir/val`` (one
  subfolder per class). Train: ``RandomResizedCrop(224)`` + flip; val: ``Resize(256)`` +
  ``CenterCrop(224)``; ImageNet mean/std.
* :class:`DigitsDataModule`: offline and embedded -- scikit-learn's ``load_digits()`` (1,797 real
  8x8 handwritten digits, 10 classes), upsampled bilinearly to 32x32, repeated to 3 channels, split
  into train/val with a seeded stratified split (80/20 by default); train augmentation: random
  crop 32 with padding 4 (no flip: digits are not mirror-symmetric). It is the default of the
  ResNet-20 recipe and of ``make demo``: a CIFAR-shaped task that needs no download.

Every module checks its data directory in ``__init__`` (:meth:`check`), so a missing dataset fails
before any model is built or trained, with the path and what is expected there.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageNetDataModule",
    "digits_tensors",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Base(pl.LightningDataModule):
    num_classes: int

    def __init__(self, batch_size: int, num_workers: int, pin_memory: bool | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def _loader(self, ds: Dataset | None, train: bool) -> DataLoader:
        if ds is None:
            self.setup("fit")
            ds = self.train_set if train else self.val_set
        return DataLoader(ds, batch_size=self.batch_size, shuffle=train, drop_last=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


# ------------------------------------------------------------------------------------------------
# CIFAR-10
# ------------------------------------------------------------------------------------------------
class CIFAR10DataModule(_Base):
    """CIFAR-10 from ``data_dir`` (``data_dir/cifar-10-batches-py``); ``download=True`` fetches it.

    Raises:
        FileNotFoundError: at construction, when ``download=False`` and the folder is missing.
    """

    num_classes = 10
    folder = "cifar-10-batches-py"

    def __init__(self, data_dir: str | os.PathLike, *, download: bool = False, batch_size: int = 128,
                 num_workers: int = 4, augment: bool = True, pin_memory: bool | None = None) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
        self.data_dir = str(data_dir)
        self.download = download
        self.augment = augment
        self.check()

    def check(self) -> None:
        """Raise ``FileNotFoundError`` unless the data is there (or will be downloaded)."""
        if self.download:
            return
        path = Path(self.data_dir) / self.folder
        if not path.is_dir():
            raise FileNotFoundError(
                f"CIFAR-10 not found: expected the folder {str(path)!r} (torchvision's python version: "
                f"data_batch_1..5, test_batch, batches.meta) under --data-dir {self.data_dir!r}. "
                f"Pass --download to fetch it (about 170 MB), or point --data-dir at an existing copy.")

    def prepare_data(self) -> None:
        if self.download:
            from torchvision.datasets import CIFAR10

            CIFAR10(self.data_dir, train=True, download=True)
            CIFAR10(self.data_dir, train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        import torchvision.transforms as T
        from torchvision.datasets import CIFAR10

        norm = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        aug = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if self.augment else []
        self.train_set = CIFAR10(self.data_dir, train=True, transform=T.Compose(aug + norm), download=False)
        self.val_set = CIFAR10(self.data_dir, train=False, transform=T.Compose(norm), download=False)


# ------------------------------------------------------------------------------------------------
# ImageNet folders
# ------------------------------------------------------------------------------------------------
class ImageNetDataModule(_Base):
    """ImageNet (or any ImageFolder pair) from ``data_dir/train`` and ``data_dir/val``.

    Raises:
        FileNotFoundError: at construction, when ``data_dir``, ``train/`` or ``val/`` is missing.
    """

    def __init__(self, data_dir: str | os.PathLike, *, batch_size: int = 256, num_workers: int = 8,
                 image_size: int = 224, resize_size: int = 256, num_classes: int = 1000,
                 pin_memory: bool | None = None) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
        self.data_dir = str(data_dir)
        self.image_size, self.resize_size = image_size, resize_size
        self.num_classes = num_classes
        self.check()

    def check(self) -> None:
        """Raise ``FileNotFoundError`` unless ``data_dir/train`` and ``data_dir/val`` exist."""
        root = Path(self.data_dir)
        missing = [str(root / s) for s in ("train", "val") if not (root / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"ImageNet folders not found under --data-dir {self.data_dir!r}: missing {missing}. Expected "
                f"'train/' and 'val/' subfolders, each with one folder of images per class "
                f"(torchvision ImageFolder layout, e.g. train/n01440764/*.JPEG).")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        train_tf = T.Compose([T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip()] + norm)
        val_tf = T.Compose([T.Resize(self.resize_size), T.CenterCrop(self.image_size)] + norm)
        self.train_set = ImageFolder(os.path.join(self.data_dir, "train"), transform=train_tf)
        self.val_set = ImageFolder(os.path.join(self.data_dir, "val"), transform=val_tf)
        n = len(self.train_set.classes)
        if n > self.num_classes:
            raise ValueError(f"{self.data_dir}/train has {n} classes but the model has num_classes={self.num_classes}")
        if self.val_set.classes != self.train_set.classes:
            raise ValueError(f"{self.data_dir}: train/ and val/ have different class folders")


# ------------------------------------------------------------------------------------------------
# offline default: scikit-learn digits
# ------------------------------------------------------------------------------------------------
def digits_tensors(image_size: int = 32) -> tuple[Tensor, Tensor]:
    """All 1,797 scikit-learn digits as ``(N, 3, image_size, image_size)`` floats in ``[0, 1]``
    (bilinear upsampling of the 8x8 images, values 0..16 scaled by 1/16) and ``(N,)`` int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp_(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(d.target).long()


class _TensorImages(Dataset):
    """Images in ``[0, 1]``; optional random crop with zero padding (the digits' background); then
    per-channel normalization."""

    def __init__(self, x: Tensor, y: Tensor, mean: Tensor, std: Tensor, pad: int = 0) -> None:
        self.x, self.y, self.mean, self.std, self.pad = x, y, mean, std, pad

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = self.x[i]
        if self.pad:
            h, w = img.shape[-2:]
            padded = F.pad(img, (self.pad,) * 4)
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            img = padded[:, top:top + h, left:left + w]
        return (img - self.mean) / self.std, self.y[i]


class DigitsDataModule(_Base):
    """scikit-learn's 1,797 digits as a 10-class, CIFAR-shaped (3x32x32) task; nothing to download.

    Args:
        val_fraction: held-out share of a stratified split (seeded by ``seed``).
        seed: of the split (the training order follows the global seed).
        augment: random crop with padding ``pad`` on the training split.
    """

    num_classes = 10

    def __init__(self, *, batch_size: int = 128, num_workers: int = 0, val_fraction: float = 0.2, seed: int = 0,
                 image_size: int = 32, augment: bool = True, pad: int = 4, pin_memory: bool | None = None) -> None:
        super().__init__(batch_size, num_workers, pin_memory)
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.val_fraction, self.seed, self.image_size = val_fraction, seed, image_size
        self.augment, self.pad = augment, pad

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.model_selection import train_test_split

        x, y = digits_tensors(self.image_size)
        idx = torch.arange(len(y)).numpy()
        tr, va = train_test_split(idx, test_size=self.val_fraction, stratify=y.numpy(), random_state=self.seed)
        tr, va = torch.from_numpy(tr), torch.from_numpy(va)
        mean = x[tr].mean(dim=(0, 2, 3)).view(3, 1, 1)
        std = x[tr].std(dim=(0, 2, 3)).view(3, 1, 1)
        self.train_set = _TensorImages(x[tr], y[tr], mean, std, pad=self.pad if self.augment else 0)
        self.val_set = _TensorImages(x[va], y[va], mean, std)
