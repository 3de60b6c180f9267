"""Distillation from the dense model: the loss terms (logit KD, SquareHead, CNN features) and a frozen teacher.

>>> distiller = Distiller(dense_copy, DistillConfig("squarehead", weight=1.0, teacher_dtype="bfloat16"))
>>> distiller.attach(student)                       # forward hooks on the student's decoder blocks
>>> out = student(input_ids=ids, attention_mask=mask, labels=labels)
>>> terms = distiller(out.logits, input_ids=ids, attention_mask=mask, mask=mask)   # the teacher runs here
>>> loss = distiller.total(out.loss, terms)          # {"kd": ..., "squarehead": ...} logged one by one

The terms, over the tokens where ``mask`` is true (every position without one):

* ``logits``: ``T^2 KL(softmax(t / T) || softmax(s / T))`` per token, averaged (sparseml's
  ``DistillationModifier``); the total is ``(1 - w) CE + w KD``.
* ``squarehead`` (Kurtic et al., 2023): per decoder block ``L_l = mean((h_s - h_t)^2) / mean(h_t^2)`` of the
  block's output hidden state, summed over blocks; the total is ``CE + w sum_l L_l + w_logits KD``.
* ``features``: the same normalized MSE of a CNN's stage outputs (``layer1``, ``layer2``, ...: the top-level
  children named ``layer<k>``, or the ``layers`` given); the total is ``CE + w sum_l L_l + w_logits KD``.

The teacher is the model as it was before pruning: frozen (``requires_grad`` off, no optimizer state), in eval
mode, optionally in a lower ``teacher_dtype``. It is not a submodule of anything here, so it is never in a
student's state dict or checkpoint; whoever resumes builds it again from the dense weights. The student's
outputs are read with forward hooks that :meth:`Distiller.attach` registers on the named layers (no patching
of its forward), the teacher's likewise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dsf_lightning.dtypes import DTYPES, DTypeName, dtype_named

__all__ = ["KINDS", "DistillConfig", "Distiller", "default_layers", "distiller_for", "logit_kd", "normalized_mse"]

#: the distillation losses: none, logits (KD), squarehead (LLM hidden states), features (CNN stage outputs)
KINDS = ("none", "logits", "squarehead", "features")


@dataclass(frozen=True)
class DistillConfig:
    """What to distill (module docstring); validated on construction (``ValueError`` naming the field).

    Args:
        kind: one of :data:`KINDS`.
        weight: ``w``: the KD share for ``logits`` (in ``[0, 1]``), the layer terms' weight otherwise (``>= 0``).
        temperature: ``T > 0`` of the logit term.
        logit_weight: ``w_logits >= 0``: a logit term beside ``squarehead`` / ``features``.
        teacher_dtype: the dtype the teacher is held in (``bfloat16`` / ``float16``: half the memory and
            faster matmuls on GPUs); None keeps the dense model's.
    """

    kind: Literal["none", "logits", "squarehead", "features"] = "none"
    weight: float = 1.0
    temperature: float = 1.0
    logit_weight: float = 0.0
    teacher_dtype: DTypeName | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"distill kind must be one of {KINDS}, got {self.kind!r}")
        if not self.temperature > 0:
            raise ValueError(f"distill temperature must be > 0, got {self.temperature}")
        if not self.weight >= 0 or (self.kind == "logits" and self.weight > 1):
            valid = "[0, 1] (the KD share of the loss)" if self.kind == "logits" else ">= 0"
            raise ValueError(f"distill weight must be in {valid} for kind {self.kind!r}, got {self.weight}")
        if not self.logit_weight >= 0:
            raise ValueError(f"distill logit_weight must be >= 0, got {self.logit_weight}")
        if self.teacher_dtype is not None:
            dtype_named(self.teacher_dtype, "teacher_dtype")
        if self.logit_weight > 0 and self.kind in ("none", "logits"):
            raise ValueError(f"distill logit_weight is the logit term beside squarehead/features; kind "
                             f"{self.kind!r} {'has no teacher' if self.kind == 'none' else 'uses weight'}")


def _masked(x: Tensor, mask: Tensor | None) -> Tensor:
    """``x (*mask.shape, ...)`` at the true positions of ``mask``, as ``(n, ...)``; all of ``x`` without one."""
    return x if mask is None else x[mask.bool()]


def logit_kd(student: Tensor, teacher: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """``T^2 KL(softmax(teacher / T) || softmax(student / T))`` per position, averaged over the positions.

    Args:
        student, teacher: logits ``(..., classes)`` (the teacher's without gradients).
        mask: ``(...)`` positions to count (e.g. an attention mask), or None for all.
    """
    s, t = _masked(student, mask).float() / temperature, _masked(teacher, mask).float() / temperature
    log_s, log_t = s.log_softmax(-1), t.log_softmax(-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    return temperature ** 2 * kl.mean()


def normalized_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean((s - t)^2) / mean(t^2)`` over every element at the positions of ``mask`` (SquareHead's layer term).

    Args:
        student, teacher: ``(*positions, ...)`` outputs of one layer, e.g. ``(batch, seq, hidden)`` or ``(N, C, H, W)``.
        mask: ``positions``-shaped, e.g. ``(batch, seq)``, or None for every element.
    """
    s, t = _masked(student, mask).float(), _masked(teacher, mask).float()
    return (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(torch.finfo(torch.float32).tiny)


class _Recorder:
    """The output of each named module at its last forward (forward hooks; the first tensor of a tuple)."""

    def __init__(self, model: nn.Module, names: Sequence[str], what: str) -> None:
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"the {what} has no module {missing[0]!r} to distill from (distill layers: "
                             f"{list(names)})")
        self.outputs: dict[str, Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            self.outputs[name] = out[0] if isinstance(out, (tuple, list)) else out
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def default_layers(model: nn.Module, kind: str) -> list[str]:
    """The layers a kind compares: the decoder blocks (``squarehead``), the ``layer<k>`` stages (``features``)."""
    if kind == "squarehead":
        from dsf_lightning.pipeline.blocks import decoder_blocks

        return [n for n, _ in decoder_blocks(model)]
    if kind == "features":
        stages = [n for n, _ in model.named_children() if re.fullmatch(r"layer\d+", n)]
        if not stages:
            raise ValueError(f"{type(model).__name__} has no top-level 'layer<k>' stages to distill features from: "
                             f"pass layers=[...] (module names)")
        return stages
    return []


def distiller_for(model: nn.Module, config: DistillConfig, layers: Sequence[str] | None = None) -> Distiller | None:
    """A :class:`Distiller` whose teacher is a copy of ``model`` as it is now (the dense model, before the
    prune), or None for ``kind="none"``."""
    import copy

    return None if config.kind == "none" else Distiller(copy.deepcopy(model), config, layers)


class Distiller:
    """A frozen teacher and the distillation terms of a student against it (module docstring).

    Args:
        teacher: the dense model (taken as it is: put a copy here, it is frozen and set to eval mode).
        config: the loss (:class:`DistillConfig`; ``kind="none"`` is refused: no teacher is needed).
        layers: module names compared by ``squarehead`` / ``features`` (the same names in student and teacher);
            default :func:`default_layers`.
    """

    def __init__(self, teacher: nn.Module, config: DistillConfig, layers: Sequence[str] | None = None) -> None:
        if config.kind == "none":
            raise ValueError("distill kind 'none' needs no teacher: do not build a Distiller")
        self.config = config
        self.teacher = teacher.eval().requires_grad_(False)
        if config.teacher_dtype is not None:
            self.teacher.to(DTYPES[config.teacher_dtype])
        self.dtype = next(self.teacher.parameters()).dtype
        self.layers = list(layers) if layers is not None else default_layers(teacher, config.kind)
        if config.kind == "logits":
            self.layers = []
        self._teacher = _Recorder(self.teacher, self.layers, "teacher")
        self._student: _Recorder | None = None

    def attach(self, student: nn.Module) -> None:
        """Record the student's outputs of the compared layers (once; again after :meth:`detach`)."""
        if self._student is None:
            self._student = _Recorder(student, self.layers, "student")

    def detach(self) -> None:
        """Remove the student's hooks."""
        if self._student is not None:
            self._student.remove()
            self._student = None

    def to(self, device: torch.device | str) -> Distiller:
        """Move the teacher (its dtype kept)."""
        self.teacher.to(device)
        return self

    def _cast(self, x: Any) -> Any:
        return x.to(self.dtype) if isinstance(x, Tensor) and x.is_floating_point() else x

    def __call__(self, student_logits: Tensor, *inputs: Any, mask: Tensor | None = None,
                 **kwargs: Any) -> dict[str, Tensor]:
        """The terms of one batch: the teacher runs on ``inputs`` / ``kwargs`` (no gradients; floating inputs
        cast to its dtype) after the student ran on the same batch; ``mask``: the positions to count.

        Returns:
            ``{"kd": ...}`` when a logit term is used, and ``{kind: sum of the layer terms}`` for
            ``squarehead`` / ``features``; scalars with gradients into the student.
        """
        if self.layers and self._student is None:
            raise RuntimeError("Distiller.attach(student) must run before the student's forward")
        with torch.no_grad():
            out = self.teacher(*map(self._cast, inputs), **{k: self._cast(v) for k, v in kwargs.items()})
        teacher_logits = out.logits if hasattr(out, "logits") else out
        c, terms = self.config, {}
        if c.kind == "logits" or c.logit_weight > 0:
            terms["kd"] = logit_kd(student_logits, teacher_logits, c.temperature, mask)
        if self.layers:
            assert self._student is not None
            s, t = self._student.outputs, self._teacher.outputs
            terms[c.kind] = torch.stack([normalized_mse(s[n], t[n], mask) for n in self.layers]).sum()
        return terms

    def total(self, ce: Tensor, terms: dict[str, Tensor]) -> Tensor:
        """The training loss from the cross-entropy ``ce`` and the :meth:`__call__` terms (module docstring)."""
        c = self.config
        if c.kind == "logits":
            return (1 - c.weight) * ce + c.weight * terms["kd"]
        return ce + c.weight * terms[c.kind] + (c.logit_weight * terms["kd"] if "kd" in terms else 0.0)
