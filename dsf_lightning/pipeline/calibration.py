"""Input Gram matrices for layer-wise reconstruction.

For a layer with weight ``W`` of shape ``(out, fan_in)`` and calibration inputs ``X``
(``N`` tokens, one per row, shape ``(N, fan_in)``) the layer-wise objective is
``||X W^T - X W'^T||^2 = tr((W - W') G (W - W')^T) * N`` with

    G = X^T X / N        (fan_in, fan_in), float32, mean over tokens.

Tokens are:
  * Linear / HF ``Conv1D``: every position of every leading dim, ``x.reshape(-1, fan_in)``;
  * Conv2d: every output position of every image, rows of the im2col patch matrix
    (``F.unfold``), ``fan_in = in * kh * kw`` in the order of ``conv.weight.flatten(1)``.

``G`` is kept as a running mean (as in SparseGPT), so it stays O(|x|^2) in magnitude for
any token count:  ``G <- G * n/(n+b) + X_b^T X_b / (n+b)``, each batch's ``X_b^T X_b``
computed in float32 from the float32-cast input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsf_lightning.layers import PAD_MODES, explicit_padding, fan_in, grouped, pair
from dsf_lightning.modules import ConvGeometry, MaskedLayer
from dsf_lightning.modules.attention import feeding

__all__ = ["GramAccumulator", "InputGramRecorder", "Reduce", "conv2d_patches", "default_forward", "is_conv",
           "move_batch", "no_reduce", "record_grams"]

ConvLike = nn.Conv2d | ConvGeometry
#: ``reduce(accumulators, device)``: the Grams of every process merged (``distributed.all_reduce_grams``), or
#: this process's own (:func:`no_reduce`)
Reduce = Callable[[Mapping[str, "GramAccumulator"], torch.device], dict[str, "GramAccumulator"]]


def no_reduce(accumulators: Mapping[str, GramAccumulator], device: torch.device) -> dict[str, GramAccumulator]:
    """The :data:`Reduce` of one process: its own accumulators."""
    return dict(accumulators)


def is_conv(module: nn.Module) -> bool:
    """Whether ``module``'s input Gram is over im2col rows: ``nn.Conv2d`` or a pruned conv."""
    return isinstance(module, (nn.Conv2d, ConvGeometry))


