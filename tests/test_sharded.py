"""Sharded fine-tuning (issue 29): CausalLM under Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes.

Lightning relaunches ``sys.argv`` for the other rank, which inside pytest would rerun pytest; so the test runs
this file as a script (``python tests/test_sharded.py OUT MODE``) under a hard timeout, and every rank writes
``OUT/rank<r>.pt``: its per-step training loss, its training state (bytes it holds, local shards only), and on
rank 0 its exports. ``MODE`` is ``fsdp`` (2 processes, each on half of every batch) or ``single`` (1 process,
whole batches). Each run trains 2 epochs with a ``ModelCheckpoint`` at each epoch's end (sharded: a folder with
a shard per rank and the structure spec); the ``fsdp`` run then resumes its second epoch from the first
checkpoint in a fresh dense model, with activation checkpointing on.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from numerics import network_depth, rel_bound  # tests/ is on sys.path

EPOCH = 3  # optimizer steps per epoch; every run trains 2 epochs


CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)


def _tiny_pruned_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    import dsf_lightning as dsf

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    dsf.prune(model, 0.5, "dsf", calibration=[ids], forward=lambda m, b: m(input_ids=b, use_cache=False),
              sequential=True, storage="compressed", progress=False, factorization_options={"outer_iters": 2})
    return model


def _loss(model, ids) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids, use_cache=False).loss)


def _exports(model, ids, out: str) -> dict:
    """The packed export's tensors (float32) and its masks, and the loss on ``ids`` of each export loaded back
    into a fresh dense model: the packed one (``load_packed``) and the merged one (``to_dense`` +
    ``save_pretrained``, the recipe's ``merged/``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsf_lightning.persistence.export import load_packed, pack_model, save_packed
    from dsf_lightning.persistence.structure import to_dense

    model.eval()
    path = os.path.join(out, "packed.safetensors")
    save_packed(model, path, dtype=None)
    packed = load_packed(LlamaForCausalLM(LlamaConfig(**CONFIG)), path)
    losses = {"model": _loss(model, ids), "packed": _loss(packed, ids)}
    tensors = pack_model(model, dtype=None)[0]
    to_dense(model).save_pretrained(os.path.join(out, "merged"))
    losses["merged"] = _loss(LlamaForCausalLM.from_pretrained(os.path.join(out, "merged")), ids)
    return {"tensors": tensors, "losses": losses}


def _run_script(out: str, mode: str) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsf_lightning.callbacks.memory import training_state_bytes
    from dsf_lightning.models import CausalLM
    from dsf_lightning.models.sharding import gathered
    from dsf_lightning.persistence.structure import rebuild_sharded_structure

    torch.set_num_threads(1)

    class Record(pl.Callback):
        def __init__(self):
            self.losses, self.state = [], {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses.append(float(outputs["loss"].detach()))
            if trainer.global_step == 1:  # after the first step: gradients and AdamW state exist
                self.state.update(training_state_bytes(pl_module, trainer.optimizers))

    # one global batch, repeated: Lightning resumes an epoch-end checkpoint with one more batch of that epoch
    # from a restarted loader, so only repeated batches make a resumed step see the continuous run's data
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2)).repeat(EPOCH, 1)
    fsdp = mode == "fsdp"
    # the same global batches: rank r takes rows r, r + 2, ... (2 per step), or 1 process takes 4 per step
    rank = int(os.environ.get("LOCAL_RANK", 0))
    loader = DataLoader(TensorDataset(ids[rank::2] if fsdp else ids), batch_size=2 if fsdp else 4, shuffle=False)

    def fit(model, callbacks, ckpt_path=None, checkpointing=False):
        module = CausalLM(model, lr=1e-3, lr_schedule="cosine", gradient_checkpointing=checkpointing)
        if ckpt_path is not None:  # the sharded checkpoint loads into a sharded model: its structure first
            rebuild_sharded_structure(module, ckpt_path)
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if fsdp else "auto"
        trainer = pl.Trainer(accelerator="cpu", devices=2 if fsdp else 1, strategy=strategy, max_steps=2 * EPOCH,
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, callbacks=callbacks, use_distributed_sampler=False,
                             default_root_dir=out)
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return trainer, module

    # 2 epochs of EPOCH steps, a checkpoint at the end of each (sharded: a folder, a shard file per rank)
    run = Record()
    trainer, module = fit(_tiny_pruned_llama(), [run, ModelCheckpoint(dirpath=out, filename="{epoch}",
                                                                      save_top_k=-1)])
    ckpt = os.path.join(out, "epoch=0.ckpt")
    result = {"rank": trainer.global_rank, "world": trainer.world_size, "losses": run.losses, "state": run.state,
              "saved": sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else [], "ckpt": ckpt,
              "sharded": type(next(module.parameters())).__name__}
    probe = ids[:4]
    if fsdp:  # every rank: the sharded model's logits, then gather it (a collective) and the copy's on rank 0
        module.model.eval()
        with torch.no_grad():
            sharded_logits = module.model(input_ids=probe, use_cache=False).logits
        whole = gathered(module.model)
        if whole is not None:
            with torch.no_grad():
                result["same_logits"] = torch.equal(whole(input_ids=probe, use_cache=False).logits, sharded_logits)
    else:
        whole = module.model
    if whole is not None:
        result["exports"] = _exports(whole, probe, out)
    if fsdp:  # resume the second epoch from the first one's checkpoint, in a fresh dense model, recomputing
        torch.manual_seed(3)  # the activations in the backward pass (activation checkpointing under FSDP2)
        resumed = Record()
        fit(LlamaForCausalLM(LlamaConfig(**CONFIG)), [resumed], ckpt_path=ckpt, checkpointing=True)
        result["resumed"] = resumed.losses
    torch.save(result, os.path.join(out, f"rank{trainer.global_rank}.pt"))


