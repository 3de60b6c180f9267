"""The pruned structure (persistence/structure.py): spec round trips, back to dense, mismatched specs, checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import assert_rel_close, network_depth  # tests/ is on sys.path
from test_pruning import (  # the shared models and checks of the pruning tests
    CASES,
    FAST,
    IDS,
    IMG,
    assert_unchanged,
    gpt2,
    llama,
    resnet18,
    run,
    small_cnn,
    snapshot,
)
from torch import nn

from dsf_lightning.modules import PRUNED_MODULE_TYPES
from dsf_lightning.persistence.structure import (
    apply_structure_spec,
    load_pruned,
    merge,
    replace_module,
    save_pruned,
    structure_spec,
)
from dsf_lightning.pipeline.entry import prune


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_bit_exact(case, tmp_path):
    make, x, method, kw = CASES[case]
    torch.manual_seed(0)
    model = make()
    opts = FAST if method == "dsf" else None
    report = prune(model, 0.3, method, progress=False, factorization_options=opts, **kw)
    assert report.layers and all(isinstance(m, PRUNED_MODULE_TYPES) for m in
                                 (model.get_submodule(r.name) for r in report.layers))
    expected = run(model, x)

    torch.manual_seed(1)  # a different dense init: everything must come from the checkpoint
    fresh = make()
    save_pruned(model, tmp_path / "pruned.pt")
    load_pruned(fresh, tmp_path / "pruned.pt")
    assert torch.equal(run(fresh.eval(), x), expected)

    # The spec is JSON; apply_structure_spec + a plain strict load_state_dict works as well.
    spec = json.loads(json.dumps(structure_spec(model)))
    assert spec == structure_spec(fresh)
    assert {e["name"] for e in spec["modules"]} == {r.name for r in report.layers}
    assert all(e["method"] == method and e["density"] == 0.3 for e in spec["modules"])
    torch.manual_seed(2)
    other = apply_structure_spec(make(), spec)
    other.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(run(other.eval(), x), expected)


@pytest.mark.parametrize("make, x", [(resnet18, IMG), (gpt2, IDS), (llama, IDS)])
def test_merge_restores_plain_layers(make, x):
    torch.manual_seed(0)
    model = make()
    prune(model, 0.4, "dsf" if make is not resnet18 else "magnitude", progress=False, factorization_options=None
          if make is resnet18 else FAST)
    expected, depth = run(model, x), network_depth(model)
    merged = merge(model)
    assert merged is model
    assert not any(isinstance(m, PRUNED_MODULE_TYPES) for m in model.modules())
    assert structure_spec(model)["modules"] == []
    assert_rel_close(run(model, x), expected, depth=depth)  # S F formed once vs x F^T S^T, every layer
    if make is gpt2:  # Conv1D layers come back as the equivalent nn.Linear
        assert type(model.transformer.h[0].attn.c_attn) is nn.Linear
    if make is resnet18:
        assert type(model.layer1[0].conv1) is nn.Conv2d and type(model.fc) is nn.Linear


def test_replace_module_handles_indices():
    model = small_cnn()
    new = nn.Identity()
    old = replace_module(model, "1", new)
    assert isinstance(old, nn.Conv2d) and model[1] is new
    m = llama()
    q = m.model.layers[1].self_attn.q_proj
    assert replace_module(m, "model.layers.1.self_attn.q_proj", nn.Identity()) is q
    with pytest.raises(ValueError, match="no module named 'model.layers.7.mlp'"):
        replace_module(m, "model.layers.7.mlp", nn.Identity())


def test_spec_that_does_not_match_the_model():
    model = llama()
    prune(model, 0.3, "magnitude", progress=False)
    spec = structure_spec(model)
    other = llama(intermediate_size=96)
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.mlp\.gate_proj' does not match .*"
                                         r"out_features=128.*found Linear\(in_features=64, out_features=96"):
        apply_structure_spec(other, spec)
    assert_unchanged(other, snap)
    missing = llama(num_hidden_layers=1)
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.1\.self_attn\.q_proj' of the structure spec "
                                         r"is not in LlamaForCausalLM"):
        apply_structure_spec(missing, spec)
    assert apply_structure_spec(model, spec) is model  # already that structure: nothing to do
    assert structure_spec(model) == spec
    dsf_spec = json.loads(json.dumps(spec).replace("SparseLinear", "DSFLinear"))
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.self_attn\.q_proj' is already a SparseLinear"):
        apply_structure_spec(model, dsf_spec)
    with pytest.raises(ValueError, match="not a dsf-lightning structure spec"):
        apply_structure_spec(llama(), {"modules": []})


def test_checkpoint_from_another_architecture(tmp_path):
    model = llama()
    prune(model, 0.3, "magnitude", progress=False)
    save_pruned(model, tmp_path / "ckpt.pt")
    # Different MLP width: the structure does not fit, named by layer.
    other = llama(intermediate_size=96)
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj"):
        load_pruned(other, tmp_path / "ckpt.pt")
    assert_unchanged(other, snap)
    # Same blocks, different vocabulary: the structure fits, the state dict does not; rolled back.
    other = llama(vocab_size=100)
    snap = snapshot(other)
    with pytest.raises(ValueError, match=r"shape mismatches.*model\.embed_tokens\.weight"):
        load_pruned(other, tmp_path / "ckpt.pt")
    assert_unchanged(other, snap)
    # A bare state dict needs its spec.
    with pytest.raises(ValueError, match="no structure spec"):
        load_pruned(llama(), model.state_dict())
    # Loading into a model that already has the structure just loads.
    again = load_pruned(llama(), model.state_dict(), spec=structure_spec(model))
    assert torch.equal(run(load_pruned(again, tmp_path / "ckpt.pt"), IDS), run(model, IDS))
