"""Layer facts (layers.py): the (out, fan_in) view, the grouped-conv rule, signatures, the Conv1D round trip."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_rel_close  # tests/ is on sys.path
from torch import nn
from transformers.pytorch_utils import Conv1D

from dsf_lightning.layers import (
    dense_signature,
    fan_in,
    grouped,
    layer_kind,
    linear_as_conv1d,
    signature,
    weight_matrix,
)
from dsf_lightning.modules import pruned_module


def test_weight_matrix_is_the_out_by_fan_in_view_of_every_kind():
    conv1d = Conv1D(6, 4)  # nf=6 outputs, nx=4 inputs: weight (4, 6)
    assert layer_kind(conv1d) == "conv1d" and weight_matrix(conv1d).shape == (6, 4)
    assert torch.equal(weight_matrix(conv1d), conv1d.weight.T)
    conv = nn.Conv2d(3, 8, 3)
    assert weight_matrix(conv).shape == (8, 27) == (8, fan_in("c", conv))
    assert layer_kind(nn.LayerNorm(4)) is None


def test_grouped_is_the_one_rule_for_depthwise_convs():
    dw = nn.Conv2d(8, 8, 3, groups=8)
    assert grouped(dw) == "groups=8 > 1 (depthwise/grouped convs are not factorized)"
    assert grouped(nn.Conv2d(8, 8, 3)) is None and grouped(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="layer 'dw': groups=8 > 1"):
        fan_in("dw", dw)


@pytest.mark.parametrize("make", [lambda: nn.Linear(12, 5), lambda: nn.Linear(12, 5, bias=False),
                                  lambda: nn.Conv2d(3, 4, (3, 1), stride=2, padding=1, padding_mode="reflect"),
                                  lambda: Conv1D(5, 12)], ids=["linear", "linear-nobias", "conv", "conv1d"])
def test_a_pruned_modules_spec_has_the_signature_of_the_layer_it_replaced(make):
    layer = make()
    pruned = pruned_module(layer, two_factor=True)
    kind = "conv2d" if isinstance(layer, nn.Conv2d) else "linear"
    assert signature(kind, pruned.spec()) == dense_signature(layer)


def test_linear_as_conv1d_computes_the_same_function():
    torch.manual_seed(0)
    lin = nn.Linear(4, 6).eval().requires_grad_(False)
    conv1d = linear_as_conv1d(lin)
    x = torch.randn(3, 4)
    assert isinstance(conv1d, Conv1D) and conv1d.weight.shape == (4, 6)
    assert torch.equal(conv1d.weight, lin.weight.T) and torch.equal(conv1d.bias, lin.bias)  # the values, exactly
    assert_rel_close(conv1d(x), lin(x), depth=4)  # one sum over 4 inputs, in either kernel's order
    assert not conv1d.training and not conv1d.weight.requires_grad
