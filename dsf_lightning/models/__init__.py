"""Models: the CIFAR ResNet-20 architecture and the ``ImageClassifier`` LightningModule.

``ImageClassifier`` wraps any image backbone (torchvision, timm, :func:`resnet20`) for training
and fine-tuning with SGD and the paper's schedules; a ``CausalLM`` module comes later.
"""

from dsf_lightning.models.classifier import ImageClassifier
from dsf_lightning.models.resnet20 import BasicBlock, ResNet20, resnet20

__all__ = ["BasicBlock", "ImageClassifier", "ResNet20", "resnet20"]
