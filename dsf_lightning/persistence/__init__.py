"""Pruned models on disk and back: the structure spec and checkpoints, the exports (merged, packed, CSR), whole files.

This package's ``__init__`` imports nothing; ``dsf_lightning`` re-exports the public names.
"""
