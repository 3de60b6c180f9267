"""nn.MultiheadAttention's directly read weights as layers: exposed, fed their inputs, folded back (issue 31)."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_rel_close  # tests/ is on sys.path
from torch import nn

from dsf_lightning.modules import DSFLinear
from dsf_lightning.modules.attention import expose_attention, exposed_layers, feeding, fold_attention


def _mha(kdim: int | None = None, batch_first: bool = True) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(16, 4, kdim=kdim, vdim=kdim, batch_first=batch_first)


def _qkv(kdim: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, kdim, generator=g), torch.randn(2, 7, kdim,
                                                                                                 generator=g)


@pytest.mark.parametrize("kdim", [None, 12], ids=["in_proj_weight", "q/k/v_proj_weight"])
def test_exposing_keeps_the_module_its_class_and_its_function_bit_for_bit(kdim):
    mha = _mha(kdim)
    q, k, v = _qkv(kdim or 16)
    want = mha(q, k, v)
    exposure = expose_attention(nn.Sequential(mha))
    assert isinstance(mha, nn.MultiheadAttention)
    assert [n.rpartition(".")[2] for n in exposure.layers] == ["q", "k", "v", "o"]
    got = mha(q, k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not expose_attention(nn.Sequential(mha)).layers  # already exposed: nothing more
    # no dense copy kept: the placeholders are empty
    placeholders = [*mha.parametrizations.values(), mha.out_proj.parametrizations.weight]
    assert len(placeholders) == 3 - 2 * (kdim is None) + 1 and all(p.original.numel() == 0 for p in placeholders)


def test_the_exposed_layers_are_fed_the_inputs_their_weights_multiply():
    mha = _mha(batch_first=False)
    q, k, v = (t.transpose(0, 1) for t in _qkv())  # (seq, batch, embed)
    model = nn.Sequential(mha)
    expose_attention(model)
    layers = exposed_layers(model)
    assert [role for _, role in layers.values()] == ["query", "key", "value", "attention"]
    assert list(layers)[3] == "0.out_proj.parametrizations.weight.0.o"
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0]))
             for n in layers]
    with torch.no_grad():
        mha(q, k, v)
        assert not seen  # the module's own forward reads the weights, never calls the layers
        with feeding(model):
            out = mha(q, k, v)[0]
    for h in hooks:
        h.remove()
    names = list(layers)
    for name, x in zip(names, (q, k, v), strict=False):
        assert torch.equal(seen[name], x), name
    # out_proj's input is the attention before it: applying out_proj to it gives the module's output
    assert_rel_close(mha.out_proj(seen[names[3]]), out, depth=2)


def test_folding_restores_a_plain_module_with_the_current_product():
    mha = _mha()
    q, k, v = _qkv()
    keys = list(mha.state_dict())
    expose_attention(nn.Sequential(mha))
    stacked = mha.parametrizations.in_proj_weight[0]
    torch.manual_seed(2)
    dsf = DSFLinear(16, 16, rank=16)  # a pruned layer in place of the query projection
    stacked.q = dsf
    want = torch.cat([dsf.dense_weight(), stacked.k.weight, stacked.v.weight]).detach()
    expected = mha(q, k, v)[0]
    fold_attention(nn.Sequential(mha))
    assert type(mha) is nn.MultiheadAttention and sorted(mha.state_dict()) == sorted(keys)
    assert torch.equal(mha.in_proj_weight, want) and mha.in_proj_weight.requires_grad
    assert torch.equal(mha(q, k, v)[0], expected)


def test_undoing_an_exposure_puts_back_the_very_parameters():
    mha = _mha()
    before = dict(mha.named_parameters())
    values = {n: p.detach().clone() for n, p in before.items()}
    exposure = expose_attention(nn.Sequential(mha))
    exposure.keep_only({"0.parametrizations.in_proj_weight.0.q"})  # out_proj's weight not targeted: back
    assert mha.out_proj.weight is before["out_proj.weight"]
    exposure.undo()
    assert type(mha) is nn.MultiheadAttention and type(mha.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert all(dict(mha.named_parameters())[n] is p for n, p in before.items()) and not exposure.layers
    assert all(torch.equal(p, values[n]) for n, p in mha.named_parameters())


def test_gradients_reach_the_exposed_layers():
    mha = _mha()
    expose_attention(nn.Sequential(mha))
    mha(*_qkv())[0].square().sum().backward()
    stacked = mha.parametrizations.in_proj_weight[0]
    assert all(getattr(stacked, n).weight.grad is not None for n in "qkv")
    assert mha.out_proj.parametrizations.weight[0].o.weight.grad is not None
    assert mha.parametrizations.in_proj_weight.original.grad is None


# ------------------------------------------------------------------------------------------------
# pruning nn.MultiheadAttention end to end: torchvision's ViT
# ------------------------------------------------------------------------------------------------
def _vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128,
                             num_classes=10)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_a_vit_at_0_3_prunes_its_attention_and_its_mlp_and_runs_as_before():
    import dsf_lightning as dsf

    model, x = _vit().eval(), _images(4, 1)
    shape = model(x).shape
    report = dsf.prune(model, 0.3, "dsf", calibration=[_images(8, 2), _images(8, 3)], progress=False,
                       factorization_options={"outer_iters": 2})
    roles = {n.rpartition(".")[2] for n in (r.name for r in report.layers)}
    assert {"q", "k", "v", "o", "0", "3"} == roles and len(report.layers) == 2 * 6  # attention + MLP, 2 blocks
    assert abs(report.nnz / report.dense_numel - 0.3) <= 0.01 * 0.3
    assert not any("in_proj" in n or "out_proj" in n for n in report.skipped)
    assert model(x).shape == shape
    mha = model.encoder.layers[0].self_attention  # code reading the weights directly still works
    stacked = mha.parametrizations.in_proj_weight[0]
    want = torch.cat([getattr(stacked, n).dense_weight() for n in "qkv"])
    assert mha.in_proj_weight.shape == (192, 64) and torch.equal(mha.in_proj_weight, want)
    assert torch.equal(mha.out_proj.weight, mha.out_proj.parametrizations.weight[0].o.dense_weight())
    # DSF against magnitude on the attention, layer by layer (the Grams are the layers' own inputs)
    attention = [r for r in report.layers if r.name.rpartition(".")[2] in "qkvo"]
    assert all(r.error_vs_magnitude < 1 for r in attention), [(r.name, r.error_vs_magnitude) for r in attention]


def _module():
    import lightning.pytorch as pl

    class ViTModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _vit()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return ViTModule()


def _fit(module, callback, epochs: int, root, ckpt_path=None, checkpoint_dir=None):
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(4))
    loader = DataLoader(TensorDataset(_images(16, 5), y), batch_size=8, shuffle=False)
    extra = [ModelCheckpoint(dirpath=checkpoint_dir, save_last=True)] if checkpoint_dir else []
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=bool(extra), default_root_dir=root,
                         callbacks=[callback, *extra], deterministic=True)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module


@pytest.mark.parametrize("storage", ["masked", "compressed"])
def test_a_pruned_vit_fine_tunes_with_exact_masks_and_resumes_from_its_checkpoint(tmp_path, storage):
    from dsf_lightning import DSFPruneCallback
    from dsf_lightning.persistence.structure import nonzeros_outside_masks, pruned_modules

    kw = dict(density=0.3, method="dsf", storage=storage, progress=False, factorization_options={"outer_iters": 2})
    full = _fit(_module(), DSFPruneCallback(**kw), 2, tmp_path / "a")
    assert nonzeros_outside_masks(full) == 0 and len(pruned_modules(full)) == 12
    _fit(_module(), DSFPruneCallback(**kw), 1, tmp_path / "b", checkpoint_dir=tmp_path / "ckpt")
    callback = DSFPruneCallback(**kw)
    resumed = _fit(_module(), callback, 2, tmp_path / "c", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert callback.resumed and callback.factorization_runs == 0  # the structure came from the checkpoint
    want, got = full.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_pruned_vit_saves_loads_packs_and_merges_into_a_fresh_plain_one(tmp_path):
    import dsf_lightning as dsf
    from dsf_lightning.persistence.export import load_packed, merged_state_dict, save_packed
    from dsf_lightning.persistence.structure import load_pruned, save_pruned, to_dense

    model, x = _vit().eval(), _images(4, 1)
    dsf.prune(model, 0.3, "dsf", calibration=[_images(8, 2)], progress=False,
              factorization_options={"outer_iters": 2})
    with torch.no_grad():
        want = model(x)
    save_pruned(model, tmp_path / "pruned.pt")  # the spec names the exposed layers: a fresh model exposes them
    loaded = load_pruned(_vit().eval(), tmp_path / "pruned.pt")
    save_packed(model, tmp_path / "packed.safetensors", dtype=None)
    packed = load_packed(_vit().eval(), tmp_path / "packed.safetensors")
    plain = _vit().eval()
    plain.load_state_dict(merged_state_dict(model), strict=True)  # in_proj_weight under its own key
    with torch.no_grad():
        assert torch.equal(loaded(x), want) and torch.equal(packed(x), want)
        assert_rel_close(plain(x), want, depth=2 * 4 + 2)  # the products, formed once more
    to_dense(model)  # plain modules again, their weights the products
    mha = model.encoder.layers[0].self_attention
    assert type(mha) is nn.MultiheadAttention and sorted(dict(mha.named_parameters())) == [
        "in_proj_bias", "in_proj_weight", "out_proj.bias", "out_proj.weight"]
    with torch.no_grad():
        assert_rel_close(model(x), want, depth=2 * 4 + 2)


def test_attention_with_other_key_and_value_dims_is_pruned_from_its_own_inputs():
    import dsf_lightning as dsf

    model = nn.Sequential(_mha(kdim=12))
    batches = [_qkv(12), tuple(t + 1 for t in _qkv(12))]
    report = dsf.prune(model, 0.5, "dsf", calibration=batches, forward=lambda m, b: m[0](*b), progress=False,
                       factorization_options={"outer_iters": 2})
    shapes = {r.name.rpartition(".")[2]: r.shape for r in report.layers}
    assert shapes == {"q": (16, 16), "k": (16, 12), "v": (16, 12), "o": (16, 16)}
    assert report.calibration_tokens and set(report.calibration_tokens.values()) == {2 * 2 * 5, 2 * 2 * 7}
    q, k, v = _qkv(12)
    assert model[0](q, k, v)[0].shape == q.shape
