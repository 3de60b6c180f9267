"""Masked pruned modules: exact function, exact sparsity under fine-tuning, round trips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_rel_close
from torch import nn

from dsf_lightning import double_sparse_factorize
from dsf_lightning.factorization import magnitude_prune
from dsf_lightning.modules import (
    PRUNED_MODULE_TYPES,
    DSFConv2d,
    DSFLinear,
    SparseConv2d,
    SparseLinear,
    choose_forward_path,
    is_pruned_module,
    pruned_module_from_factorization,
)

f64 = torch.float64


def dsf(layer: nn.Module, density: float = 0.3):
    w = layer.weight if isinstance(layer, (nn.Linear, nn.Conv2d)) else layer.weight.T
    return double_sparse_factorize(w.detach().flatten(1), density, outer_iters=3)


def both_paths(m, x):
    outs = {}
    for mode in ("fused", "two_step", "auto"):
        m.forward_mode = mode
        outs[mode] = m(x)
    m.forward_mode = "auto"
    return outs


# ---------------------------------------------------------------- exact function


@pytest.mark.parametrize("out,in_", [(12, 20), (30, 10)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_paths_match_dense_product(out, in_, bias):
    torch.manual_seed(0)
    layer = nn.Linear(in_, out, bias=bias, dtype=f64)
    fact = dsf(layer)
    m = DSFLinear.from_factorization(layer, fact)
    assert m.rank == min(out, in_) and m.first.dtype == f64
    x = torch.randn(4, 3, in_, dtype=f64)
    ref = F.linear(x, fact.product, layer.bias)
    for y in both_paths(m, x).values():
        assert_rel_close(y, ref, depth=in_ + m.rank)  # x F^T S^T vs x (S F)^T: a rank sum and an in sum
    dense = m.to_dense()
    assert type(dense) is nn.Linear and dense.weight.dtype == f64
    assert_rel_close(dense(x), ref, depth=in_ + m.rank)
    assert_rel_close(m.merged_weight(), fact.product, depth=m.rank)  # S F, one rank sum each


CONV_CASES = [  # (in, out, kernel, stride, padding, dilation, padding_mode)
    (6, 8, (3, 2), 2, 1, 2, "zeros"),       # out < fan_in = 36
    (2, 16, (3, 2), 2, 1, 2, "zeros"),      # out > fan_in = 12
    (6, 8, (3, 2), 2, 1, 2, "reflect"),
    (2, 16, (2, 3), 1, (1, 2), 1, "reflect"),
    (3, 5, 3, 1, "same", 2, "circular"),
    (3, 5, (2, 4), 1, "same", 1, "zeros"),  # even kernel: asymmetric 'same' padding
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_paths_match_dense_product(case, bias):
    in_, out, k, s, p, d, mode = case
    torch.manual_seed(1)
    conv = nn.Conv2d(in_, out, k, stride=s, padding=p, dilation=d, padding_mode=mode, bias=bias, dtype=f64)
    fact = dsf(conv)
    m = DSFConv2d.from_factorization(conv, fact)
    assert m.first.shape == (min(out, conv.weight[0].numel()), in_, *conv.kernel_size)
    assert m.second.shape == (out, m.rank, 1, 1)
    ref_conv = nn.Conv2d(in_, out, k, stride=s, padding=p, dilation=d, padding_mode=mode, bias=bias, dtype=f64)
    with torch.no_grad():
        ref_conv.weight.copy_(fact.product.view_as(conv.weight))
        if bias:
            ref_conv.bias.copy_(conv.bias)
    x = torch.randn(2, in_, 11, 9, dtype=f64)
    ref = ref_conv(x)
    depth = conv.weight[0].numel() + m.rank  # a patch sum over fan_in, then a rank sum
    for y in both_paths(m, x).values():
        assert_rel_close(y, ref, depth=depth)
    assert_rel_close(m.to_dense()(x), ref, depth=depth)
    assert_rel_close(m(x[0]), ref[0], depth=depth)  # unbatched input


def test_conv_from_factorization_reproduces_functional_conv():
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2))
    fact = dsf(conv, 0.4)
    m = DSFConv2d.from_factorization(conv, fact)
    x = torch.randn(3, 4, 10, 12)
    ref = F.conv2d(x, fact.product.view_as(conv.weight), conv.bias, conv.stride, conv.padding, conv.dilation)
    assert_rel_close(m(x), ref, depth=conv.weight[0].numel() + m.rank)  # float32, fan_in then rank sums


def test_hf_conv1d_path():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(3)
    layer = Conv1D(nf=10, nx=16).double()  # weight (in=16, out=10)
    nn.init.normal_(layer.bias)
    fact = dsf(layer)
    assert fact.product.shape == (10, 16)
    x = torch.randn(2, 5, 16, dtype=f64)
    ref = x @ fact.product.T + layer.bias
    m = DSFLinear.from_factorization(layer, fact)
    assert (m.in_features, m.out_features) == (16, 10)
    for y in both_paths(m, x).values():
        assert_rel_close(y, ref, depth=16 + m.rank)
    dense = m.to_dense()
    assert type(dense) is nn.Linear and dense.weight.shape == (10, 16)
    assert_rel_close(dense(x), ref, depth=16 + m.rank)
    sp = SparseLinear.from_factorization(layer, magnitude_prune(layer.weight.T, 0.3))
    assert_rel_close(sp(x), x @ sp.merged_weight().T + layer.bias, depth=16)
    assert isinstance(pruned_module_from_factorization(layer, fact), DSFLinear)


# ---------------------------------------------------------------- exact sparsity under training


def _dsf_linear():
    layer = nn.Linear(24, 16)
    return DSFLinear.from_factorization(layer, dsf(layer, 0.25)), torch.randn(64, 24)


def _dsf_conv():
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, padding_mode="reflect")
    return DSFConv2d.from_factorization(conv, dsf(conv, 0.25)), torch.randn(8, 4, 9, 9)


def _sparse_linear():
    layer = nn.Linear(24, 16)
    return SparseLinear.from_factorization(layer, magnitude_prune(layer.weight, 0.25)), torch.randn(64, 24)


def _sparse_conv():
    conv = nn.Conv2d(4, 8, 3, padding=1)
    return SparseConv2d.from_factorization(conv, magnitude_prune(conv.weight.flatten(1), 0.25)), \
        torch.randn(8, 4, 9, 9)


BUILDERS = {"dsf_linear": _dsf_linear, "dsf_conv": _dsf_conv, "sparse_linear": _sparse_linear,
            "sparse_conv": _sparse_conv}
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
}


def _assert_exactly_sparse(m, nnz0, before):
    assert m.nnz == nnz0
    changed = False
    for (p, mask), p0 in zip(m.masked_parameters(), before):
        assert mask.dtype == torch.bool
        assert bool((p[~mask] == 0).all()), "a masked entry left zero"
        changed |= not torch.equal(p[mask], p0[mask])
    assert changed, "training did not move the kept entries"


def _train(m, x, opt, steps=50, autocast_dtype=None, scaler=None):
    torch.manual_seed(5)
    target = torch.randn_like(m(x).detach())
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = F.mse_loss(m(x).float(), target)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("builder", list(BUILDERS))
def test_finetuning_keeps_masked_entries_exactly_zero(builder, opt_name):
    torch.manual_seed(4)
    m, x = BUILDERS[builder]()
    nnz0, before = m.nnz, [p.detach().clone() for p, _ in m.masked_parameters()]
    assert all(bool((p[~mask] == 0).all()) for p, mask in m.masked_parameters())
    losses = _train(m, x, OPTIMIZERS[opt_name](m.parameters()))
    assert losses[-1] < losses[0]
    _assert_exactly_sparse(m, nnz0, before)


@pytest.mark.parametrize("builder", ["dsf_linear", "dsf_conv", "sparse_linear"])
def test_amp_bf16_autocast_keeps_masks_exact(builder):
    torch.manual_seed(6)
    m, x = BUILDERS[builder]()
    nnz0, before = m.nnz, [p.detach().clone() for p, _ in m.masked_parameters()]
    for mode in ("fused", "two_step") if builder.startswith("dsf") else ("auto",):
        if builder.startswith("dsf"):
            m.forward_mode = mode
        _train(m, x, OPTIMIZERS["adamw"](m.parameters()), steps=10, autocast_dtype=torch.bfloat16)
    _assert_exactly_sparse(m, nnz0, before)


def test_amp_fp16_grad_scaler_keeps_masks_exact():
    torch.manual_seed(7)
    m, x = _dsf_linear()
    nnz0, before = m.nnz, [p.detach().clone() for p, _ in m.masked_parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    _train(m, x, OPTIMIZERS["sgd"](m.parameters()), steps=20, autocast_dtype=torch.float16, scaler=scaler)
    _assert_exactly_sparse(m, nnz0, before)


def test_gradients_of_masked_entries_are_exactly_zero():
    torch.manual_seed(8)
    for build in BUILDERS.values():
        m, x = build()
        for mode in ("fused", "two_step"):
            if hasattr(m, "forward_mode"):
                m.forward_mode = mode
            m.zero_grad()
            m(x).square().sum().backward()
            for p, mask in m.masked_parameters():
                assert bool((p.grad[~mask] == 0).all()) and bool((p.grad[mask] != 0).any())


# ---------------------------------------------------------------- balancing, round trips, auto


@pytest.mark.parametrize("builder", ["dsf_linear", "dsf_conv"])
def test_balance_norms_keeps_product_and_equalizes(builder):
    torch.manual_seed(9)
    m, x = BUILDERS[builder]()
    m = m.double()
    with torch.no_grad():  # unbalance on purpose: F x 10 per channel, S / 10
        m.first.mul_(torch.logspace(-2, 2, m.rank, dtype=f64).view(-1, *[1] * (m.first.dim() - 1)))
        m.second.div_(torch.logspace(-2, 2, m.rank, dtype=f64).view(1, -1, *[1] * (m.second.dim() - 2)))
    w0, y0, nnz0 = m.merged_weight().clone(), m(x.double()), m.nnz
    assert m.balance_norms_() is m
    # F d and S / d add one rounding per element to each term of the rank sum
    assert_rel_close(m.merged_weight(), w0, depth=m.rank + 2)
    assert_rel_close(m(x.double()), y0, depth=m.first[0].numel() + m.rank + 2)
    nf, ns = m.first.flatten(1).norm(dim=1), m.second.flatten(1).norm(dim=0)
    live = (nf > 0) & (ns > 0)
    assert live.sum() > 0
    # each norm is a sum over one factor's channel after one scaling, plus the sqrt
    assert_rel_close(nf[live], ns[live], depth=max(m.first[0].numel(), m.second.shape[0]) + 4)
    assert m.nnz == nnz0 and all(bool((p[~k] == 0).all()) for p, k in m.masked_parameters())


@pytest.mark.parametrize("builder", list(BUILDERS))
def test_state_dict_round_trip_into_empty_module(builder):
    torch.manual_seed(10)
    m, x = BUILDERS[builder]()
    sd = m.state_dict()
    assert {k for k, v in sd.items() if v.dtype == torch.bool} == {
        "first_mask", "second_mask"} if builder.startswith("dsf") else {"weight_mask"}
    empty = type(m)(**m.spec())
    assert all(bool(mask.all()) for _, mask in empty.masked_parameters())  # masks start all-True
    assert not torch.equal(empty(x), m(x))
    empty.load_state_dict(sd)
    assert torch.equal(empty(x), m(x))
    for (p, mask), (q, mask_q) in zip(m.masked_parameters(), empty.masked_parameters()):
        assert torch.equal(p, q) and torch.equal(mask, mask_q) and mask_q.dtype == torch.bool
    assert empty.nnz == m.nnz


def test_empty_constructors_match_brief_signatures():
    lin = DSFLinear(20, 7, 5, bias=True, device=None, dtype=f64)
    assert (lin.first.shape, lin.second.shape, lin.bias.shape) == ((5, 20), (7, 5), (7,))
    conv = DSFConv2d(3, 8, (3, 1), 4, stride=2, padding=1, dilation=1, padding_mode="zeros", bias=False,
                     device=None, dtype=None)
    assert (conv.first.shape, conv.second.shape, conv.bias) == ((4, 3, 3, 1), (8, 4, 1, 1), None)
    assert conv.first_mask.shape == conv.first.shape and conv.density == (4 * 9 + 32) / (8 * 9)
    assert conv(torch.randn(1, 3, 6, 6)).shape == (1, 8, 3, 4)
    assert SparseConv2d(3, 8, 3).weight_mask.shape == (8, 3, 3, 3)
    assert SparseLinear(4, 2, bias=False).weight_mask.dtype == torch.bool


def test_choose_forward_path_and_auto_mode():
    # one token: fused would pay out*r*fan_in to form the weight; many tokens amortize it
    assert choose_forward_path(64, 64, 256, 1) == "two_step"
    assert choose_forward_path(64, 64, 256, 10_000) == "fused"
    assert choose_forward_path(64, 8, 256, 10_000) == "two_step"  # low rank: two thin ops win
    layer = nn.Linear(32, 32)
    m = DSFLinear.from_factorization(layer, dsf(layer))
    assert m.forward_path(torch.randn(32)) == "two_step"
    assert m.forward_path(torch.randn(8, 64, 32)) == "fused"
    m.forward_mode = "two_step"
    assert m.forward_path(torch.randn(8, 64, 32)) == "two_step"
    with pytest.raises(ValueError, match="forward_mode"):
        m.forward_mode = "dense"
    conv = nn.Conv2d(16, 16, 3, padding=1)
    mc = DSFConv2d.from_factorization(conv, dsf(conv), forward_mode="auto")
    assert mc.forward_path(torch.randn(1, 16, 1, 1)) == "two_step"
    assert mc.forward_path(torch.randn(8, 16, 32, 32)) == "fused"


def test_the_old_forward_mode_name_in_saved_files_reads_as_two_step():
    from dsf_lightning import PruneConfig, apply_structure_spec

    spec = {"format": "dsf-lightning/structure", "version": 1, "modules": [
        {"name": "0", "class": "DSFLinear", "method": "dsf", "density": 0.5,
         "kwargs": {"in_features": 8, "out_features": 4, "rank": 4, "bias": True, "forward_mode": "sequential"}}]}
    model = apply_structure_spec(nn.Sequential(nn.Linear(8, 4)), spec)  # a spec written before the rename
    assert model[0].forward_mode == "two_step"
    assert PruneConfig(0.5, forward_mode="sequential").forward_mode == "two_step"
    with pytest.raises(ValueError, match=r"forward_mode must be one of \('auto', 'fused', 'two_step'\)"):
        DSFLinear(8, 4, 4, forward_mode="seq")


def test_properties_repr_and_dtype():
    torch.manual_seed(11)
    layer = nn.Linear(20, 10).to(torch.bfloat16)
    fact = dsf(layer, 0.3)
    m = DSFLinear.from_factorization(layer, fact)
    assert m.first.dtype == torch.bfloat16 and m.first_mask.dtype == torch.bool
    assert m.nnz == fact.nnz and m.density == pytest.approx(fact.nnz / 200)
    assert torch.equal(m.bias, layer.bias)
    assert m.merged_weight().shape == (10, 20)
    r = repr(m)
    assert "rank=10" in r and "density=0.3000" in r and "forward_mode=auto" in r
    assert is_pruned_module(m) and not is_pruned_module(layer) and DSFLinear in PRUNED_MODULE_TYPES
    m.half()
    assert m.first.dtype == torch.float16 and m.first_mask.dtype == torch.bool


# ---------------------------------------------------------------- bad input


def test_bad_input_raises():
    grouped = nn.Conv2d(4, 8, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2"):
        DSFConv2d.from_factorization(grouped, dsf(nn.Conv2d(4, 8, 3)))
    with pytest.raises(ValueError, match="groups=2"):
        SparseConv2d.from_factorization(grouped, magnitude_prune(torch.randn(8, 18), 0.3))
    conv = nn.Conv2d(4, 8, 3)
    with pytest.raises(ValueError, match=r"expected first of shape \(8, 36\), got \(8, 27\)"):
        DSFConv2d.from_factorization(conv, dsf(nn.Conv2d(3, 8, 3)))
    layer = nn.Linear(20, 10)
    with pytest.raises(ValueError, match=r"expected first of shape \(10, 20\), got \(12, 20\)"):
        DSFLinear.from_factorization(layer, dsf(nn.Linear(20, 12)))  # rank 12 does not fit rank 10
    with pytest.raises(ValueError, match="second=None"):
        DSFLinear.from_factorization(layer, magnitude_prune(layer.weight, 0.3))
    with pytest.raises(ValueError, match="two factors"):
        SparseLinear.from_factorization(layer, dsf(layer))
    with pytest.raises(ValueError, match=r"expected first of shape \(10, 20\)"):
        SparseLinear.from_factorization(layer, magnitude_prune(layer.weight.T, 0.3))
    with pytest.raises(ValueError, match="nn.Linear"):
        DSFLinear.from_factorization(conv, dsf(layer))
    with pytest.raises(ValueError, match="padding_mode"):
        DSFConv2d(3, 4, 3, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="strided"):
        DSFConv2d(3, 4, 3, 3, stride=2, padding="same")


def test_building_a_pruned_module_leaves_the_rng_alone():
    from dsf_lightning.modules import pruned_module

    layer = nn.Conv2d(4, 8, 3)
    state = torch.get_rng_state()
    new = pruned_module(layer, two_factor=True)
    assert torch.equal(state, torch.get_rng_state())  # a training run's data order does not depend on pruning
    assert torch.equal(new.merged_weight(), layer.weight.detach())  # dense-equivalent: the same weight, exactly
