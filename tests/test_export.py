"""Export paths: merged dense state dict, packed (values + bitmask) safetensors, CSR inference."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from numerics import assert_rel_close, network_depth  # tests/ is on sys.path
from safetensors import safe_open
from torch import nn

from dsf_lightning.factorization import factorize
from dsf_lightning.models import resnet20
from dsf_lightning.modules import DSFConv2d, DSFLinear, SparseConv2d, SparseLinear, pruned_module_from_factorization
from dsf_lightning.persistence.export import (
    CSRDSFLinear,
    CSRLinear,
    load_packed,
    merged_state_dict,
    pack_bits,
    packed_size_bytes,
    save_packed,
    to_csr,
    unpack_bits,
)
from dsf_lightning.persistence.structure import structure_spec


class Net(nn.Module):
    """ResNet-20 (width 8) with an extra linear head, so both Linear kinds can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.body = resnet20(num_classes=16, width=8)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


def _dense(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net()
    # Non-trivial BN statistics so that buffers matter in the round trip.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.num_batches_tracked.fill_(7)
    return net.eval()


def _prune(net: Net, density: float = 0.3) -> Net:
    """Alternate DSF / magnitude over the convs (not the first), DSF on body.fc, magnitude on head."""
    targets = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and n != "body.conv1"]
    for i, name in enumerate(targets + ["body.fc", "head"]):
        layer = net.get_submodule(name)
        method = "dsf" if (name == "body.fc" or (name != "head" and i % 2 == 0)) else "magnitude"
        opts = dict(outer_iters=3) if method == "dsf" else {}
        fact = factorize(method, layer.weight.detach().flatten(1), density, **opts)
        net.set_submodule(name, pruned_module_from_factorization(layer, fact))
    return net


