"""Putting solved layers in place: the pruned structure first, then its factors, all or nothing.

:func:`build_structure` (optional) puts the pruned modules in place holding the dense weights exactly, so
optimizers and checkpoints see the final structure before any factorization; :func:`install` fills them
(or replaces the dense layers) and describes each one; under :func:`all_or_nothing` a prune that fails or is
interrupted (Ctrl-C) leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from dsf_lightning.factorization import nnz_budget
from dsf_lightning.modules import MaskedLayer, pruned_module
from dsf_lightning.modules.attention import Exposure
from dsf_lightning.persistence.structure import PRUNE_INFO_ATTR, replace_module
from dsf_lightning.pipeline.jobs import LayerResult
from dsf_lightning.pipeline.plan import PrunePlan, target_matrix
from dsf_lightning.pipeline.report import LayerRecord

__all__ = ["Undo", "all_or_nothing", "build_structure", "install"]


@torch.no_grad()
def build_structure(model: nn.Module, plan: PrunePlan) -> PrunePlan:
    """Replace every target by its pruned module holding the dense weight exactly (full masks), in place.

    The model computes the same function until :func:`install` fills the modules; optimizers and DDP
    created in between hold the final parameters. Returns the plan with the new modules as targets.
    """
    targets = {}
    for name, layer in plan.targets.items():
        new = pruned_module(layer, plan.config.two_factor, forward_mode=plan.config.forward_mode,
                            storage=plan.config.storage)
        replace_module(model, name, new)
        targets[name] = new
    return dataclasses.replace(plan, targets=targets)


class Undo:
    """What :func:`install` changed in a model, to put back when the prune does not finish (an error, a
    ``KeyboardInterrupt``): replaced dense layers (the original modules, kept on ``store``) and pruned
    modules filled in place (their state before, copied to ``store``)."""

    def __init__(self, store: torch.device | str = "cpu") -> None:
        self.store = torch.device(store)
        self._entries: list[tuple[str, nn.Module, torch.device, dict[str, Tensor] | None]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def keep(self, name: str, layer: nn.Module) -> None:
        """Remember ``layer`` (at ``name``) as it is now, before :func:`install` changes it."""
        device = next(layer.parameters()).device
        if isinstance(layer, MaskedLayer):  # filled in place: its values change, the module stays
            saved = {k: v.detach().to(self.store, copy=True) for k, v in layer.state_dict().items()}
            self._entries.append((name, layer, device, saved))
        else:  # replaced: the module itself is the way back (install moves it to ``store`` once replaced)
            self._entries.append((name, layer, device, None))

    @torch.no_grad()
    def restore(self, model: nn.Module) -> int:
        """Put every remembered layer back as it was (newest first); returns how many."""
        for name, layer, device, saved in reversed(self._entries):
            if saved is None:
                replace_module(model, name, layer.to(device))
            else:
                layer.load_state_dict(saved)
        n = len(self._entries)
        self._entries.clear()
        return n


@contextlib.contextmanager
def all_or_nothing(model: nn.Module, store: torch.device | str = "cpu", exposure: Exposure | None = None
                   ) -> Iterator[Undo]:
    """The prune inside the block changes ``model`` completely or not at all: on any exception
    (``KeyboardInterrupt`` too) the layers :func:`install` changed are put back (:class:`Undo`), then the
    attention weights the plan exposed (``exposure``), and the exception leaves with a note saying so."""
    undo = Undo(store)
    try:
        yield undo
    except BaseException as e:
        n = undo.restore(model)
        if exposure is not None:
            exposure.undo()
        e.add_note(f"dsf-lightning: the prune did not finish ({type(e).__name__}); the model is unchanged "
                   f"({n} layer(s) put back as they were before the prune)")
        raise


@torch.no_grad()
def install(model: nn.Module, plan: PrunePlan, results: Mapping[str, LayerResult],
            undo: Undo | None = None) -> list[LayerRecord]:
    """Put every solved layer in place, in module order, and describe it: a pruned module built by
    :func:`build_structure` is filled in place (its parameters stay the same objects); a dense layer is
    replaced by a new pruned module. ``undo`` remembers each layer first (:func:`all_or_nothing`)."""
    cfg = plan.config
    records = []
    for name, layer in plan.targets.items():
        t0 = time.perf_counter()
        result = results[name]
        fact = result.factorization
        out, fan_in = target_matrix(layer).shape
        if undo is not None:
            undo.keep(name, layer)
        if isinstance(layer, MaskedLayer):
            new = layer.load_factorization_(fact)
        else:
            new = pruned_module(layer, cfg.two_factor, fact, forward_mode=cfg.forward_mode, storage=cfg.storage)
            replace_module(model, name, new)
            if undo is not None:  # out of the model now: off the accelerator until the prune is done
                layer.to(undo.store)
        if cfg.balance_norms and fact.second is not None:
            new.balance_norms_()
        density = plan.densities[name]
        setattr(new, PRUNE_INFO_ATTR, {"method": cfg.method, "density": density})
        nnz = [int(mask.sum()) for _, mask in new.masked_parameters()]
        records.append(LayerRecord(
            name=name, layer_type=plan.layer_types[name], shape=(out, fan_in), method=cfg.method,
            density=density, nnz=sum(nnz), budget=nnz_budget(density, out * fan_in), error=fact.error,
            relative_error=fact.relative_error, magnitude_relative_error=result.magnitude_relative_error,
            error_vs_magnitude=fact.error / result.magnitude_error if result.magnitude_error > 0 else math.nan,
            seconds=result.seconds + time.perf_counter() - t0, pruned_type=type(new).__name__,
            first_nnz=nnz[0], second_nnz=nnz[1] if len(nnz) > 1 else None, rank=result.rank))
    return records
