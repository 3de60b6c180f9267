"""The two storages of pruned factors: same function, same training, round trips, compact training state."""

from __future__ import annotations

import copy

import pytest
import torch
from numerics import assert_rel_close  # tests/ is on sys.path
from torch import nn

from dsf_lightning import prune
from dsf_lightning.modules import DSFConv2d, DSFLinear, SparseConv2d, SparseLinear, set_storage
from dsf_lightning.modules.storage import pack_bits, unpack_bits
from dsf_lightning.persistence.export import load_packed, merged_state_dict, pack_model, save_packed, to_csr
from dsf_lightning.persistence.structure import (
    load_pruned,
    nonzeros_outside_masks,
    pruned_modules,
    save_pruned,
    structure_spec,
)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                         nn.Linear(8 * 6 * 6, 24), nn.ReLU(), nn.Linear(24, 10))


def _pruned(storage: str) -> nn.Sequential:
    """DSF on the second conv and the first linear, magnitude (single mask) on the last."""
    net = _net()
    prune(net, 0.4, "dsf", exclude=["6"], progress=False, factorization_options={"outer_iters": 2}, storage=storage)
    prune(net, 0.4, "magnitude", include=["6"], progress=False, storage=storage)
    return net


@pytest.fixture(scope="module")
def both():
    return _pruned("masked"), _pruned("compressed")


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_bits_round_trip_any_length():
    for n in (1, 7, 8, 9, 1000):
        mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
        assert torch.equal(unpack_bits(pack_bits(mask), (n,)), mask)


def test_compressed_holds_only_the_nonzeros(both):
    masked, compressed = both
    types = [type(m) for _, m in pruned_modules(compressed)]
    assert types == [DSFConv2d, DSFLinear, SparseLinear]  # the first conv is not a default target
    for (_, a), (_, b) in zip(pruned_modules(masked), pruned_modules(compressed)):
        assert b.storage == "compressed" and a.nnz == b.nnz
        assert sum(p.numel() for p in b.factor_parameters()) == b.nnz  # trainable elements = nonzeros
        assert all(p.dim() == 1 for p in b.factor_parameters())
        for name in a.factor_names:  # same factors and masks, read through either storage
            assert torch.equal(a.factor_mask(name), b.factor_mask(name))
            assert torch.equal(a.factor(name), b.factor(name))


@pytest.mark.parametrize("mode", ["fused", "two_step"])
def test_same_function_and_gradients(both, mode):
    masked, compressed = (copy.deepcopy(m) for m in both)
    for m in (masked, compressed):
        for _, layer in pruned_modules(m):
            if hasattr(layer, "forward_mode"):
                layer.forward_mode = mode
    x = _x()
    ya, yb = masked(x), compressed(x)
    assert torch.equal(ya, yb)  # the same dense factors enter the same ops
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (_, a), (_, b) in zip(pruned_modules(masked), pruned_modules(compressed)):
        for name, pa, pb in zip(a.factor_names, a.factor_parameters(), b.factor_parameters()):
            mask = a.factor_mask(name)
            assert torch.equal(pb.grad, pa.grad[mask]) and not pa.grad[~mask].any()


def test_adamw_steps_agree_and_masks_hold(both):
    """AdamW (with weight decay) on the values is AdamW on the masked parameters at the mask: masked entries
    have zero gradient and zero moments, so their update is zero."""
    masked, compressed = (copy.deepcopy(m) for m in both)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (masked, compressed)]
    x = _x()
    for _ in range(3):
        for m, opt in zip((masked, compressed), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    assert nonzeros_outside_masks(masked) == 0 and nonzeros_outside_masks(compressed) == 0
    state = sum(t.numel() for s in opts[1].state.values() for t in s.values() if t.dim() > 0)
    assert state == 2 * sum(p.numel() for p in compressed.parameters())  # Adam's moments scale with the nonzeros
    for (_, a), (_, b) in zip(pruned_modules(masked), pruned_modules(compressed)):
        for name in a.factor_names:
            assert torch.equal(a.factor_mask(name), b.factor_mask(name))
            # elementwise AdamW on the same gradients: the same bits
            assert torch.equal(a.factor(name), b.factor(name)), name


def test_set_storage_round_trip(both):
    masked, compressed = both
    there = set_storage(copy.deepcopy(masked), "compressed")
    back = set_storage(copy.deepcopy(compressed), "masked")
    for k, v in compressed.state_dict().items():
        assert torch.equal(there.state_dict()[k], v), k
    for k, v in masked.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    with pytest.raises(ValueError, match=r"storage must be one of \('masked', 'compressed'\), got 'csr'"):
        set_storage(copy.deepcopy(masked), "csr")


@pytest.mark.parametrize("saved, into", [("masked", "compressed"), ("compressed", "masked"),
                                         ("compressed", "compressed")])
def test_state_dicts_load_across_storages(both, saved, into):
    src = dict(zip(("masked", "compressed"), both))[saved]
    dst = set_storage(copy.deepcopy(src), into)
    for _, m in pruned_modules(dst):  # other values in the receiving modules, of other counts
        m.reset_parameters()
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst(_x()), src(_x()))


