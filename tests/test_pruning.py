"""Whole-model pruning through prune(): layer-wise methods, batches of every shape, and refusing bad input.

The models and checks here are shared by test_targets.py, test_structure.py and test_jobs.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import dsf_lightning.pipeline.jobs as jobs
from dsf_lightning.modules import DSFConv2d, DSFLinear, SparseLinear
from dsf_lightning.pipeline.entry import prune

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






# ---------------------------------------------------------------------------------------------
# target selection
# ---------------------------------------------------------------------------------------------












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




