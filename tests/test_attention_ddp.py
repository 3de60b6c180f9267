"""A ViT's nn.MultiheadAttention pruned by DSFPruneCallback and fine-tuned under DDP on 2 CPU processes (gloo).

Lightning's ``ddp`` strategy relaunches ``sys.argv`` for the other rank, so the test runs this file as a script
(``python tests/test_attention_ddp.py OUT``) under a hard timeout; every rank writes ``OUT/rank<r>.pt``: the
exposed attention layers' factors after pruning and after training, and the count of nonzeros outside masks.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def _run_script(out: str) -> None:
    import lightning.pytorch as pl
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision.models import VisionTransformer

    from dsf_lightning import DSFPruneCallback
    from dsf_lightning.persistence.structure import nonzeros_outside_masks, pruned_modules

    torch.set_num_threads(1)

    class ViTModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64,
                                           mlp_dim=128, num_classes=10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def attention(module) -> dict[str, torch.Tensor]:
        return {n: t.detach().clone() for name, m in pruned_modules(module) if ".parametrizations." in name
                for n, t in m.state_dict(prefix=f"{name}.").items()}

    class Record(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.pruned = attention(pl_module)

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    record = Record()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[DSFPruneCallback(0.3, storage="masked", progress=False,
                                                     factorization_options={"outer_iters": 2}), record])
    module = ViTModule()
    trainer.fit(module, DataLoader(data, batch_size=4))
    torch.save({"pruned": record.pruned, "trained": attention(module), "outside": nonzeros_outside_masks(module),
                "layers": len(pruned_modules(module))}, os.path.join(out, f"rank{trainer.global_rank}.pt"))


def test_attention_pruned_and_fine_tuned_under_ddp_stays_the_same_on_every_rank(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert r0["layers"] == 12 and len(r0["pruned"]) == 8 * 4  # q, k, v, o of 2 blocks: 2 factors + 2 masks each
    for key in ("pruned", "trained"):  # the factors broadcast after the prune, the gradients all-reduced after
        assert r0[key].keys() == r1[key].keys()
        assert all(torch.equal(r0[key][k], r1[key][k]) for k in r0[key]), key
    assert any(not torch.equal(r0["pruned"][k], r0["trained"][k]) for k in r0["pruned"])  # it trained
    assert r0["outside"] == r1["outside"] == 0


if __name__ == "__main__":
    _run_script(sys.argv[1])
