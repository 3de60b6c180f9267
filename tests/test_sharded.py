"""Sharded fine-tuning (issue 29): CausalLM under Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes.

Lightning relaunches ``sys.argv`` for the other rank, which inside pytest would rerun pytest; so the test runs
this file as a script (``python tests/test_sharded.py OUT MODE``) under a hard timeout, and every rank writes
``OUT/rank<r>.pt``: its per-step training loss and its training state (bytes it holds, local shards only).
``MODE`` is ``fsdp`` (2 processes, each on half of every batch) or ``single`` (1 process, whole batches); each
run ends with ``trainer.save_checkpoint`` (sharded: a folder with a shard per rank and the structure spec).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from numerics import network_depth, rel_bound  # tests/ is on sys.path

STEPS = 3


def _tiny_pruned_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    import dsf_lightning as dsf

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))
    dsf.prune(model, 0.5, "dsf", calibration=[ids], forward=lambda m, b: m(input_ids=b, use_cache=False),
              sequential=True, storage="compressed", progress=False, factorization_options={"outer_iters": 2})
    return model


def _run_script(out: str, mode: str) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from dsf_lightning.callbacks.memory import training_state_bytes
    from dsf_lightning.models import CausalLM

    torch.set_num_threads(1)
    losses: list[float] = []
    state: dict = {}

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"].detach()))
            if batch_idx == 0:  # after the first step: gradients and AdamW state exist
                state.update(training_state_bytes(pl_module, trainer.optimizers))

    model = _tiny_pruned_llama()  # every rank prunes the same model, before any wrapping
    ids = torch.randint(0, 128, (4 * STEPS, 16), generator=torch.Generator().manual_seed(2))
    fsdp = mode == "fsdp"
    # the same global batches: rank r takes rows r, r + 2, ... (2 per step), or 1 process takes 4 per step
    rank = int(os.environ.get("LOCAL_RANK", 0))
    loader = DataLoader(TensorDataset(ids[rank::2] if fsdp else ids), batch_size=2 if fsdp else 4, shuffle=False)
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if fsdp else "auto"
    trainer = pl.Trainer(accelerator="cpu", devices=2 if fsdp else 1, strategy=strategy, max_steps=STEPS,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[Record()],
                         use_distributed_sampler=False)
    trainer.fit(CausalLM(model, lr=1e-3, lr_schedule="constant"), loader)
    ckpt = os.path.join(out, "last.ckpt")
    trainer.save_checkpoint(ckpt)  # sharded: a folder, one shard file per rank + meta.pt on rank 0
    saved = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else [os.path.basename(ckpt)]
    torch.save({"rank": trainer.global_rank, "world": trainer.world_size, "losses": losses, "state": state,
                "saved": saved, "ckpt": ckpt,
                "sharded": type(next(trainer.lightning_module.parameters())).__name__},
               os.path.join(out, f"rank{trainer.global_rank}.pt"))


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
        # the values, their gradients and AdamW state are sharded; the bit patterns are replicated buffers
        sharded = r["state"]["total"] - r["state"]["buffers"]
        assert sharded <= 0.55 * (single["state"]["total"] - single["state"]["buffers"]), (r["state"], single)
        assert r["state"]["buffers"] == single["state"]["buffers"]


def test_the_sharded_loss_curve_is_the_single_process_one(runs):
    (r0, r1), single = runs
    depth = network_depth(_tiny_pruned_llama())
    bound = rel_bound(torch.float32, depth * STEPS)  # every step's gradient sum, accumulated over the steps
    assert len(r0["losses"]) == len(single["losses"]) == STEPS
    for step, (a, b, want) in enumerate(zip(r0["losses"], r1["losses"], single["losses"], strict=True)):
        got = (a + b) / 2  # equal token counts per rank: the mean of the halves is the whole batch's loss
        assert abs(got - want) <= bound * abs(want), (step, got, want, bound)


def test_a_sharded_checkpoint_holds_a_shard_per_rank_and_the_structure_spec(runs):
    (r0, _), _ = runs
    assert {"__0_0.distcp", "__1_0.distcp", "meta.pt", ".metadata"} <= set(r0["saved"])
    meta = torch.load(r0["ckpt"] + "/meta.pt", weights_only=False)
    spec = meta["dsf_structure"]["modules"]
    assert len(spec) == 14 and {e["kwargs"]["storage"] for e in spec} == {"compressed"}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    _run_script(sys.argv[1], sys.argv[2])
