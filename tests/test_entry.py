"""The entry point (pipeline/entry.py): it seeds every prune, leaves the caller's RNGs alone, picks the runner."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import dsf_lightning.pipeline.entry as entry
from dsf_lightning.pipeline.entry import prune, seeded


def test_seeded_starts_from_the_seed_and_restores_every_rng():
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    with seeded(3):
        inside = torch.rand(4)
        random.random()
        np.random.rand()
    torch.manual_seed(3)
    assert torch.equal(inside, torch.rand(4))
    torch.set_rng_state(before[0])
    after = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    assert torch.equal(after[0], before[0]) and after[1] == before[1] and np.array_equal(after[2], before[2])


def test_a_prune_does_not_move_the_callers_rng():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    prune(model, 0.5, "magnitude", progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("sequential", [False, True])
def test_the_entry_point_picks_the_runner_the_config_asks_for(monkeypatch, sequential):
    called = []
    for name in ("run_one_pass", "run_blocks"):
        monkeypatch.setattr(entry, name, lambda *a, _n=name, **k: called.append(_n) or entry.PruneReport("m", "f", 1))
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))  # the last Linear is the head, kept dense
    prune(model, 0.5, "magnitude", sequential=sequential, calibration=[torch.randn(2, 8)], progress=False)
    assert called == ["run_blocks" if sequential else "run_one_pass"]


def test_grams_and_calibration_together_are_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="either calibration or grams"):
        prune(model, 0.5, "magnitude", calibration=[torch.randn(2, 8)], grams={"0": torch.eye(8)}, progress=False)