def conv2d_patches(x: Tensor, conv: ConvLike) -> Tensor:
    """im2col rows of a Conv2d input: ``x (N, in, H, W) -> (N*L, in*kh*kw)``.

    ``L = H_out * W_out``; row ``n*L + l`` is the receptive field of output position ``l``
    of image ``n``, so ``conv(x)`` (bias-free) equals ``rows @ conv.weight.flatten(1).T``.
    Honours stride, dilation, numeric or ``"same"``/``"valid"`` padding and every
    ``padding_mode`` (non-zero modes and asymmetric ``"same"`` are padded with ``F.pad``
    first, then unfolded with padding 0). An unbatched ``(in, H, W)`` input is one image.
    ``conv`` is an ``nn.Conv2d`` or a pruned conv (same geometry attributes).
    """
    if not is_conv(conv):
        raise ValueError(f"conv2d_patches expects nn.Conv2d, got {type(conv).__name__}")
    if grouped(conv):
        raise ValueError(f"conv2d_patches: {grouped(conv)}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] != conv.in_channels:
        raise ValueError(
            f"conv2d_patches: expected input (N, {conv.in_channels}, H, W), got shape {tuple(x.shape)}"
        )
    left, right, top, bottom = explicit_padding(conv)
    if conv.padding_mode == "zeros" and left == right and top == bottom:
        padding: tuple[int, int] = (top, left)
    else:
        if conv.padding_mode not in PAD_MODES:
            raise ValueError(f"conv2d_patches: unknown padding_mode {conv.padding_mode!r}")
        if left or right or top or bottom:
            x = F.pad(x, (left, right, top, bottom), mode=PAD_MODES[conv.padding_mode])
        padding = (0, 0)
    cols = F.unfold(x, pair(conv.kernel_size), dilation=pair(conv.dilation), padding=padding, stride=pair(conv.stride))
    # (N, in*kh*kw, L) -> (N*L, in*kh*kw)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


class GramAccumulator:
    """Running mean ``G = X^T X / N`` of input rows, ``(fan_in, fan_in)`` float32.

    ``add(rows)`` with ``rows (b, fan_in)`` updates ``G <- G*n/(n+b) + rows^T rows/(n+b)``,
    ``n <- n+b`` (``count`` is a Python int). With ``device=None`` the Gram lives on the
    device of the first input; otherwise inputs are moved to ``device``.

    Distributed use: ``to_sum()`` gives ``(G * n in float64, n)``; all-reduce (sum) both
    parts across ranks and rebuild with ``GramAccumulator.from_sum(total, count)``.

    ``diagonal=True`` keeps only ``diag(G)`` ``(fan_in,)`` (the inputs' squared norms per feature, what
    the allocation's scores need): memory linear in ``fan_in`` for every layer of a model at once.
    """

    def __init__(self, fan_in: int, device: torch.device | str | None = None, *, diagonal: bool = False) -> None:
        if fan_in <= 0:
            raise ValueError(f"fan_in must be positive, got {fan_in}")
        self.fan_in = int(fan_in)
        self.diagonal = bool(diagonal)
        self.device = torch.device(device) if device is not None else None
        self._gram: Tensor | None = None
        self.count = 0

    # -- accumulation -----------------------------------------------------------------
    @torch.no_grad()
    def add(self, rows: Tensor) -> None:
        """Add ``rows (tokens, fan_in)`` (rows of X)."""
        if rows.dim() != 2 or rows.shape[-1] != self.fan_in:
            raise ValueError(
                f"GramAccumulator.add: expected rows of shape (tokens, {self.fan_in}), got {tuple(rows.shape)}"
            )
        b = rows.shape[0]
        if b == 0:
            return
        x = rows.detach()
        if self.device is not None:
            x = x.to(self.device)
        x = x.float()
        if not torch.isfinite(x).all():
            raise ValueError(
                f"GramAccumulator.add: input of shape {tuple(rows.shape)} contains NaN or inf"
            )
        xtx = (x * x).sum(0) if self.diagonal else x.T @ x
        if self._gram is None:
            self._gram = torch.zeros(self._shape, dtype=torch.float32, device=x.device)
            if self.device is None:
                self.device = x.device
        n = self.count
        self._gram.mul_(n / (n + b)).add_(xtx, alpha=1.0 / (n + b))
        self.count = n + b

    def add_linear_input(self, x: Tensor) -> None:
        """Add a Linear input ``(..., fan_in)``: every leading position is a token."""
        if x.dim() == 0 or x.shape[-1] != self.fan_in:
            raise ValueError(
                f"GramAccumulator.add_linear_input: expected last dim {self.fan_in}, got shape {tuple(x.shape)}"
            )
        self.add(x.reshape(-1, self.fan_in))

    def add_conv2d_input(self, x: Tensor, conv: ConvLike, max_patch_elements: int = 1 << 24) -> None:
        """Add a Conv2d input ``(N, in, H, W)`` as im2col rows, a few images at a time.

        Images are processed in chunks so that one chunk's patch matrix holds at most
        ``max_patch_elements`` entries (at least one image per chunk).
        """
        conv_fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        if conv_fan_in != self.fan_in:
            raise ValueError(
                f"GramAccumulator.add_conv2d_input: conv fan_in {conv_fan_in} "
                f"(in={conv.in_channels}, kernel={tuple(conv.kernel_size)}) != accumulator fan_in {self.fan_in}"
            )
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.shape[0] == 0:
            return
        first = conv2d_patches(x[:1], conv)  # also validates the shape
        per_image = max(1, first.numel())
        chunk = max(1, max_patch_elements // per_image)
        self.add(first)
        for i in range(1, x.shape[0], chunk):
            self.add(conv2d_patches(x[i : i + chunk], conv))

    # -- results / combination ------------------------------------------------------------
    @property
    def _shape(self) -> tuple[int, ...]:
        return (self.fan_in,) if self.diagonal else (self.fan_in, self.fan_in)

    @property
    def gram(self) -> Tensor:
        """``G = X^T X / N``, ``(fan_in, fan_in)`` float32, or its diagonal ``(fan_in,)`` with ``diagonal``
        (zeros before any input)."""
        if self._gram is None:
            return torch.zeros(self._shape, dtype=torch.float32, device=self.device)
        return self._gram

    @torch.no_grad()
    def merge_(self, other: GramAccumulator) -> GramAccumulator:
        """In place: become the accumulator over both data sets (count-weighted mean)."""
        if other.fan_in != self.fan_in or other.diagonal != self.diagonal:
            raise ValueError(f"merge_: fan_in {other.fan_in} != {self.fan_in} or only one keeps the diagonal only")
        if other.count == 0:
            return self
        if self.count == 0:
            g = other.gram.clone()
            self._gram = g.to(self.device) if self.device is not None else g
            self.device = self._gram.device
            self.count = other.count
            return self
        n, m = self.count, other.count
        self._gram.mul_(n / (n + m)).add_(other.gram.to(self._gram.device), alpha=m / (n + m))
        self.count = n + m
        return self

    def to_sum(self) -> tuple[Tensor, int]:
        """``(G * count as float64 (fan_in, fan_in), count)``: summable across ranks."""
        return self.gram.double() * self.count, self.count

    @classmethod
    def from_sum(cls, total: Tensor, count: int, device: torch.device | str | None = None) -> GramAccumulator:
        """Inverse of :meth:`to_sum` (after summing): ``G = total / count``."""
        count = int(count)
        acc = cls(total.shape[-1], device=device if device is not None else total.device, diagonal=total.dim() == 1)
        if count > 0:
            acc._gram = (total.double() / count).float().to(acc.device)
            acc.count = count
        return acc

    def __repr__(self) -> str:
        return (f"GramAccumulator(fan_in={self.fan_in}, count={self.count}, device={self.device}"
                f"{', diagonal=True' if self.diagonal else ''})")


def _layer_fan_in(name: str, module: nn.Module) -> int:
    return module.fan_in if isinstance(module, MaskedLayer) else fan_in(name, module)


class InputGramRecorder:
    """Context manager recording the input Gram of selected layers during forward passes.

    >>> with InputGramRecorder(model, {"fc": model.fc}) as rec:
    ...     for x in loader: model(x)
    >>> rec.grams["fc"]            # (fan_in, fan_in) float32, X^T X / N

    One :class:`GramAccumulator` per module is fed by a forward pre-hook; hooks are removed
    on exit, also when the block raises. Modules: ``nn.Linear``, HF ``Conv1D`` (tokens =
    all leading positions), ``nn.Conv2d`` with ``groups == 1`` (tokens = im2col rows), and the
    pruned layers of :mod:`dsf_lightning.modules` (the tokens of the layer they replace).
    """

    def __init__(
        self,
        model: nn.Module,
        modules: Mapping[str, nn.Module],
        device: torch.device | str | None = None,
        *,
        diagonal: bool = False,
    ) -> None:
        owned = {id(m) for m in model.modules()}
        self.model = model
        self.modules = dict(modules)
        self.accumulators: dict[str, GramAccumulator] = {}
        for name, module in self.modules.items():
            if id(module) not in owned:
                raise ValueError(f"module {name!r} is not a submodule of the given model")
            self.accumulators[name] = GramAccumulator(_layer_fan_in(name, module), device=device, diagonal=diagonal)
        self._handles: list[Any] = []
        self._feeding = contextlib.ExitStack()

    def _hook(self, name: str):
        acc = self.accumulators[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            if is_conv(module):
                acc.add_conv2d_input(x, module)
            else:
                acc.add_linear_input(x)

        return hook

    def __enter__(self) -> InputGramRecorder:
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
            # exposed attention weights (modules.attention) are never called by their module: feed them
            self._feeding.enter_context(feeding(self.model, only=self.modules))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove all hooks (idempotent)."""
        while self._handles:
            self._handles.pop().remove()
        self._feeding.close()

    @property
    def grams(self) -> dict[str, Tensor]:
        """``name -> G (fan_in, fan_in)`` float32 (``(fan_in,)``, its diagonal, with ``diagonal=True``)."""
        return {name: acc.gram for name, acc in self.accumulators.items()}

    @property
    def counts(self) -> dict[str, int]:
        """``name -> tokens seen``."""
        return {name: acc.count for name, acc in self.accumulators.items()}


def move_batch(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor in it on ``device``: tensors, mappings (a dict comes back), lists and tuples
    (named tuples too), nested; anything else as it is. Lightning's strategies move batches with their own
    hooks; this is the mover of the plain-PyTorch path and of the activations kept between blocks."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_batch(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Calibration forward used when none is given: moves tensors to the model's device, then
    ``model(**batch)`` for a mapping (HF tokenizer output), ``model(batch[0])`` for a tuple/list (an
    ``(inputs, targets)`` pair from a DataLoader), ``model(batch)`` otherwise."""
    p = next(model.parameters(), None)
    if p is not None:
        batch = move_batch(batch, p.device)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def record_grams(model: nn.Module, targets: Mapping[str, nn.Module], batches: Iterable,
                 forward: Callable[[nn.Module, Any], Any] | None = None, *,
                 limit: int | None = None, diagonal: bool = False) -> InputGramRecorder:
    """Input Grams of every target over ``batches`` (at most ``limit``), in eval mode without grad; every
    module's training flag is restored afterwards. Returns the recorder (``grams``, ``counts``,
    ``accumulators``); a target that saw no input is a ``ValueError``. ``diagonal``: only the Grams'
    diagonals (the allocation's input norms)."""
    forward = forward or default_forward
    modes = {m: m.training for m in model.modules()}
    model.eval()
    seen = 0
    try:
        with torch.no_grad(), InputGramRecorder(model, targets, diagonal=diagonal) as rec:
            for batch in islice(batches, limit):
                forward(model, batch)
                seen += 1
    finally:
        for m, mode in modes.items():
            m.training = mode
    unseen = [n for n, c in rec.counts.items() if c == 0]
    if unseen:
        raise ValueError(f"layer(s) {unseen[:5]} saw no calibration input in {seen} batch(es) (is the calibration "
                         f"data empty, or does the forward skip them?); exclude them or fix the forward")
    return rec
