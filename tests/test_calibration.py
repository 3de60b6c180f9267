"""Math of input Gram matrices: im2col, running means, merging, hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numerics import assert_rel_close, rel_bound, relative_error  # tests/ is on sys.path
from torch import nn

from dsf_lightning.pipeline.calibration import GramAccumulator, InputGramRecorder, conv2d_patches, move_batch

F32 = torch.float32


def gram_depth(rows: int, batches: int = 1) -> int:
    """fp32 depth of a running-mean Gram: a ``rows``-term sum per batch (``rows`` the largest), then the
    mean's scale and add, three roundings per batch."""
    return rows + 3 * batches


def loop_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Reference im2col by a plain loop over output positions (float64)."""
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pads = (0, 0, 0, 0)
        else:  # "same": total = d*(k-1), left = total//2
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = conv.padding
        pads = (pw, pw, ph, ph)
    mode = {"zeros": "constant"}.get(conv.padding_mode, conv.padding_mode)
    xp = F.pad(x.double(), pads, mode=mode)
    n, c, hp, wp = xp.shape
    h_out = (hp - dh * (kh - 1) - 1) // sh + 1
    w_out = (wp - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for b in range(n):
        for i in range(h_out):
            for j in range(w_out):
                patch = xp[b, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                rows.append(patch.reshape(-1))  # (c, kh, kw) order == weight.flatten(1)
    return torch.stack(rows)


CONV_CASES = {
    "stride2": dict(kernel_size=3, stride=2),
    "padding1": dict(kernel_size=3, padding=1),
    "dilation2": dict(kernel_size=3, dilation=2, padding=1),
    "kernel3x2": dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0)),
    "same_even": dict(kernel_size=(4, 2), padding="same", dilation=(1, 3)),
    "valid": dict(kernel_size=2, padding="valid"),
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "circular_stride": dict(kernel_size=3, padding=2, stride=2, padding_mode="circular"),
    "replicate_same": dict(kernel_size=(2, 3), padding="same", padding_mode="replicate"),
}


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("case", CONV_CASES, ids=list(CONV_CASES))
def test_conv_patches_and_gram_match_loop_im2col(case):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, bias=False, **CONV_CASES[case])
    x = torch.randn(2, 3, 7, 8)
    ref = loop_patches(x, conv)
    rows = conv2d_patches(x, conv)
    assert rows.shape == ref.shape == (ref.shape[0], conv.weight[0].numel())
    assert torch.equal(rows.double(), ref)  # patches are copies of inputs and padding
    # the patches reproduce the convolution itself: conv(x) = rows @ W^T, fan_in-term dots both ways
    y = conv(x).permute(0, 2, 3, 1).reshape(-1, conv.out_channels)
    assert_rel_close(rows @ conv.weight.flatten(1).T, y, depth=rows.shape[1])
    # Gram = P^T P / N: an N-term fp32 sum and the running mean's 3 roundings, against float64
    acc = GramAccumulator(rows.shape[1])
    acc.add_conv2d_input(x, conv)
    assert acc.count == ref.shape[0]
    assert_rel_close(acc.gram, ref.T @ ref / ref.shape[0], depth=gram_depth(ref.shape[0]), dtype=F32, computations=1)


def test_conv_patches_equal_unfold_for_zero_padding():
    conv = nn.Conv2d(2, 3, kernel_size=(3, 2), stride=2, padding=1, dilation=2)
    x = torch.randn(3, 2, 9, 10)
    cols = F.unfold(x, (3, 2), dilation=2, padding=1, stride=2)
    assert torch.equal(conv2d_patches(x, conv), cols.transpose(1, 2).reshape(-1, 12))  # both copy inputs


def test_conv_chunking_does_not_change_gram():
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    x = torch.randn(7, 3, 6, 6)
    whole, chunked = GramAccumulator(27), GramAccumulator(27)
    whole.add(conv2d_patches(x, conv))
    chunked.add_conv2d_input(x, conv, max_patch_elements=1)  # one image per chunk
    assert chunked.count == whole.count == 7 * 36
    assert_rel_close(chunked.gram, whole.gram, depth=gram_depth(7 * 36, 7))


def test_linear_gram_on_3d_input():
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    acc = GramAccumulator(6)
    acc.add_linear_input(x.float())
    xm = x.reshape(-1, 6)
    assert acc.count == 20
    assert acc.gram.dtype == torch.float32 and acc.gram.shape == (6, 6)
    assert_rel_close(acc.gram, xm.T @ xm / 20, depth=gram_depth(20), dtype=F32, computations=1)


def test_running_mean_over_uneven_batches_matches_one_shot():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 8, generator=gen, dtype=torch.float64) * 3 + 1
    acc = GramAccumulator(8)
    sizes = [1, 2, 3, 500, 7, 0, 487]
    start = 0
    for s in sizes:
        acc.add(x[start : start + s].float())
        start += s
    assert acc.count == 1000
    assert_rel_close(acc.gram, x.T @ x / 1000, depth=gram_depth(max(sizes), len(sizes)), dtype=F32, computations=1)


def test_running_mean_is_precise_for_a_million_large_tokens():
    """10^6 tokens of magnitude ~1e3: the mean keeps float32 accuracy."""
    gen = torch.Generator().manual_seed(2)
    fan_in, n, b = 6, 1_000_000, 1000
    x = (1e3 + 10 * torch.randn(n, fan_in, generator=gen, dtype=torch.float64)).float()
    acc = GramAccumulator(fan_in)
    for i in range(0, n, b):
        acc.add(x[i : i + b])
    assert acc.count == n
    xd = x.double()
    ref = xd.T @ xd / n
    rel = relative_error(acc.gram, ref)
    assert rel <= rel_bound(F32, gram_depth(b, n // b), computations=1), rel
    # A naive float32 running sum, token by token (numpy's cumsum is sequential), loses
    # ~1e-3 once the sum (~1e12) dwarfs each term (~1e6).
    naive = float(np.cumsum((x[:, 0] * x[:, 0]).numpy())[-1]) / n
    naive_rel = abs(naive - ref[0, 0].item()) / ref[0, 0].item()
    assert naive_rel > 100 * rel


def test_merge_equals_single_accumulator():
    x = torch.randn(300, 5)
    a, b, whole = GramAccumulator(5), GramAccumulator(5), GramAccumulator(5)
    a.add(x[:70])
    b.add(x[70:])
    whole.add(x)
    a.merge_(b)
    assert a.count == 300
    assert_rel_close(a.gram, whole.gram, depth=gram_depth(300, 2))
    # merging into an empty accumulator copies; to_sum/from_sum round-trips a reduction
    empty = GramAccumulator(5).merge_(whole)
    assert torch.equal(empty.gram, whole.gram)
    sa, na = GramAccumulator(5), GramAccumulator(5)
    sa.add(x[:70]), na.add(x[70:])
    (ta, ca), (tb, cb) = sa.to_sum(), na.to_sum()
    assert ta.dtype == torch.float64
    reduced = GramAccumulator.from_sum(ta + tb, ca + cb)
    assert reduced.count == 300
    assert_rel_close(reduced.gram, whole.gram, depth=gram_depth(300, 2))


def test_recorder_on_sequential_matches_hand_computed_grams():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1)
    fc = nn.Linear(3 * 4 * 4, 5)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), fc)
    batches = [torch.randn(4, 2, 8, 8), torch.randn(3, 2, 8, 8)]
    with InputGramRecorder(model, {"0": conv, "3": fc}) as rec:
        for xb in batches:
            model(xb)
    x = torch.cat(batches).double()
    p = loop_patches(x, conv)
    h = torch.relu(F.conv2d(x, conv.weight.double(), conv.bias.double(), stride=2, padding=1)).flatten(1)
    assert rec.counts == {"0": p.shape[0], "3": 7}
    assert_rel_close(rec.grams["0"], p.T @ p / p.shape[0], depth=gram_depth(p.shape[0], 2), dtype=F32, computations=1)
    # fc's inputs are the fp32 conv's outputs (18-term dots), each entering the Gram twice
    assert_rel_close(rec.grams["3"], h.T @ h / 7, depth=gram_depth(7, 2) + 2 * 18, dtype=F32, computations=1)
    assert all(len(m._forward_pre_hooks) == 0 for m in model.modules())


def test_recorder_removes_hooks_on_exception():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(RuntimeError, match="boom"):
        with InputGramRecorder(model, {"0": model[0]}):
            assert len(model[0]._forward_pre_hooks) == 1
            raise RuntimeError("boom")
    assert len(model[0]._forward_pre_hooks) == 0


def test_recorder_accepts_hf_conv1d():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(7, 4)  # nf=7 outputs, nx=4 inputs; weight (4, 7)
    model = nn.Sequential(layer)
    x = torch.randn(2, 3, 4)
    with InputGramRecorder(model, {"c": layer}) as rec:
        model(x)
    xm = x.reshape(-1, 4).double()
    assert_rel_close(rec.grams["c"], xm.T @ xm / 6, depth=gram_depth(6), dtype=F32, computations=1)


def test_errors():
    acc = GramAccumulator(4)
    with pytest.raises(ValueError, match=r"\(tokens, 4\).*\(3, 5\)"):
        acc.add(torch.randn(3, 5))
    with pytest.raises(ValueError, match="last dim 4"):
        acc.add_linear_input(torch.randn(2, 3, 5))
    bad = torch.randn(3, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        acc.add(bad)
    assert acc.count == 0
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="groups"):
        conv2d_patches(torch.randn(1, 4, 5, 5), grouped)
    with pytest.raises(ValueError, match="groups"):
        InputGramRecorder(nn.Sequential(grouped), {"g": grouped})
    norm = nn.LayerNorm(4)
    with pytest.raises(ValueError, match="'n'.*LayerNorm"):
        InputGramRecorder(nn.Sequential(norm), {"n": norm})


def test_diagonal_accumulator_is_the_grams_diagonal_and_sums_across_ranks():
    g = torch.Generator().manual_seed(0)
    full, diag = GramAccumulator(12), GramAccumulator(12, diagonal=True)
    for b in (5, 9):
        x = torch.randn(b, 12, generator=g)
        full.add(x)
        diag.add(x)
    assert diag.gram.shape == (12,)
    assert_rel_close(diag.gram, full.gram.diagonal(), depth=gram_depth(9, 2))  # sum(x * x) vs x^T x kernels
    total, count = diag.to_sum()
    rebuilt = GramAccumulator.from_sum(total, count)
    assert rebuilt.diagonal and torch.equal(rebuilt.gram, diag.gram)  # G n / n is exact in float64
    with pytest.raises(ValueError, match="diagonal"):
        full.merge_(diag)


def test_move_batch_moves_every_tensor_and_keeps_the_containers():
    from collections import namedtuple

    Pair = namedtuple("Pair", "x y")
    t = torch.ones(2, dtype=torch.float64)
    batch = {"a": [t, (t, "label")], "b": Pair(t, 3)}
    moved = move_batch(batch, torch.device("meta"))
    assert moved["a"][0].device.type == "meta" and moved["a"][1][0].device.type == "meta"
    assert isinstance(moved["a"], list) and isinstance(moved["a"][1], tuple) and moved["a"][1][1] == "label"
    assert isinstance(moved["b"], Pair) and moved["b"].x.device.type == "meta" and moved["b"].y == 3
