"""The block-by-block runner: decoder block ``i`` is calibrated on the outputs of the pruned blocks ``0..i-1``.

As SparseGPT, Wanda and the paper run it: the inputs of the first decoder block are captured for all
calibration batches (the model's forward stops there), then for every block in order

1. the input Grams of its target layers are recorded by running the block on the current inputs (one
   Gram per distinct input: ``q/k/v_proj`` read the same tensor, so do ``gate/up_proj``);
2. its layers are factorized (an executor may split them across ranks) and filled in or swapped in;
3. the *pruned* block is run on the same inputs; its outputs are the next block's inputs.

Only one block's Grams are alive at a time; the calibration activations live on ``store`` (the CPU by
default) and each block runs on ``device`` (default: where its parameters are). Decoder blocks are the
modules whose class is in the model's ``_no_split_modules`` (Hugging Face), else the items of the
outermost repeated block stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dsf_lightning.pipeline.calibration import InputGramRecorder, Reduce, move_batch, no_reduce, record_grams
from dsf_lightning.pipeline.install import Undo, install
from dsf_lightning.pipeline.jobs import Executor
from dsf_lightning.pipeline.plan import PrunePlan, allocate_densities, layer_jobs
from dsf_lightning.pipeline.report import LayerRecord, PruneReport
from dsf_lightning.pipeline.targets import block_stacks

__all__ = ["BlockRun", "allocate_before_blocks", "decoder_blocks", "run_blocks"]

Batch = tuple[tuple[Any, ...], dict[str, Any]]


class _Captured(Exception):
    """Raised by the first block's pre-hook: the rest of the model's forward is not needed."""


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of the model's decoder blocks in order: modules whose class is named in
    ``model._no_split_modules`` (Hugging Face), else the items of the outermost repeated stack."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ in classes]
    if not blocks:
        for stack in block_stacks(model)[:1]:
            blocks = [(f"{stack}.{i}" if stack else str(i), m) for i, m in enumerate(model.get_submodule(stack))]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no decoder blocks to prune sequentially (no "
                         f"_no_split_modules and no repeated stack of blocks)")
    return blocks


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    return [t for v in obj for t in _tensors(v)] if isinstance(obj, (list, tuple)) else []


class BlockRun:
    """The inputs of the current block for every calibration batch, and how to run a block on them.

    Args:
        store: where the activations are kept between blocks (``"cpu"`` frees the accelerator).
        device: where each block runs (``None``: where its parameters are).
    """

    def __init__(self, store: torch.device | str | None = "cpu", device: torch.device | str | None = None) -> None:
        self.store, self.device = store, device
        self.inputs: list[Batch] = []
        self.peak_bytes = 0  # the pipeline's largest working set: activations + Grams + factor jobs

    def note(self, *held: Any) -> None:
        """Account the activations and the tensors in ``held`` (each storage once) for :attr:`peak_bytes`."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors([self.inputs, held])}
        self.peak_bytes = max(self.peak_bytes, sum(storages.values()))

    def capture(self, model: nn.Module, first_block: nn.Module, batches: Iterable,
                forward: Callable[[nn.Module, Any], Any]) -> None:
        """The first block's ``(args, kwargs)`` for every batch (the forward stops at that block)."""
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs.append(self._keep((args, kwargs)))
            raise _Captured

        handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    try:
                        forward(model, batch)
                    except _Captured:
                        pass
        finally:
            handle.remove()
        if not self.inputs:
            raise ValueError("the calibration data reached the first decoder block with no batch: is it empty?")
        self.note()

    def _keep(self, batch: Batch) -> Batch:
        args, kwargs = batch
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        return move_batch((tuple(args), kwargs), self.store) if self.store is not None else (args, kwargs)

    def run(self, block: nn.Module, keep_outputs: bool) -> None:
        """Run ``block`` on every stored input (no grad); with ``keep_outputs`` they become the next inputs."""
        device = self.device if self.device is not None else next(block.parameters()).device
        outputs = []
        with torch.no_grad():
            for args, kwargs in self.inputs:
                args, kwargs = move_batch((args, kwargs), device)
                out = block(*args, **kwargs)
                if keep_outputs:
                    hidden = out[0] if isinstance(out, (tuple, list)) else out
                    args, kwargs = ((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden})
                    outputs.append(self._keep((args, kwargs)))
        if keep_outputs:
            self.inputs = outputs
            self.note()


