"""Every weight matrix of models nobody here wrote is pruned, or reported with the reason it was left dense."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dsf_lightning as dsf
from dsf_lightning.persistence.structure import pruned_modules


def _torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=10)


def _timm_vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             embed_dim=64, num_heads=4, num_classes=10)


def _torch_transformer() -> nn.Module:
    return nn.Transformer(d_model=32, nhead=4, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=64,
                          batch_first=True)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64))


def _lightning_transformer() -> nn.Module:
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=128, ninp=32, nhead=4, nhid=64, nlayers=2)


MODELS = {"torchvision ViT": _torchvision_vit, "timm ViT": _timm_vit, "nn.Transformer": _torch_transformer,
          "GPT-2": _gpt2, "LightningTransformer": _lightning_transformer}


def _weights(model: nn.Module) -> dict[str, tuple[str, str, int, int]]:
    """``name -> (owner, leaf, stored entries, elements)`` of every weight of 2+ dims: a pruned module as its
    product with its nonzeros, a dense weight with all its entries (a dense tensor stores its zeros too)."""
    out, pruned = {}, dict(pruned_modules(model))
    for name, m in pruned.items():
        out[f"{name}.weight"] = (name, "weight", m.nnz, m.out_dim * m.fan_in)
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if p.dim() >= 2 and owner not in pruned:
            out[name] = (owner, leaf, p.numel(), p.numel())
    return out


@pytest.mark.parametrize("build", MODELS.values(), ids=MODELS.keys())
def test_every_weight_matrix_is_pruned_or_reported_with_a_reason(build):
    torch.manual_seed(0)
    model = build()
    report = dsf.prune(model, 0.3, "magnitude", progress=False)
    pruned = {n for n, _ in pruned_modules(model)}
    assert pruned == {r.name for r in report.layers} and pruned
    weights = _weights(model)
    for name, (owner, _, _, _) in weights.items():
        assert owner in pruned or owner in report.skipped or name in report.skipped, name
    assert all(isinstance(r, str) and r for r in report.skipped.values())
    # the model-level density counts every weight: the pruned ones by their nonzeros, the others whole
    nnz = sum(w[2] for w in weights.values())
    numel = sum(w[3] for w in weights.values())
    assert report.outside_numel + report.dense_numel == numel
    assert report.totals()["model_density"] == nnz / numel
    assert report.model_density > report.nnz / report.dense_numel  # the dense weights lift it above the target


def test_attention_left_out_is_put_back_and_named_with_why():
    model = _torchvision_vit()
    report = dsf.prune(model, 0.3, "magnitude", exclude=["*self_attention*"], progress=False)
    attention = model.encoder.layers[0].self_attention
    assert type(attention) is nn.MultiheadAttention and type(attention.out_proj) is not nn.Linear  # not exposed
    in_proj = [n for n in report.skipped if n.endswith("self_attention.in_proj_weight")]
    assert len(in_proj) == 2 and "read directly by nn.MultiheadAttention" in report.skipped[in_proj[0]]
    assert "excluded by pattern" in report.skipped["encoder.layers.encoder_layer_0.self_attention.out_proj"]
    assert "encoder.pos_embedding" in report.skipped and "class_token" in report.skipped


def test_the_callback_says_how_dense_the_whole_model_stays(caplog):
    import lightning.pytorch as pl
    from lightning.pytorch.demos import LightningTransformer
    from torch.utils.data import DataLoader

    class Offline(LightningTransformer):
        def prepare_data(self) -> None:  # the demo downloads WikiText-2 here; its batches are built below
            pass

    torch.manual_seed(0)
    module = Offline(vocab_size=128)
    ids = torch.randint(0, 128, (2, 2, 16), generator=torch.Generator().manual_seed(1))
    loader = DataLoader([(x, x) for x in ids], batch_size=None)
    callback = dsf.DSFPruneCallback(density=0.3, method="magnitude", progress=False)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    with caplog.at_level("INFO"):
        trainer.fit(module, loader)
    line = next(r.getMessage() for r in caplog.records if "DSFPruneCallback: pruned" in r.getMessage())
    report = callback.report
    assert f"density over all weight matrices {report.model_density:.3f}, {len(report.skipped)} left dense" in line
    assert any(n.endswith("self_attn.parametrizations.in_proj_weight.0.q") for n in callback._plan.targets)
    assert report.skipped and all(report.skipped.values())
