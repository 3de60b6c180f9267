"""LLM text: sources -> token windows, the sequence-length rule and its errors, a fine-tuning DataModule.

Sources (:class:`TextSource`: named documents):

* ``"wikipedia"``, the offline default: gensim's shortened English Wikipedia dump (106 articles,
  ~730k SmolLM2 tokens), split into disjoint articles: every third article (index ``i % 3 == 2``)
  is evaluation text, the others calibration and fine-tuning text (:func:`wikipedia_split`);
* ``"c4"`` and ``"wikitext2"`` through ``datasets`` (the hub or its local cache), the paper's
  setting: calibration from C4's first training shard (documents in a seeded random order; unlike
  SparseGPT, which cuts each window inside one random document, a window here may span two), evaluation
  on WikiText-2's test split (``"wikitext2"``) or SparseGPT's C4 validation protocol (the first 1,100
  documents joined by spaces, at most 256 windows);
* local text files: as calibration text every file is a document; as evaluation text every file is
  its own text, named by its stem.

Windows (``(n, seq_len)`` ``torch.long`` token ids):

* evaluation (:func:`eval_windows`): the documents joined by ``"\\n\\n"`` are tokenized as one string
  with the tokenizer's own special tokens, then cut into consecutive non-overlapping windows; the
  tail shorter than a window is dropped. This is the WikiText-2 protocol of SparseGPT and Wanda, and
  what a direct ``transformers`` evaluation of the same windows does;
* calibration (:func:`calibration_windows`): the documents are tokenized one by one (no special
  tokens; ``"\n\n"`` after each) into one stream, and ``samples`` disjoint windows are drawn at random
  window slots (seeded), the same rule for every source;
* fine-tuning: consecutive windows of that same stream (:func:`consecutive_windows`).

Sequence length (:func:`model_context`, :func:`resolve_seq_len`): the model's context is the smallest
of its config's position limit (``max_position_embeddings``, ``n_positions``, ...) and the tokenizer's
``model_max_length`` when that is set (transformers' "no limit" value, ~1e30, is ignored). The default
is the paper's 2048 capped by that context; an explicit length beyond it is an error.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "DATASETS",
    "PAPER_SEQ_LEN",
    "TextDataModule",
    "TextSource",
    "calibration_source",
    "calibration_windows",
    "consecutive_windows",
    "eval_sources",
    "eval_windows",
    "model_context",
    "random_windows",
    "resolve_seq_len",
    "text_files",
    "token_stream",
    "tokenize_text",
    "wikipedia_split",
]

#: The paper's (SparseGPT's, Wanda's) sequence length for LLaMA.
PAPER_SEQ_LEN = 2048
#: Named text sources: the offline default and the two of the paper (through ``datasets``).
DATASETS: tuple[str, ...] = ("wikipedia", "c4", "wikitext2")
#: A tokenizer ``model_max_length`` at or above this means "not set" (transformers uses ``int(1e30)``).
_NO_LIMIT = 10**18
_CONFIG_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_C4_TRAIN = "en/c4-train.00000-of-01024.json.gz"
_C4_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"


@dataclass(frozen=True)
class TextSource:
    """A named body of text.

    Attributes:
        name: the key of its results (dataset name or file stem).
        documents: the documents in order (or a function returning them, called once when first needed).
        origin: where the text comes from, for the protocol record.
        joiner: put between documents of an evaluation text.
        shuffle: draw calibration documents in a seeded random order (large corpora: C4).
        max_windows: at most this many evaluation windows (SparseGPT's C4 protocol: 256).
        first_documents: an evaluation text uses only the first N documents (C4 validation: 1,100).
    """

    name: str
    documents: Sequence[str] | Callable[[], Sequence[str]]
    origin: str
    joiner: str = "\n\n"
    shuffle: bool = False
    max_windows: int | None = None
    first_documents: int | None = None

    @cached_property
    def docs(self) -> Sequence[str]:
        """The documents (loaded on first use)."""
        return self.documents() if callable(self.documents) else self.documents


# ------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def wikipedia_split() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(calibration, evaluation)`` articles of the offline Wikipedia dump: article ``i`` is evaluation
    text when ``i % 3 == 2``, else calibration (and fine-tuning) text; the two never share an article.
    Parsed once per process (~8 s)."""
    from dsf_lightning.data.offline import wikipedia_texts

    texts = wikipedia_texts()
    return tuple(t for i, t in enumerate(texts) if i % 3 != 2), tuple(t for i, t in enumerate(texts) if i % 3 == 2)


def text_files(paths: Sequence[str | os.PathLike], flag: str) -> dict[str, str]:
    """``{stem: text}`` of UTF-8 text files; ``ValueError`` naming ``flag`` for a missing, unreadable or
    empty file, or two files with the same stem (their results would share a name)."""
    out: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"{flag} {str(p)!r}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{flag} {str(p)!r}: cannot read it as UTF-8 text ({type(e).__name__}: {e})") from None
        if not text.strip():
            use = "evaluate" if "eval" in flag else "calibrate"
            raise ValueError(f"{flag} {str(p)!r} is empty: no text to {use} on")
        if path.stem in out:
            raise ValueError(f"{flag}: two files are named {path.stem!r}; results are keyed by the file stem, "
                             f"rename one")
        out[path.stem] = text
    return out