def test_save_and_load_pruned_keep_the_storage(both, tmp_path):
    for src in both:
        save_pruned(src, tmp_path / "p.pt")
        fresh = load_pruned(_net(), tmp_path / "p.pt")
        assert structure_spec(fresh) == structure_spec(src)
        assert torch.equal(fresh(_x()), src(_x()))


def test_exports_are_the_same_from_either_storage(both, tmp_path):
    masked, compressed = both
    ta, ma = pack_model(masked, dtype=None)
    tb, mb = pack_model(compressed, dtype=None)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    merged_a, merged_b = merged_state_dict(masked), merged_state_dict(compressed)
    assert all(torch.equal(merged_a[k], merged_b[k]) for k in merged_a)
    save_packed(compressed, tmp_path / "m.safetensors", dtype=None)
    loaded = load_packed(_net(), tmp_path / "m.safetensors")
    assert [m.storage for _, m in pruned_modules(loaded)] == ["compressed"] * 3
    assert torch.equal(loaded(_x()), compressed(_x()))
    # CSR inference from the compressed layers (the linear ones)
    flat = torch.randn(3, 24)
    csr = to_csr(copy.deepcopy(compressed[6]))
    assert_rel_close(csr(flat), compressed[6](flat), depth=24)  # CSR sums the 24 inputs in its own order


def test_old_masked_checkpoints_load_into_compressed_modules(both):
    masked, _ = both
    old = copy.deepcopy(masked.state_dict())  # keys "<layer>.first", "<layer>.first_mask": the masked form
    assert "2.first_mask" in old
    target = _pruned("compressed")
    target.load_state_dict(old)
    assert torch.equal(target(_x()), masked(_x()))


def test_bad_compressed_state_names_the_layer(both):
    _, compressed = both
    sd = copy.deepcopy(compressed.state_dict())
    sd["4.second_values"] = sd["4.second_values"][:-2]
    with pytest.raises(ValueError, match=r"layer '4' factor 'second': \(\d+,\) values for \d+ mask bits"):
        copy.deepcopy(compressed).load_state_dict(sd)
    sd = copy.deepcopy(compressed.state_dict())
    sd["4.first_bits"] = sd["4.first_bits"][:-1]
    with pytest.raises(ValueError, match=r"layer '4' factor 'first': unpack_bits: expected a 1-D uint8 tensor"):
        copy.deepcopy(compressed).load_state_dict(sd)


def test_sparse_conv_compressed_forward():
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    masked = SparseConv2d.like(conv)
    masked.set_factor_("weight", conv.weight.detach(), torch.rand(conv.weight.shape) < 0.3)
    compressed = copy.deepcopy(masked).set_storage_("compressed")
    x = torch.randn(2, 3, 7, 7)
    assert torch.equal(masked(x), compressed(x)) and compressed.nnz == masked.nnz


def test_causal_lm_decays_compressed_values_as_matrices():
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsf_lightning.models import CausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    prune(model, 0.5, "magnitude", progress=False, storage="compressed")
    module = CausalLM(model, lr=1e-3, weight_decay=0.1)
    module.trainer = type("T", (), {"estimated_stepping_batches": 4})()  # what configure_optimizers reads
    opt = module.configure_optimizers()["optimizer"]
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    values = [p for _, m in pruned_modules(model) for p in m.factor_parameters()]
    assert values and all(p.dim() == 1 and id(p) in decayed for p in values)
    assert not any(id(p) in decayed for n, p in model.named_parameters() if "norm" in n)