@pytest.fixture(scope="module")
def pruned() -> Net:
    return _prune(_dense()).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_pruned_fixture_has_every_kind(pruned):
    kinds = {type(m) for m in pruned.modules()}
    assert {DSFConv2d, SparseConv2d, DSFLinear, SparseLinear} <= kinds


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (2, 3, 5), (13, 1, 3, 3)])
def test_pack_bits_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape))) < 0.4
    bits = pack_bits(mask)
    n = mask.numel()
    assert bits.dtype == torch.uint8 and bits.shape == ((n + 7) // 8,)
    assert torch.equal(unpack_bits(bits, shape), mask)


def test_pack_bits_order_matches_numpy():
    np = pytest.importorskip("numpy")
    mask = torch.rand(37, generator=torch.Generator().manual_seed(0)) < 0.5
    assert pack_bits(mask).tolist() == np.packbits(mask.numpy()).tolist()
    with pytest.raises(ValueError, match="uint8"):
        unpack_bits(pack_bits(mask), (38, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_round_trip_bit_exact(pruned, images, dtype, tmp_path):
    src = copy.deepcopy(pruned)
    with torch.no_grad():  # make every float value representable in the stored dtype
        for t in list(src.parameters()) + list(src.buffers()):
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    path = tmp_path / "m.safetensors"
    size = save_packed(src, path, dtype=dtype)
    assert size == path.stat().st_size == packed_size_bytes(src, dtype)
    loaded = load_packed(_dense(seed=123), path).eval()
    for name, m in src.named_modules():
        if isinstance(m, (DSFConv2d, SparseConv2d, DSFLinear, SparseLinear)):
            other = loaded.get_submodule(name)
            assert type(other) is type(m) and other.spec() == m.spec()
            for (p, mk), (q, qk) in zip(m.masked_parameters(), other.masked_parameters()):
                assert torch.equal(mk, qk) and torch.equal(p, q)
    for (k, v), (k2, v2) in zip(src.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    with torch.no_grad():
        assert torch.equal(src(images), loaded(images))


def test_packed_round_trip_rounds_otherwise(pruned, tmp_path):
    path = tmp_path / "m.safetensors"
    save_packed(pruned, path, dtype=torch.float16)
    loaded = load_packed(_dense(seed=5), path)
    for (k, v), v2 in zip(pruned.state_dict().items(), loaded.state_dict().values()):
        expected = v.half().float() if v.is_floating_point() else v
        assert torch.equal(expected, v2), k
    # dtype=None keeps float32: lossless.
    save_packed(pruned, path, dtype=None)
    loaded = load_packed(_dense(seed=6), path)
    for (k, v), v2 in zip(pruned.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(v, v2), k


def test_packed_file_contents(pruned, tmp_path):
    path = tmp_path / "m.safetensors"
    save_packed(pruned, path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        assert f.get_tensor("body.layer1.0.conv1.first.mask").dtype == torch.uint8
        assert f.get_tensor("body.layer1.0.conv1.first.values").dtype == torch.float16
        assert f.get_tensor("body.bn1.num_batches_tracked").dtype == torch.int64
    structure = json.loads(meta["structure"])
    assert meta["format"] == "dsf-packed" and meta["dtype"] == "float16" and meta["version"] == "3"
    assert len(meta["sha256"]) == 64  # the digest load_packed checks (tests/test_faults.py corrupts files)
    assert structure == structure_spec(pruned)  # the one structure format, as checkpoints carry it
    by_name = {e["name"]: e for e in structure["modules"]}
    assert by_name["body.fc"]["class"] == "DSFLinear" and by_name["head"]["class"] == "SparseLinear"
    assert not any(k.endswith("_mask") for k in keys)
    assert "body.conv1.weight" in keys and "body.layer1.0.conv1.first" not in keys


def test_load_packed_structure_mismatch(pruned, tmp_path):
    path = tmp_path / "m.safetensors"
    save_packed(pruned, path)
    wrong = _dense()
    wrong.body.layer2[1].conv1 = nn.Conv2d(16, 16, 5, padding=2, bias=False)
    before = copy.deepcopy(wrong.state_dict())
    with pytest.raises(ValueError, match=r"body\.layer2\.1\.conv1"):
        load_packed(wrong, path)
    # Checked before anything was replaced or overwritten.
    assert not any(isinstance(m, (DSFConv2d, SparseConv2d)) for m in wrong.modules())
    assert all(torch.equal(v, wrong.state_dict()[k]) for k, v in before.items())
    wrong = _dense()
    wrong.head = nn.Linear(16, 11)
    with pytest.raises(ValueError, match="'head'"):
        load_packed(wrong, path)
    wrong = _dense()
    wrong.body.fc = nn.Identity()
    with pytest.raises(ValueError, match=r"body\.fc"):
        load_packed(wrong, path)
    with pytest.raises(ValueError, match="body.layer1.0.conv1"):
        wrong = _dense()
        del wrong.body.layer1[0].conv1
        load_packed(wrong, path)


def test_merged_state_dict_loads_into_dense(pruned, images):
    dense = _dense(seed=9)
    dense.load_state_dict(merged_state_dict(pruned), strict=True)
    with torch.no_grad():
        assert_rel_close(dense(images), pruned(images), depth=network_depth(pruned))  # S F once vs x F^T S^T
    assert torch.equal(dense.body.fc.weight, pruned.body.fc.merged_weight())


def test_csr_matches_masked_modules(pruned):
    gen = torch.Generator().manual_seed(3)
    fc, head = pruned.body.fc, pruned.head
    for m, cls in ((fc, CSRDSFLinear), (head, CSRLinear)):
        csr = to_csr(copy.deepcopy(m))
        assert isinstance(csr, cls)
        for shape in ((5, m.in_features), (2, 3, m.in_features), (m.in_features,)):
            x = torch.randn(shape, generator=gen)
            with torch.no_grad():
                assert_rel_close(csr(x), m(x), depth=network_depth(m))  # sparse vs dense kernels
    assert csr.nnz == head.nnz
    # Whole model: the Linear layers become CSR, the convs stay masked.
    model = to_csr(copy.deepcopy(pruned))
    assert isinstance(model.body.fc, CSRDSFLinear) and isinstance(model.head, CSRLinear)
    assert isinstance(model.body.layer1[0].conv1, (DSFConv2d, SparseConv2d))
    x = torch.randn(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        assert_rel_close(model(x), pruned(x), depth=network_depth(pruned))


def test_packed_smaller_than_dense_fp16():
    torch.manual_seed(0)
    density = 0.1
    model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 512, bias=False))
    dense_fp16 = packed_size_bytes(model, torch.float16)  # no pruned modules: the plain fp16 state dict
    for i in range(2):
        layer = model[i]
        model[i] = pruned_module_from_factorization(
            layer, factorize("dsf", layer.weight.detach(), density, outer_iters=2))
    packed = packed_size_bytes(model, torch.float16)
    # Format bound per pruned matrix W (out x fan_in), 2 bytes per dense value: values 2*d bytes,
    # two bitmasks (r*fan_in + out*r)/8 <= 2*numel/8 bytes -> ratio <= d + 1/8 = 0.225, plus header.
    ratio = packed / dense_fp16
    assert ratio < density + 2 / 16 + 0.01, ratio
    assert ratio < 0.25


def test_load_packed_into_already_pruned_structure(pruned, images, tmp_path):
    path = tmp_path / "m.safetensors"
    save_packed(pruned, path, dtype=None)
    target = copy.deepcopy(pruned)
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    fc = target.body.fc
    fc.forward_mode = "two_step"  # a runtime choice, not part of the structure check
    assert load_packed(target, path) is target and target.body.fc is fc  # filled in place
    with torch.no_grad():
        assert torch.equal(target(images), pruned(images))