def _shared_inputs(block: nn.Module, run: BlockRun, targets: Mapping[str, nn.Module]) -> dict[str, str]:
    """``name -> representative``: targets fed the very same tensor object (q/k/v, gate/up) share one Gram."""
    seen: dict[str, Tensor] = {}  # holding the inputs keeps their memory from being reused by later ones

    def spy(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen[name] = args[0] if args else next(iter(kwargs.values()))
        return hook

    handles = [m.register_forward_pre_hook(spy(n), with_kwargs=True) for n, m in targets.items()]
    first = BlockRun(store=None, device=run.device)
    first.inputs = run.inputs[:1]
    try:
        first.run(block, keep_outputs=False)
    finally:
        for h in handles:
            h.remove()
    rep: dict[int, str] = {}
    return {n: rep.setdefault(id(seen[n]), n) for n in targets}


def allocate_before_blocks(model: nn.Module, plan: PrunePlan, batches: list, forward: Callable[[nn.Module, Any], Any],
                           reduce: Reduce = no_reduce) -> PrunePlan:
    """``plan`` with its densities spread by ``config.allocation`` before block 0 is touched: the scores take the
    dense model's input norms (one forward over ``batches`` recording only the Grams' diagonals, merged over
    processes by ``reduce``), as OWL computes its outlier ratios on the dense model."""
    rec = record_grams(model, plan.targets, batches, forward, diagonal=True)
    accs = reduce(rec.accumulators, next(model.parameters()).device)
    return allocate_densities(plan, {n: a.gram for n, a in accs.items()})


def run_blocks(model: nn.Module, plan: PrunePlan, batches: Iterable, *, forward: Callable[[nn.Module, Any], Any],
               executor: Executor, reduce: Reduce = no_reduce, undo: Undo | None = None, progress: bool = True,
               store: torch.device | str | None = "cpu", device: torch.device | str | None = None) -> PruneReport:
    """Prune ``plan``'s targets block by block (module docstring), in place; the report's
    ``working_set_bytes`` is the peak of the pipeline's working set (activations, one block's Grams, its jobs).

    Under ``torch.distributed`` each rank passes its own shard of ``batches``; ``reduce`` merges each block's
    Grams and ``executor`` (e.g. :func:`~dsf_lightning.pipeline.distributed.distributed_executor`) splits its
    layers across ranks. ``undo`` remembers every layer before it changes
    (:func:`~dsf_lightning.pipeline.install.all_or_nothing`: a prune interrupted at block ``i`` puts blocks
    ``0..i-1`` back).
    """
    blocks = decoder_blocks(model)
    owned = {b: [t for t in plan.targets if t.startswith(b + ".")] for b, _ in blocks}
    outside = sorted(set(plan.targets) - {t for ts in owned.values() for t in ts})
    if outside:
        raise ValueError(f"sequential pruning prunes decoder blocks only; target(s) {outside[:5]} are outside "
                         f"the blocks {blocks[0][0]!r}..{blocks[-1][0]!r}: exclude them")
    if plan.config.allocation != "uniform":
        batches = list(batches)
        plan = allocate_before_blocks(model, plan, batches, forward, reduce)
    run = BlockRun(store, device)
    run.capture(model, blocks[0][1], batches, forward)
    report = plan.new_report()
    records: list[LayerRecord] = report.layers
    last = max(i for i, (b, _) in enumerate(blocks) if owned[b])
    bar = tqdm(blocks[: last + 1], desc=f"prune {plan.config.method} by block", unit="block", disable=not progress)
    for name, block in bar:
        targets = {t: plan.targets[t] for t in owned[name]}
        if targets:
            bar.set_postfix_str(name, refresh=False)
            shared = _shared_inputs(block, run, targets)
            reps = {t: m for t, m in targets.items() if shared[t] == t}
            with InputGramRecorder(model, reps) as rec:
                run.run(block, keep_outputs=False)
            accs = reduce(rec.accumulators, next(block.parameters()).device)
            grams = {t: accs[shared[t]].gram for t in targets}
            report.calibration_tokens.update({t: accs[shared[t]].count for t in targets})
            sub = dataclasses.replace(plan, targets=targets)
            jobs = layer_jobs(sub, grams)
            run.note(grams, [(j.weight, j.gram) for j in jobs])
            results = executor(jobs)
            del jobs, grams, accs, rec
            records += install(model, sub, results, undo)
        run.run(block, keep_outputs=True)
    bar.close()
    report.working_set_bytes = run.peak_bytes
    return report
