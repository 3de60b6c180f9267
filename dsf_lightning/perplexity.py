"""Perplexity of a causal LM on non-overlapping token windows: the protocol of SparseGPT and Wanda.

>>> perplexity(model, windows).perplexity                      # windows: (n, seq_len) token ids
>>> text_perplexity(model, tokenizer, open("my.txt").read(), seq_len=2048).perplexity

Every window is scored on its own (no context carried over from the previous one): the model predicts
tokens ``2..seq_len`` of the window from the ones before them, and the perplexity is
``exp(total negative log-likelihood / scored tokens)``. All windows score ``seq_len - 1`` tokens, so
this equals ``exp(mean_i model(input_ids=w_i, labels=w_i).loss)``, a direct ``transformers``
evaluation of the same windows, and SparseGPT's ``exp(sum_i loss_i * seq_len / (n * seq_len))``. The
windows of a text come from :func:`dsf_lightning.data.text.eval_windows` (the text tokenized whole, cut
into consecutive windows, the tail shorter than a window dropped).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dsf_lightning.pipeline.distributed import comm_device, world

__all__ = ["PROTOCOL", "PerplexityResult", "perplexity", "text_perplexity", "window_nll", "windows_record"]

#: the protocol of every perplexity here, in words (the ``eval_protocol`` of ``results.json``)
PROTOCOL = ("text tokenized whole, consecutive non-overlapping windows (tail dropped), each scored alone; "
            "perplexity = exp(total NLL / scored tokens)")


@dataclass(frozen=True)
class PerplexityResult:
    """``perplexity = exp(nll)``; ``nll`` is the mean next-token negative log-likelihood (nats) over
    ``tokens`` scored tokens of ``windows`` windows of ``seq_len``."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_nll(model: nn.Module, ids: Tensor) -> Tensor:
    """Summed next-token negative log-likelihood (float32 scalar) of the windows ``ids (b, seq_len)``: each
    window's tokens ``1..seq_len-1`` predicted from the ones before them (the loss transformers computes
    for ``labels=ids``, summed instead of averaged)."""
    logits = model(input_ids=ids, use_cache=False).logits  # (b, seq_len, vocab)
    targets = F.pad(ids[:, 1:], (0, 1), value=-100)  # as transformers: shift the labels, not the logits
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")


@torch.no_grad()
def perplexity(model: nn.Module, windows: Tensor, *, batch_size: int = 8, device: torch.device | str | None = None,
               distributed: bool = True, progress: bool = False, desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of ``model`` (any Hugging Face causal LM) on ``windows`` (module docstring).

    Args:
        windows: ``(n, seq_len)`` token ids, ``n >= 1``, ``seq_len >= 2``.
        batch_size: windows per forward.
        device: where the windows go; default: the model's first parameter's device.
        distributed: under an initialized ``torch.distributed`` group, every rank scores windows
            ``rank, rank + world, ...`` and the sums are all-reduced (every rank must call this; each runs
            the same number of forwards, so a model sharded with FSDP is scored too).
        progress: a progress bar over batches.

    The model runs in eval mode in its own dtype (no autocast); its training flags are restored.
    """
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n >= 1, seq_len >= 2) token ids, got shape {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rank, size = world() if distributed else (0, 1)
    mine = windows[rank::size]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    batches = list(mine.split(batch_size))
    # every rank runs the same number of forwards: a sharded model's (FSDP) forward is a collective, so a rank
    # with fewer windows runs a batch more and discards it
    rounds = math.ceil(math.ceil(windows.shape[0] / size) / batch_size)
    try:
        for i, ids in enumerate(tqdm(batches + [windows[:1]] * (rounds - len(batches)), desc=desc, unit="batch",
                                     disable=not progress, leave=False)):
            nll = window_nll(model, ids.to(device)).double()
            if i < len(batches):
                total += nll
    finally:
        for m, mode in modes.items():
            m.training = mode
    agg = torch.stack([total.cpu(), torch.tensor(float(mine.shape[0]), dtype=torch.float64)])
    if size > 1:
        agg = agg.to(comm_device(device))
        dist.all_reduce(agg)
        agg = agg.cpu()
    n, seq_len = int(agg[1]), windows.shape[1]
    tokens = n * (seq_len - 1)
    nll = float(agg[0]) / tokens
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=tokens, windows=n, seq_len=seq_len)


def windows_record(origin: str, text_tokens: int, windows: Tensor) -> dict[str, Any]:
    """What a perplexity was measured on: the text's origin and tokens, the ``(k, seq_len)`` windows' count and
    the tokens they score."""
    return {"origin": origin, "text_tokens": text_tokens, "windows": windows.shape[0],
            "scored_tokens": windows.shape[0] * (windows.shape[1] - 1)}


def text_perplexity(model: nn.Module, tokenizer: Any, text: str, seq_len: int, *, max_windows: int | None = None,
                    batch_size: int = 8, device: torch.device | str | None = None) -> PerplexityResult:
    """Perplexity of ``model`` on your own ``text``: tokenized whole, cut into consecutive ``seq_len``
    windows (at most ``max_windows``), scored with :func:`perplexity` (in this process only)."""
    from dsf_lightning.data.text import consecutive_windows, tokenize_text

    windows = consecutive_windows(tokenize_text(tokenizer, text), seq_len, max_windows)
    return perplexity(model, windows, batch_size=batch_size, device=device, distributed=False)
