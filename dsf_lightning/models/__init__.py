"""Models: the CIFAR ResNet-20 architecture.

The LightningModules (``ImageClassifier``, ``CausalLM``) that wrap models for fine-tuning come
later and will be exported from here too.
"""

from dsf_lightning.models.resnet20 import BasicBlock, ResNet20, resnet20

__all__ = ["BasicBlock", "ResNet20", "resnet20"]
