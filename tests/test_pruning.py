"""Whole-model pruning: target selection, prune, structure spec round trips, merge, and refusing bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from numerics import assert_rel_close, network_depth  # tests/ is on sys.path
from torch import nn

import dsf_lightning.pipeline.jobs as jobs
from dsf_lightning.modules import PRUNED_MODULE_TYPES, DSFConv2d, DSFLinear, SparseConv2d, SparseLinear
from dsf_lightning.persistence.structure import (
    apply_structure_spec,
    load_pruned,
    merge,
    replace_module,
    save_pruned,
    structure_spec,
)
from dsf_lightning.pipeline.entry import prune
from dsf_lightning.pipeline.targets import detect_family, find_targets

FAST = {"outer_iters": 3}  # DSF with 3 instead of 40 outer iterations: same code paths, fast


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None).eval()


def convnext() -> nn.Module:
    import timm

    return timm.create_model("test_convnext", pretrained=False).eval()  # depthwise convs, head.fc


def llama(**overrides) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides})).eval()


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)).eval()


def small_cnn() -> nn.Module:
    """stem conv, depthwise conv, 1x1 conv, head: only the 1x1 conv is a default target."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                         nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


IMG = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))


def snapshot(model: nn.Module) -> tuple[list[str], dict[str, torch.Tensor]]:
    return [type(m).__name__ for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snap) -> None:
    types, state = snap
    assert [type(m).__name__ for m in model.modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.fixture
def no_factorize(monkeypatch):
    """Fail the test if any factorization starts (errors must come before any work)."""
    def boom(*a, **k):
        raise AssertionError("factorize ran")
    monkeypatch.setattr(jobs, "factorize", boom)
    monkeypatch.setattr(jobs, "factorize_batch", boom)


# ---------------------------------------------------------------------------------------------
# round trips: prune -> save (state dict + spec) -> fresh dense model -> load -> identical outputs
# ---------------------------------------------------------------------------------------------
CASES = {
    "resnet18-dsf": (resnet18, IMG, "dsf", {"exclude": ["layer[34].*"]}),  # layers 3-4 take ~18 s of DSF
    "resnet18-magnitude": (resnet18, IMG, "magnitude", {}),
    "timm-convnext-dsf": (convnext, IMG, "dsf", {}),
    "llama-dsf": (llama, IDS, "dsf", {}),
    "gpt2-dsf": (gpt2, IDS, "dsf", {}),
}


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


# ---------------------------------------------------------------------------------------------
# target selection
# ---------------------------------------------------------------------------------------------
def test_default_targets_resnet18():
    model = resnet18()
    targets, skipped = find_targets(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(targets) == convs[1:]  # every conv but the stem, downsample convs included
    assert "layer2.0.downsample.0" in targets
    assert set(skipped) == {"conv1", "fc"} and "first conv" in skipped["conv1"] and "head" in skipped["fc"]


def test_default_targets_llama():
    model = llama()
    targets, skipped = find_targets(model)
    assert detect_family(model) == "llm"
    projs = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(targets) == sorted(f"model.layers.{i}.{p}" for i in range(2) for p in projs)
    assert "lm_head" in skipped and "model.embed_tokens" not in targets


def test_default_targets_gpt2():
    model = gpt2()
    targets, skipped = find_targets(model)
    expected = [f"transformer.h.{i}.{p}" for i in range(2) for p in
                ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert sorted(targets) == sorted(expected)
    assert "lm_head" in skipped and not any("wte" in n or "wpe" in n for n in targets)


def test_grouped_conv_is_skipped_with_reason():
    targets, skipped = find_targets(small_cnn(), family="vision")
    assert list(targets) == ["3"]
    assert skipped["1"] == "groups=8 > 1 (depthwise/grouped convs are not factorized)"
    assert set(skipped) == {"0", "1", "6"}
    # also when named explicitly, and prune reports it
    model = small_cnn()
    report = prune(model, 0.5, "magnitude", include=["[0-9]"], progress=False)
    assert [r.name for r in report.layers] == ["0", "3", "6"]
    assert "groups=8" in report.skipped["1"] and "not a supported layer type" in report.skipped["2"]
    assert type(model[1]) is nn.Conv2d and isinstance(model[0], SparseConv2d)
    # the unsupported types among the skipped, by the module's type (the grouped conv is a supported one)
    from dsf_lightning.pipeline.targets import unsupported

    assert set(unsupported(model, report.skipped)) == {"2", "4", "5"}  # ReLU, pool, flatten; not "1"


def test_include_exclude_regex_and_glob():
    model = llama()
    targets, _ = find_targets(model, include=[r"model\.layers\.\d+\.self_attn\.[qk]_proj"])
    assert sorted(targets) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kq"]
    targets, skipped = find_targets(model, include=["*.mlp.*"], exclude=["*.down_proj"])
    assert sorted(targets) == sorted(f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj"))
    assert "excluded by pattern" in skipped["model.layers.0.mlp.down_proj"]
    targets, skipped = find_targets(model, include="model.embed_tokens")  # a lone string is one pattern
    assert not targets and "not a supported layer type" in skipped["model.embed_tokens"]


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


# ---------------------------------------------------------------------------------------------
# layer-wise pruning with calibration
# ---------------------------------------------------------------------------------------------
def calib_batches(n: int = 3) -> list:
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 128, (2, 16), generator=g) for _ in range(n)]
    return ids[:-1] + [{"input_ids": ids[-1]}]  # tensors and an HF-style dict through the default forward


@pytest.mark.parametrize("method", ["dsf", "wanda"])
def test_layerwise_prune_llama(method):
    torch.manual_seed(0)
    model = llama()
    model.train()  # training flags must come back after the calibration pass
    name = "model.layers.1.mlp.down_proj"
    report = prune(model, 0.5, method, calibration=calib_batches(), densities={name: 0.25}, progress=False,
                   factorization_options=FAST if method == "dsf" else None)
    assert model.training and model.model.layers[0].training
    rows = {r["name"]: r for r in report.to_rows()}
    assert len(rows) == 14 and report.family == "llm"
    assert set(report.calibration_tokens.values()) == {3 * 2 * 16}
    for r in report.layers:
        out, fan_in = r.shape
        module = model.get_submodule(r.name)
        assert r.nnz == module.nnz <= math.floor(r.density * out * fan_in) == r.budget
        assert math.isfinite(r.error) and 0 <= r.relative_error < 1 and r.seconds >= 0
        # both errors are relative to the same all-zero error, so their ratio is the error ratio
        assert r.error_vs_magnitude == pytest.approx(r.relative_error / r.magnitude_relative_error)
    assert rows[name]["density"] == 0.25 and rows["model.layers.0.mlp.down_proj"]["density"] == 0.5
    assert model.get_submodule(name).density <= 0.25
    assert isinstance(model.get_submodule(name), DSFLinear if method == "dsf" else SparseLinear)
    totals = report.totals()
    assert totals["layers"] == 14 and totals["nnz"] <= totals["budget"] and report.method == method
    assert torch.isfinite(run(model, IDS)).all()


def test_layerwise_prune_conv_with_tuple_batches():
    """(x, y) batches: the default forward calls model(x); conv Grams come from im2col rows."""
    torch.manual_seed(0)
    model = small_cnn()
    batches = [(torch.randn(4, 3, 8, 8), torch.zeros(4)) for _ in range(2)]
    report = prune(model, 0.5, "dsf", calibration=batches, progress=False, factorization_options=FAST,
                   family="vision")
    assert [r.name for r in report.layers] == ["3"] and isinstance(model[3], DSFConv2d)
    assert report.calibration_tokens == {"3": 2 * 4 * 8 * 8}


def test_equal_shape_small_layers_are_solved_in_batches_with_per_layer_results():
    """solve_serially groups jobs of one method, shape, density, options and Gram presence (layers of a
    small cost only, up to the stack cap) into one batch call each; the results are per layer and equal one call per
    layer, in the jobs' order, each group's seconds split evenly."""
    from dsf_lightning.pipeline.jobs import BATCH_MAX_STACK, LayerJob, batch_groups, solve_serially

    gen = torch.Generator().manual_seed(5)

    def job(name, shape, density=0.3, gram=False, method="dsf", **opts):
        g = torch.eye(shape[1]) + 0.1 * torch.ones(shape[1], shape[1]) if gram else None
        return LayerJob(name, method, torch.randn(*shape, generator=gen), density, g,
                        {**FAST, **opts} if method == "dsf" else {})

    jobs = [job("a", (16, 36)), job("b", (16, 36)), job("c", (16, 36), density=0.4), job("d", (16, 36), gram=True),
            job("e", (16, 36), outer_iters=2), job("f", (36, 16)), job("g", (16, 36)), job("h", (16, 36), gram=True),
            job("m1", (16, 36), method="magnitude"), job("m2", (16, 36), method="magnitude"),
            job("big1", (300, 300)), job("big2", (300, 300))]
    groups = [[j.name for j in g] for g in batch_groups(jobs)]
    assert groups == [["a", "b", "g"], ["c"], ["d", "h"], ["e"], ["f"], ["m1"], ["m2"], ["big1"], ["big2"]]
    per_batch = BATCH_MAX_STACK // (64 * 512)
    capped = batch_groups([job(f"x{i}", (64, 512)) for i in range(per_batch + 2)])
    assert [len(g) for g in capped] == [per_batch, 2]

    small = jobs[:-2]
    results = solve_serially(small, progress=False)
    assert list(results) == [j.name for j in small]
    for j in small:
        alone = j.run()
        got, want = results[j.name].factorization, alone.factorization
        assert torch.equal(got.first_mask, want.first_mask) and (got.second_mask is want.second_mask is None
                                                                 or torch.equal(got.second_mask, want.second_mask))
        assert results[j.name].magnitude_error == alone.magnitude_error
    assert results["a"].seconds == results["b"].seconds == results["g"].seconds > 0


# ---------------------------------------------------------------------------------------------
# bad input: ValueError before any work, model unchanged
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(density=0.0), r"density must be a number in \(0, 1\]"),
    (dict(density=1.5), r"density must be a number in \(0, 1\]"),
    (dict(method="obc"), r"unknown method 'obc'; valid methods: \['admm', 'dsf'"),
    (dict(method="wanda"), "needs calibration data"),
    (dict(densities={"model.layers.0.mlp.up_prj": 0.2}), r"model\.layers\.0\.mlp\.up_proj"),
    (dict(densities={"lm_head": 0.2}), "not a target layer .skipped: outside"),
    (dict(densities={"model.layers.0.mlp.up_proj": 0}), r"densities\['model.layers.0.mlp.up_proj'\]"),
    (dict(include=["nothing.*"]), r"no layer to prune in LlamaForCausalLM: .*include=\['nothing.\*'\]"),
    (dict(factorization_options={"outer_iter": 3}), r"no option\(s\) \['outer_iter'\]"),
    (dict(factorization_options={"outer_iters": 0}), r"factorization_options: outer_iters must be an integer >= 1"),
    (dict(factorization_options={"finalize": ["third"]}), "finalize must name 'first' and/or 'second'"),
    (dict(factorization_options={"damping": float("nan")}), "damping must be a finite number >= 0, got nan"),
    (dict(factorization_options={"preset": "cnn"}), r"preset must be one of \('vision', 'llm'\), got 'cnn'"),
    (dict(density=1e-5), "keeps no weight"),
    (dict(forward_mode="fast"), "forward_mode must be"),
])
def test_bad_arguments_fail_before_work(kwargs, match, no_factorize):
    model = llama()
    snap = snapshot(model)
    args = {"density": 0.3, "method": "dsf", **kwargs}
    calls = []
    with pytest.raises(ValueError, match=match):
        prune(model, args.pop("density"), args.pop("method"), progress=False,
              calibration=None, forward=lambda m, b: calls.append(b), **args)
    assert not calls
    assert_unchanged(model, snap)


