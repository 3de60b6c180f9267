"""Models: the CIFAR ResNet-20 architecture and the LightningModules ``ImageClassifier`` and ``CausalLM``.

``ImageClassifier`` wraps any image backbone (torchvision, timm, :func:`resnet20`) for training
and fine-tuning with SGD and the paper's schedules; ``CausalLM`` wraps any Hugging Face causal LM
(AdamW, warmup then linear/cosine decay, perplexity), and :func:`load_causal_lm` loads one offline-aware.
"""

from dsf_lightning.models.causal_lm import CausalLM, load_causal_lm, load_packed_causal_lm
from dsf_lightning.models.classifier import ImageClassifier
from dsf_lightning.models.resnet20 import BasicBlock, ResNet20, resnet20

__all__ = ["BasicBlock", "CausalLM", "ImageClassifier", "ResNet20", "load_causal_lm", "load_packed_causal_lm",
           "resnet20"]
