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
    exposure = expose_attention(nn.Sequential(mha))
    exposure.keep_only({"0.parametrizations.in_proj_weight.0.q"})  # out_proj's weight not targeted: back
    assert mha.out_proj.weight is before["out_proj.weight"]
    exposure.undo()
    assert type(mha) is nn.MultiheadAttention and type(mha.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert all(dict(mha.named_parameters())[n] is p for n, p in before.items()) and not exposure.layers


def test_gradients_reach_the_exposed_layers():
    mha = _mha()
    expose_attention(nn.Sequential(mha))
    mha(*_qkv())[0].square().sum().backward()
    stacked = mha.parametrizations.in_proj_weight[0]
    assert all(getattr(stacked, n).weight.grad is not None for n in "qkv")
    assert mha.out_proj.parametrizations.weight[0].o.weight.grad is not None
    assert mha.parametrizations.in_proj_weight.original.grad is None