def test_a_bad_dsf_option_value_fails_before_calibration_reads_a_batch(no_factorize):
    model = llama()
    snap = snapshot(model)
    read = []

    def batches():
        read.append(1)
        yield torch.zeros(1, 4, dtype=torch.long)

    with pytest.raises(ValueError, match="factorization_options: fixed_mask must be a bool, got 'yes'"):
        prune(model, 0.3, "dsf", calibration=batches(), factorization_options={"fixed_mask": "yes"}, progress=False)
    assert not read
    assert_unchanged(model, snap)


def test_density_by_keyword_positional_or_config_is_the_same_prune():
    from dsf_lightning.config import PruneConfig

    made = []
    for call in (lambda m: prune(m, density=0.3, method="magnitude", progress=False),
                 lambda m: prune(m, 0.3, "magnitude", progress=False),
                 lambda m: prune(m, PruneConfig(density=0.3, method="magnitude"), progress=False)):
        torch.manual_seed(0)  # the same random model each time
        model = llama()
        call(model)
        made.append(model.state_dict())
    for other in made[1:]:
        assert other.keys() == made[0].keys() and all(torch.equal(other[k], made[0][k]) for k in other)


@pytest.mark.parametrize("args, kwargs, match", [
    ((), {}, r"prune needs a density: prune\(model, 0.5\), prune\(model, density=0.5\)"),
    ((0.3,), {"density": 0.4}, r"density given twice: 0.3 \(positional\) and density=0.4"),
])
def test_density_missing_or_given_twice(args, kwargs, match, no_factorize):
    model = llama()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        prune(model, *args, progress=False, **kwargs)
    assert_unchanged(model, snap)


def test_dsf_square_share_too_large_fails_before_work(no_factorize):
    model = small_cnn()
    snap = snapshot(model)
    with pytest.raises(ValueError, match="layer '3': the square factor's share"):
        prune(model, 0.02, "dsf", family="vision", progress=False,  # square share 0.05 > density
              factorization_options={"square_share": 0.05})
    assert_unchanged(model, snap)


def test_pruning_a_pruned_model_names_the_layer():
    model = small_cnn()
    prune(model, 0.5, "magnitude", family="vision", progress=False)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layer '3' \(SparseConv2d\) is already pruned"):
        prune(model, 0.5, "magnitude", family="vision", progress=False)
    assert_unchanged(model, snap)


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
