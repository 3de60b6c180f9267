"""FSDP2 sharding of a (pruned) causal LM by decoder block, and gathering it back whole on rank 0.

>>> shard_by_block(model, mesh)        # in CausalLM.configure_model, under ModelParallelStrategy
>>> trainer.fit(...)
>>> whole = gathered(model)            # every rank calls it; rank 0 gets a plain copy on the CPU, others None
>>> export_pruned(whole, tokenizer, out) if whole is not None else None

The units of sharding are the decoder blocks (the model's ``_no_split_modules``,
:func:`~dsf_lightning.pipeline.blocks.decoder_blocks`), then the root for what is left (embeddings, final
norm, head). A compressed factor's 1-D values are parameters and get sharded. Its uint8 bit patterns are
buffers, which FSDP2 does not manage, so before sharding they become frozen parameters
(:meth:`~dsf_lightning.modules.base.MaskedLayer.patterns_to_parameters_`) and are sharded too: each rank
keeps 1/N of them, and they are all-gathered with the values for each block's forward and backward.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from dsf_lightning.persistence.structure import apply_structure_spec, pruned_modules, structure_spec
from dsf_lightning.pipeline.blocks import decoder_blocks

__all__ = ["gathered", "is_fully_sharded", "shard_by_block", "sharding_mesh"]


def is_fully_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model``."""
    return isinstance(model, FSDPModule)


def shard_by_block(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """``fully_shard`` every decoder block, then the root, over the 1-D ``mesh``; in place, returns ``model``.
    ``ValueError`` before anything is sharded for a model without decoder blocks."""
    try:
        blocks = decoder_blocks(model)
    except ValueError as e:
        raise ValueError(f"cannot shard {type(model).__name__} by decoder block (its _no_split_modules name the "
                         f"blocks): {e}") from e
    for _, m in pruned_modules(model):
        m.patterns_to_parameters_()  # sharded like the values, instead of whole on every rank
    for _, block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharding_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The data-parallel dimension of ``ModelParallelStrategy``'s 2-D mesh, to shard over. ``ValueError`` when
    its tensor-parallel dimension is larger than 1 (the strategy's default puts every device of a node there):
    nothing here splits tensors, and the ranks of a tensor-parallel group would train on the same batches."""
    tp = mesh["tensor_parallel"].size()
    if tp > 1:
        raise ValueError(f"CausalLM shards by decoder block over the data-parallel dimension only, and the mesh has "
                         f"a tensor-parallel dimension of {tp}: use ModelParallelStrategy(data_parallel_size="
                         f"<processes>, tensor_parallel_size=1)")
    return mesh["data_parallel"]


def _unsharded_class(model: nn.Module) -> type[nn.Module]:
    """The class ``fully_shard`` derived ``type(model)`` from (``FSDPLlamaForCausalLM`` -> ``LlamaForCausalLM``)."""
    return next(c for c in type(model).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))


def gathered(model: nn.Module) -> nn.Module | None:
    """A plain (unsharded) copy of the sharded Hugging Face ``model`` on rank 0's CPU, ``None`` on other ranks.

    A collective: every rank must call it. The full state dict is gathered to rank 0's CPU
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``); rank 0 builds the model's class from
    its config (on the meta device, then allocated on the CPU uninitialized), rebuilds the pruned structure
    (:func:`structure_spec`), loads the gathered tensors, and copies the buffers that no state dict holds
    (non-persistent ones such as rotary frequencies, whole on every rank). The copy computes what the
    sharded model does, bit for bit, and goes through every export (``save_packed``, ``to_dense``,
    ``save_pretrained``) as an unsharded model does.
    """
    if not is_fully_sharded(model):
        raise ValueError(f"gathered() takes a model sharded by fully_shard, got a plain {type(model).__name__}")
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    with torch.device("meta"):  # no initialization of weights that are overwritten next
        whole = _unsharded_class(model)(copy.deepcopy(model.config))
    whole.to_empty(device="cpu")
    if pruned_modules(model):
        apply_structure_spec(whole, structure_spec(model))
    whole.load_state_dict(full, strict=True)
    persistent = set(whole.state_dict())
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name not in persistent:  # to_empty left it uninitialized; it is whole on every rank
                whole.get_buffer(name).copy_(buf)
    return whole.train(model.training)
