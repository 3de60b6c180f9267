"""Pruning full-size real architectures: torchvision ResNet-50 and the pretrained SmolLM2-135M."""

from __future__ import annotations

import math

import pytest
import torch
from numerics import assert_rel_close  # tests/ is on sys.path

from dsf_lightning.modules import DSFConv2d, DSFLinear, SparseConv2d
from dsf_lightning.persistence.structure import load_pruned, save_pruned, to_dense
from dsf_lightning.pipeline.entry import prune
from dsf_lightning.pipeline.targets import find_targets


def test_resnet50_paper_targets_prune_and_round_trip(tmp_path):
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    targets, skipped = find_targets(model, family="vision")
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert set(targets) == set(convs) - {"conv1"} and "fc" in skipped and "conv1" in skipped
    # magnitude on every target (fast), DSF on one bottleneck block to exercise conv factors
    prune(model, 0.1, "magnitude", exclude=[r"layer1\.0\..*"], progress=False)
    prune(model, 0.1, "dsf", include=[r"layer1\.0\.conv[123]"], progress=False,
          factorization_options={"outer_iters": 2})
    assert isinstance(model.layer1[0].conv2, DSFConv2d) and isinstance(model.layer4[2].conv3, SparseConv2d)
    for name, m in model.named_modules():
        if name in targets and name != "layer1.0.downsample.0":
            assert m.nnz <= math.floor(0.1 * m.merged_weight().numel()), name
    save_pruned(model, tmp_path / "r50.pt")
    fresh = load_pruned(torchvision.models.resnet50(weights=None).eval(), tmp_path / "r50.pt")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))


@pytest.mark.slow
def test_smollm2_block_prune_round_trip_and_merge(smollm2, wiki_token_batches, tmp_path):
    from dsf_lightning.data import load_smollm2

    model, _ = smollm2
    targets, _ = find_targets(model)
    assert len(targets) == 30 * 7 and not any("embed" in n or "lm_head" in n for n in targets)
    pruned, _ = load_smollm2()
    batches = wiki_token_batches[:4].split(2)
    report = prune(pruned, 0.5, "dsf", include=[r"model\.layers\.2\..*"], calibration=batches,
                   progress=False, factorization_options={"outer_iters": 4})
    assert len(report.layers) == 7 and all(r.nnz <= r.budget for r in report.layers)
    assert isinstance(pruned.model.layers[2].mlp.down_proj, DSFLinear)
    save_pruned(pruned, tmp_path / "smol.pt")
    fresh = load_pruned(load_smollm2()[0], tmp_path / "smol.pt")
    ids = wiki_token_batches[4:6]
    with torch.no_grad():
        logits = pruned(input_ids=ids).logits
        assert torch.equal(logits, fresh(input_ids=ids).logits)
        to_dense(fresh)
        # S @ F formed once vs x F^T S^T: fp32 rounding through 30 blocks of (576 + 576 + 1536)-term dots
        assert_rel_close(fresh(input_ids=ids).logits, logits, depth=30 * (576 + 576 + 1536), dtype=torch.float32)
        # one block at 50% barely moves the model: next-token loss within 10% of dense
        dense = model(input_ids=ids, labels=ids).loss
        assert pruned(input_ids=ids, labels=ids).loss < 1.1 * dense
