"""Which layers a prune targets (pipeline/targets.py): family rules, include/exclude, skipped layers with reasons."""

from __future__ import annotations

from test_pruning import (  # the shared models and checks of the pruning tests
    gpt2,
    llama,
    resnet18,
    small_cnn,
)
from torch import nn

from dsf_lightning.modules import SparseConv2d
from dsf_lightning.pipeline.entry import prune
from dsf_lightning.pipeline.targets import detect_family, find_targets


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
