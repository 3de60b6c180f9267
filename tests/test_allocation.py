"""Allocation of a model-wide budget over layers: exact totals, bounds, the rules' preferences, prune()."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dsf_lightning.config import PruneConfig
from dsf_lightning.factorization import nnz_budget
from dsf_lightning.pipeline.allocation import allocate, check_allocation_options, layer_scores
from dsf_lightning.pipeline.entry import prune


def _scores() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    spiky = torch.randn(40, 50, generator=g) * 0.01
    spiky[:, :3] = 5.0  # its energy sits in a few weights: cheap to keep
    flat = torch.ones(30, 60) + 0.01 * torch.rand(30, 60, generator=g)  # every weight matters alike
    mixed = torch.randn(64, 32, generator=g)
    return {"spiky": spiky.abs(), "flat": flat, "mixed": mixed.abs()}


def _budgets(densities: dict[str, float], scores: dict[str, torch.Tensor]) -> int:
    return sum(nnz_budget(d, scores[n].numel()) for n, d in densities.items())


@pytest.mark.parametrize("rule", ["global", "owl"])
@pytest.mark.parametrize("density", [0.05, 0.1, 0.3, 0.5])
def test_budget_sums_exactly_within_bounds(rule, density):
    scores = _scores()
    minimum = {n: 0.0 for n in scores}
    d = allocate(rule, scores, density, minimum, min_ratio=0.25, max_ratio=3.0)
    total = sum(s.numel() for s in scores.values())
    assert _budgets(d, scores) == math.floor(density * total)
    for n, x in d.items():
        assert 0.25 * density - 1e-12 <= x <= min(1.0, 3.0 * density) + 1 / scores[n].numel(), (n, x)


def test_global_spends_where_the_marginal_error_is_largest():
    d = allocate("global", _scores(), 0.2, {n: 0.0 for n in _scores()})
    assert d["flat"] > 0.2 > d["spiky"]  # three columns hold the spiky layer's energy


def test_owl_gives_outlier_rich_layers_more():
    scores = _scores()
    d = allocate("owl", scores, 0.5, {n: 0.0 for n in scores}, lam=0.1)
    assert d["spiky"] > d["mixed"] and d["spiky"] - d["flat"] == pytest.approx(0.2, abs=0.02)


def test_minimum_and_bad_bounds():
    scores = _scores()
    d = allocate("global", scores, 0.2, {"spiky": 0.15, "flat": 0.0, "mixed": 0.0})
    assert d["spiky"] >= 0.15  # the method's minimum wins over the rule
    with pytest.raises(ValueError, match="bounds admit .* the budget is"):
        allocate("global", scores, 0.2, {n: 0.9 for n in scores})
    assert allocate("uniform", scores, 0.2, {}) == {n: 0.2 for n in scores}


@pytest.mark.parametrize("rule, options, match", [
    ("greedy", {}, "allocation must be one of"),
    ("global", {"lam": 0.1}, r"has no option\(s\) \['lam'\]"),
    ("owl", {"lam": -1}, "must be a number >= 0"),
    ("global", {"min_ratio": 2.0}, "min_ratio <= 1 <= max_ratio"),
])
def test_bad_options(rule, options, match):
    with pytest.raises(ValueError, match=match):
        check_allocation_options(rule, options)
    with pytest.raises(ValueError, match=match):
        PruneConfig(density=0.3, allocation=rule, allocation_options=options)


def test_scores_use_the_input_norms():
    w = torch.tensor([[1.0, -2.0]])
    gram = torch.diag(torch.tensor([4.0, 0.25]))
    assert torch.equal(layer_scores(w, gram), torch.tensor([[2.0, 1.0]]))
    assert torch.equal(layer_scores(w), torch.tensor([[1.0, 2.0]]))


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(),
              nn.Linear(24, 10)]
    with torch.no_grad():
        layers[2].weight[:, :4] *= 30  # an outlier-heavy layer
    return nn.Sequential(*layers)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "admm", "dsf"])
@pytest.mark.parametrize("allocation", ["global", "owl"])
def test_prune_with_a_model_budget(method, allocation):
    model = _mlp()
    batches = [torch.randn(16, 32) for _ in range(2)]
    report = prune(model, 0.3, method, family="vision", include=[r"[0246]"], allocation=allocation,
                   densities={"6": 0.5}, calibration=batches if method == "wanda" else None,
                   factorization_options={"outer_iters": 2} if method == "dsf" else None, progress=False)
    rows = {r.name: r for r in report.layers}
    assert rows["6"].density == 0.5  # an override keeps its density
    numel = sum(r.shape[0] * r.shape[1] for r in report.layers)
    assert report.budget == math.floor(0.3 * numel)  # the model budget, exactly
    assert all(r.nnz <= r.budget for r in report.layers) and report.nnz <= report.budget
    if method == "magnitude":
        assert report.nnz == report.budget
    assert len({round(r.density, 6) for r in report.layers}) > 1  # densities were spread


def test_allocation_that_cannot_fit_fails_before_work():
    model = _mlp()
    with pytest.raises(ValueError, match="bounds admit"):
        prune(model, 0.3, "magnitude", family="vision", include=[r"[0246]"], allocation="global",
              densities={"0": 1.0, "2": 1.0}, progress=False)
    assert all(type(m) in (nn.Linear, nn.ReLU) for m in model)