def _hub_dataset(what: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset(*args, **kwargs)``; any failure is a ``ValueError`` that says what works offline."""
    try:
        import datasets

        return datasets.load_dataset(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- offline, missing cache, hub errors: all say the same thing
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        raise ValueError(
            f"{what}: could not load {args[0]!r} through `datasets`{' (HF_HUB_OFFLINE is set)' if offline else ''}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. It needs the Hugging Face hub or a "
            f"local datasets cache of it; offline, use the embedded default 'wikipedia' or local text files "
            f"(--calibration-text FILE, --eval-text FILE)") from None


def calibration_source(name: str | None = None, files: Sequence[str] = ()) -> TextSource:
    """The calibration (and fine-tuning) text: ``files`` if given (each a document), else the dataset
    ``name`` (default ``"wikipedia"``)."""
    if files:
        if name is not None:
            raise ValueError(f"give either --calibration {name} or --calibration-text files, not both")
        docs = text_files(files, "--calibration-text")
        return TextSource("+".join(docs), list(docs.values()), f"local files {[str(f) for f in files]}")
    name = name or "wikipedia"
    if name == "wikipedia":
        return TextSource("wikipedia", lambda: wikipedia_split()[0], "gensim's English Wikipedia dump, articles "
                          "i % 3 != 2 (offline default)")
    if name == "c4":
        return TextSource("c4", lambda: _hub_dataset("--calibration c4", "allenai/c4", data_files={"train": _C4_TRAIN},
                                                     split="train")["text"],
                          f"datasets allenai/c4 {_C4_TRAIN}", shuffle=True)
    if name == "wikitext2":
        return TextSource("wikitext2", lambda: _hub_dataset("--calibration wikitext2", "Salesforce/wikitext",
                                                            "wikitext-2-raw-v1", split="train")["text"],
                          "datasets Salesforce/wikitext wikitext-2-raw-v1 train")
    raise ValueError(f"--calibration must be one of {DATASETS}, got {name!r}")


def eval_sources(names: Sequence[str] | None = None, files: Sequence[str] = ()) -> list[TextSource]:
    """The evaluation texts: the datasets ``names`` and the files (each named by its stem); with neither,
    the offline default ``"wikipedia"``."""
    names = list(names or ([] if files else ["wikipedia"]))
    out = []
    for name in names:
        if name == "wikipedia":
            out.append(TextSource("wikipedia", lambda: wikipedia_split()[1],
                                  "gensim's English Wikipedia dump, articles i % 3 == 2 (offline default)"))
        elif name == "wikitext2":
            out.append(TextSource("wikitext2", lambda: _hub_dataset("--eval wikitext2", "Salesforce/wikitext",
                                                                    "wikitext-2-raw-v1", split="test")["text"],
                                  "datasets Salesforce/wikitext wikitext-2-raw-v1 test"))
        elif name == "c4":
            out.append(TextSource("c4", lambda: _hub_dataset("--eval c4", "allenai/c4",
                                                             data_files={"validation": _C4_VALIDATION},
                                                             split="validation")["text"],
                                  f"datasets allenai/c4 {_C4_VALIDATION}, first 1100 documents", joiner=" ",
                                  max_windows=256, first_documents=1100))
        else:
            raise ValueError(f"--eval must be one of {DATASETS}, got {name!r}")
    out += [TextSource(stem, [text], "local file") for stem, text in text_files(files, "--eval-text").items()]
    seen = [s.name for s in out]
    if len(set(seen)) != len(seen):
        raise ValueError(f"evaluation texts must have distinct names (results are keyed by them), got {seen}")
    return out


# ------------------------------------------------------------------------------------------------
# sequence length
# ------------------------------------------------------------------------------------------------
def model_context(model: Any, tokenizer: Any = None) -> tuple[int | None, str]:
    """``(tokens, where from)``: the longest sequence the model is meant to see (module docstring), or
    ``(None, reason)`` when neither its config nor its tokenizer states one."""
    found: list[tuple[int, str]] = []
    config = getattr(model, "config", None)
    for attr in _CONFIG_LIMITS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.append((value, f"config.{attr}"))
            break
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < _NO_LIMIT:
        found.append((limit, "tokenizer.model_max_length"))
    if not found:
        return None, f"neither the config ({', '.join(_CONFIG_LIMITS)}) nor the tokenizer (model_max_length) sets one"
    tokens, where = min(found)
    if limit is not None and not any(w.startswith("tokenizer") for _, w in found):
        where += " (the tokenizer sets no limit)"
    return tokens, where


def resolve_seq_len(requested: int | None, context: int | None, where: str) -> int:
    """The sequence length: ``requested``, or the paper's 2048 capped by ``context`` when ``None``.

    Raises:
        ValueError: ``requested`` beyond ``context`` or below 2, or no ``requested`` and no known context.
    """
    if requested is None:
        if context is None:
            raise ValueError(f"cannot tell the model's context ({where}): pass --seq-len")
        return min(PAPER_SEQ_LEN, context)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 2:
        raise ValueError(f"--seq-len must be an int >= 2 (a window predicts seq_len - 1 tokens), got {requested!r}")
    if context is not None and requested > context:
        raise ValueError(f"--seq-len {requested} is beyond the model's context of {context} tokens ({where}); "
                         f"use --seq-len {context} or less")
    return requested


# ------------------------------------------------------------------------------------------------
# tokens and windows
# ------------------------------------------------------------------------------------------------
def tokenize_text(tokenizer: Any, text: str) -> Tensor:
    """1-D ids of ``text`` tokenized as one string with the tokenizer's own special tokens (as
    ``tokenizer(text, return_tensors="pt").input_ids[0]``; longer than the model's context on purpose, so
    without that warning)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def token_stream(tokenizer: Any, source: TextSource, *, max_tokens: int | None = None, seed: int = 0) -> Tensor:
    """1-D ids of ``source``'s documents, tokenized one by one without special tokens, each followed by the
    tokens of ``"\\n\\n"``; in a ``seed``-ed random order if ``source.shuffle``; stops once ``max_tokens``
    are reached (``None``: all documents)."""
    docs = source.docs
    order: Iterable[int] = range(len(docs))
    if source.shuffle:
        order = random.Random(seed).sample(range(len(docs)), len(docs))
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    stream: list[int] = []
    for i in order:
        text = docs[i]
        if not text or not text.strip():
            continue
        stream += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + sep
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    return torch.tensor(stream, dtype=torch.long)