def _launch(tmp_path, mode: str) -> list[dict]:
    out = tmp_path / mode
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out), mode], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2 if mode == "fsdp" else 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    return _launch(tmp, "fsdp"), _launch(tmp, "single")[0]


def test_each_rank_holds_about_half_the_training_state(runs):
    (r0, r1), single = runs
    assert (r0["world"], r1["world"], r0["sharded"]) == (2, 2, "DTensor")
    for r in (r0, r1):
        # the values, their gradients and AdamW state, and the bit patterns (frozen parameters) are sharded
        assert r["state"]["total"] <= 0.55 * single["state"]["total"], (r["state"], single["state"])
        assert r["state"]["buffers"] < single["state"]["buffers"] / 10  # only the rotary frequencies are whole


def _bound() -> float:
    # every step's gradient sum, accumulated over the steps (the same bound for the losses of the exports)
    return rel_bound(torch.float32, network_depth(_tiny_pruned_llama()) * 2 * EPOCH)


def test_the_sharded_loss_curve_is_the_single_process_one(runs):
    (r0, r1), single = runs
    bound = _bound()
    assert len(r0["losses"]) == len(single["losses"]) == 2 * EPOCH
    for step, (a, b, want) in enumerate(zip(r0["losses"], r1["losses"], single["losses"], strict=True)):
        got = (a + b) / 2  # equal token counts per rank: the mean of the halves is the whole batch's loss
        assert abs(got - want) <= bound * abs(want), (step, got, want, bound)


def test_a_sharded_checkpoint_holds_a_shard_per_rank_and_the_structure_spec(runs):
    (r0, _), _ = runs
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt", ".metadata"} <= set(r0["saved"])
    meta = torch.load(r0["ckpt"] + "/meta.pt", weights_only=False)
    spec = meta["dsf_structure"]["modules"]
    assert len(spec) == 14 and {e["kwargs"]["storage"] for e in spec} == {"compressed"}


def test_a_dense_model_resumed_from_the_sharded_checkpoint_continues_the_run_exactly(runs):
    # params, AdamW moments and the schedule's step all restored: the same sums in the same order; activation
    # checkpointing (on in the resumed run) recomputes the same activations
    (r0, r1), _ = runs
    for r in (r0, r1):
        assert r["resumed"] == r["losses"][EPOCH:], (r["resumed"], r["losses"])


def test_the_model_gathered_on_rank_0_computes_what_the_sharded_one_does(runs):
    (r0, r1), _ = runs
    assert r0["same_logits"] is True
    assert "exports" not in r1  # only rank 0 holds the gathered copy


def test_the_exports_of_the_sharded_run_equal_the_unsharded_runs(runs):
    (r0, _), single = runs
    got, want = r0["exports"], single["exports"]
    assert got["tensors"].keys() == want["tensors"].keys()
    for k, v in want["tensors"].items():
        assert got["tensors"][k].shape == v.shape, k
        if not v.is_floating_point():  # the bit patterns of the masks, and integer buffers
            assert torch.equal(got["tensors"][k], v), k
    bound = _bound()
    for kind, loss in want["losses"].items():  # the values: each export, loaded back, scores as the unsharded one
        assert abs(got["losses"][kind] - loss) <= bound * abs(loss), (kind, got["losses"][kind], loss, bound)
    assert got["losses"]["packed"] == got["losses"]["model"]  # float32 packing loses nothing


def test_gathering_a_model_that_is_not_sharded_says_so():
    from torch import nn

    from dsf_lightning.models.sharding import gathered

    with pytest.raises(ValueError, match="sharded by fully_shard.*Linear"):
        gathered(nn.Linear(2, 2))


def test_a_model_without_decoder_blocks_cannot_be_sharded_and_says_why():
    from torch import nn
    from torch.distributed.device_mesh import DeviceMesh

    from dsf_lightning.models.sharding import shard_by_block

    with pytest.raises(ValueError, match="cannot shard Linear by decoder block"):
        shard_by_block(nn.Linear(2, 2), DeviceMesh.__new__(DeviceMesh))  # refused before the mesh is used


def test_a_tensor_parallel_mesh_is_refused_with_the_strategy_to_use():
    from types import SimpleNamespace

    from dsf_lightning.models.sharding import sharding_mesh

    dp = SimpleNamespace(size=lambda: 2)
    assert sharding_mesh({"data_parallel": dp, "tensor_parallel": SimpleNamespace(size=lambda: 1)}) is dp
    with pytest.raises(ValueError, match=r"tensor-parallel dimension of 2.*tensor_parallel_size=1"):
        sharding_mesh({"data_parallel": SimpleNamespace(size=lambda: 1), "tensor_parallel": dp})


def test_a_folder_without_a_structure_leaves_the_module_as_it_is(tmp_path):
    from torch import nn

    from dsf_lightning.persistence.structure import SHARDED_CHECKPOINT_META, rebuild_sharded_structure

    torch.save({"epoch": 0}, tmp_path / SHARDED_CHECKPOINT_META)  # a dense run's folder
    model = nn.Sequential(nn.Linear(4, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert rebuild_sharded_structure(model, tmp_path) is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _run_script(sys.argv[1], sys.argv[2])