def test_causal_lm_trains_compressed_by_default():
    """CausalLM converts masked modules given to it (before its optimizer exists); None keeps them."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dsf_lightning.models import CausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(cfg)
    prune(model, 0.5, "magnitude", progress=False, storage="masked")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    before = model(input_ids=ids).logits
    CausalLM(model, storage=None)
    assert {m.storage for _, m in pruned_modules(model)} == {"masked"}
    CausalLM(model)
    assert {m.storage for _, m in pruned_modules(model)} == {"compressed"}
    assert torch.equal(model(input_ids=ids).logits, before)
    with pytest.raises(ValueError, match=r"storage must be one of \('masked', 'compressed'\), got 'dense'"):
        CausalLM(model, storage="dense")


def test_callback_refuses_compressed_on_a_sharding_strategy():
    from lightning.pytorch.strategies import FSDPStrategy

    from dsf_lightning.callbacks.strategies import check_resizable

    with pytest.raises(ValueError, match=r"storage='compressed'\) supports single-device and DDP strategies .* "
                                         r"FSDPStrategy is not one: pass storage='masked'"):
        check_resizable(FSDPStrategy(), "DSFPruneCallback")


class _Regression(__import__("lightning").pytorch.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).square().mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1)


@pytest.mark.parametrize("storage", ["masked", "compressed"])
def test_training_memory_reads_the_training_state_from_the_tensors(both, storage, tmp_path):
    """A plain Trainer with TrainingMemory: parameters + gradients + AdamW's two moments and step counters +
    buffers, byte for byte; the compressed storage holds less than the masked one."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from dsf_lightning.callbacks import TrainingMemory

    net = copy.deepcopy(dict(zip(("masked", "compressed"), both))[storage])
    memory = TrainingMemory()
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[memory],
                         default_root_dir=tmp_path)
    trainer.fit(_Regression(net), DataLoader(TensorDataset(torch.randn(8, 3, 6, 6)), batch_size=4))
    params = list(net.parameters())
    param_bytes = sum(4 * p.numel() for p in params)
    state = memory.figures["training_state_bytes"]
    assert memory.figures["storage"] == storage and memory.figures["peak_kind"] == "sampled RSS"
    assert state["parameters"] == state["gradients"] == param_bytes
    assert state["optimizer"] == 2 * param_bytes + 4 * len(params)  # exp_avg, exp_avg_sq; a float32 step each
    assert state["buffers"] == sum(b.numel() * b.element_size() for b in net.buffers())
    assert state["total"] == sum(v for k, v in state.items() if k != "total")
    assert memory.figures["peak_bytes"] > state["total"]
    nnz = sum(m.nnz for _, m in pruned_modules(net))
    if storage == "compressed":
        factors = sum(p.numel() for _, m in pruned_modules(net) for p in m.factor_parameters())
        assert factors == nnz  # every trainable factor element is a nonzero


def test_patterns_as_frozen_parameters_change_nothing_but_where_they_are_held(both):
    # FSDP2 shards parameters, not buffers: the bit patterns become frozen parameters before sharding
    net = copy.deepcopy(both[1])
    keys, want = list(net.state_dict()), net(_x())
    for _, m in pruned_modules(net):
        m.patterns_to_parameters_()
    bits = [p for n, p in net.named_parameters() if n.endswith("_bits")]
    assert len(bits) == 2 * 2 + 1 and all(p.dtype == torch.uint8 and not p.requires_grad for p in bits)
    assert not any(n.endswith("_bits") for n, _ in net.named_buffers())
    assert list(net.state_dict()) == keys and torch.equal(net(_x()), want)
    assert nonzeros_outside_masks(net) == 0
    masked = copy.deepcopy(both[0])
    before = dict(masked.named_buffers())
    for _, m in pruned_modules(masked):
        m.patterns_to_parameters_()  # the masked storage keeps its masks as buffers
    assert dict(masked.named_buffers()).keys() == before.keys()