def random_windows(stream: Tensor, seq_len: int, samples: int, seed: int, *, what: str) -> Tensor:
    """``samples`` disjoint ``seq_len`` windows of ``stream``: the slots of a grid with a random offset,
    drawn without replacement (``random.Random(seed)``). ``ValueError`` naming ``what`` when ``stream`` is
    shorter than ``samples * seq_len``."""
    n = int(stream.numel())
    if samples < 1:
        raise ValueError(f"--calibration-samples must be >= 1, got {samples}")
    if n < samples * seq_len:
        raise ValueError(f"{what} gives {n} tokens, fewer than the {samples} x {seq_len} = {samples * seq_len} needed "
                         f"for {samples} disjoint windows of --seq-len {seq_len}; lower --calibration-samples or "
                         f"--seq-len, or give more text (--calibration-text FILE, repeatable)")
    rng = random.Random(seed)
    offset = rng.randint(0, min(seq_len - 1, n - samples * seq_len))
    slots = rng.sample(range((n - offset) // seq_len), samples)
    return torch.stack([stream[offset + s * seq_len: offset + (s + 1) * seq_len] for s in slots])


def consecutive_windows(tokens: Tensor, seq_len: int, max_windows: int | None = None, *, what: str = "the text"
                        ) -> Tensor:
    """``(k, seq_len)`` consecutive non-overlapping windows from the start of ``tokens`` (the tail shorter than a
    window dropped), at most ``max_windows``; ``ValueError`` naming ``what`` if not even one fits."""
    k = int(tokens.numel()) // seq_len
    if k == 0:
        raise ValueError(f"{what} has {tokens.numel()} tokens, fewer than one window of --seq-len {seq_len}")
    if max_windows is not None:
        k = min(k, max_windows)
    return tokens[: k * seq_len].view(k, seq_len)


def eval_windows(tokenizer: Any, source: TextSource, seq_len: int, max_windows: int | None = None
                 ) -> tuple[Tensor, int]:
    """``(windows, tokens of the whole text)`` of an evaluation text (module docstring); ``max_windows``
    caps the windows further (quick runs)."""
    docs = list(source.docs[: source.first_documents] if source.first_documents else source.docs)
    tokens = tokenize_text(tokenizer, source.joiner.join(docs))
    caps = [c for c in (source.max_windows, max_windows) if c is not None]
    windows = consecutive_windows(tokens, seq_len, min(caps) if caps else None,
                                  what=f"evaluation text {source.name!r} ({source.origin})")
    return windows, int(tokens.numel())


def calibration_windows(tokenizer: Any, source: TextSource, seq_len: int, samples: int, seed: int = 0, *,
                        max_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    """``(windows (samples, seq_len), stream)``: random disjoint calibration windows of ``source``'s token
    stream (:func:`token_stream`, :func:`random_windows`) and the stream itself (for fine-tuning windows)."""
    stream = token_stream(tokenizer, source, max_tokens=max_tokens, seed=seed)
    what = f"calibration text {source.name!r} ({source.origin})"
    return random_windows(stream, seq_len, samples, seed, what=what), stream


# ------------------------------------------------------------------------------------------------
# fine-tuning
# ------------------------------------------------------------------------------------------------
class _Windows(Dataset):
    def __init__(self, windows: Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> Tensor:
        return self.windows[i]


class TextDataModule(pl.LightningDataModule):
    """Token windows for fine-tuning a causal LM: batches are ``(batch_size, seq_len)`` ``long`` ids.

    Args:
        train: ``(n, seq_len)`` training windows (shuffled every epoch; sharded by Lightning under DDP).
        val: ``(m, seq_len)`` validation windows, or ``None`` (no validation loader).
        batch_size: windows per batch and device.
        num_workers: dataloader workers.
    """

    def __init__(self, train: Tensor, val: Tensor | None = None, *, batch_size: int = 8, num_workers: int = 0) -> None:
        super().__init__()
        for name, w in (("train", train), ("val", val)):
            if w is not None and (w.dim() != 2 or w.dtype != torch.long or w.shape[0] == 0):
                raise ValueError(f"{name} windows must be a non-empty (n, seq_len) long tensor, got "
                                 f"{w.dtype} {tuple(w.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.train, self.val, self.batch_size, self.num_workers = train, val, batch_size, num_workers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Windows(self.train), batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val is None:
            return []
        return DataLoader(_Windows(self.val), batch_size=self.batch_size, num_workers=self.num_workers)
