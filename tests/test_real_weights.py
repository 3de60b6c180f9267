"""DSF on the real pretrained SmolLM2-135M weights (offline), against the baselines.

Two experiments of the paper, on a budget that fits 2 CPU cores:

* Projection (data-free, ``G = I``; section 5.x fine-tuning experiments): DSF's
  ``||W - S F||_F^2`` at density 0.25 compared with magnitude pruning at the same nnz.
* Layer-wise (``G = X^T X / N`` from Wikipedia windows through the real model; the LLM
  experiments): DSF with ``preset="llm"`` against Wanda and ADMM pruning at densities
  0.5 / 0.4 / 0.3.

Run with ``pytest -s`` to see the tables of figures.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from dsf_lightning.factorization import factorize, reconstruction_error
from dsf_lightning.pipeline.calibration import InputGramRecorder

pytestmark = pytest.mark.slow

PROJECTION_DENSITY = 0.25
PROJECTION_MAX_MEAN_RATIO = 0.6
# (decoder layer, projection). k/v (192x576) take ~1 s with the paper's 40x5 iterations on
# one core, q/o (576x576) ~7 s, the MLP matrices ~12 s: all seven kinds of the middle layer,
# the cheap ones of the first and last layer.
_SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTION_MATRICES = [(0, "k_proj"), (0, "v_proj"), *((15, p) for p in _SEVEN), (29, "k_proj"), (29, "v_proj")]
LAYERWISE_DENSITIES = (0.5, 0.4, 0.3)
# v_proj and down_proj are where ADMM pruning comes closest (inputs with outlier channels)
LAYERWISE_MATRICES = [(0, "k_proj"), (0, "v_proj"), *((15, p) for p in ("q_proj", "v_proj", "down_proj"))]


def _linear(model, layer: int, proj: str) -> torch.nn.Linear:
    block = model.model.layers[layer]
    return getattr(block.mlp if proj in ("gate_proj", "up_proj", "down_proj") else block.self_attn, proj)


@pytest.fixture(scope="module")
def projection_results(smollm2):
    model, _ = smollm2
    rows = []
    for layer, proj in PROJECTION_MATRICES:
        w = _linear(model, layer, proj).weight.detach().float()
        t0 = time.perf_counter()
        dsf = factorize("dsf", w, PROJECTION_DENSITY)
        seconds = time.perf_counter() - t0
        mag = factorize("magnitude", w, PROJECTION_DENSITY)
        rows.append({
            "name": f"{layer}.{proj}", "shape": tuple(w.shape), "numel": w.numel(),
            "dsf": reconstruction_error(w, dsf.product), "magnitude": reconstruction_error(w, mag.product),
            "dsf_nnz": dsf.nnz, "magnitude_nnz": mag.nnz, "seconds": seconds,
        })
    print(f"\nprojection, density {PROJECTION_DENSITY}: ||W - P||_F^2")
    print(f"{'matrix':<14}{'shape':>12}{'dsf':>11}{'magnitude':>11}{'ratio':>8}{'dsf s':>8}")
    for r in rows:
        print(f"{r['name']:<14}{str(r['shape']):>12}{r['dsf']:>11.4f}{r['magnitude']:>11.4f}"
              f"{r['dsf'] / r['magnitude']:>8.3f}{r['seconds']:>8.1f}")
    print(f"mean ratio {sum(r['dsf'] / r['magnitude'] for r in rows) / len(rows):.3f}")
    return rows


def test_projection_dsf_beats_magnitude(projection_results):
    ratios = {r["name"]: r["dsf"] / r["magnitude"] for r in projection_results}
    mean = sum(ratios.values()) / len(ratios)
    assert mean <= PROJECTION_MAX_MEAN_RATIO, ratios


def test_projection_respects_nnz_budget(projection_results):
    for r in projection_results:
        budget = math.floor(PROJECTION_DENSITY * r["numel"])
        assert r["dsf_nnz"] <= budget, r
        assert r["magnitude_nnz"] <= budget, r


@pytest.fixture(scope="module")
def layerwise_results(smollm2, wiki_token_batches):
    model, _ = smollm2
    modules = {f"{layer}.{proj}": _linear(model, layer, proj) for layer, proj in LAYERWISE_MATRICES}
    with InputGramRecorder(model, modules) as rec, torch.no_grad():
        model(wiki_token_batches)
    grams = rec.grams
    rows = []
    for name, module in modules.items():
        w, g = module.weight.detach().float(), grams[name]
        for density in LAYERWISE_DENSITIES:
            errors = {}
            for method, options in (("dsf", {"preset": "llm"}), ("wanda", {}), ("admm", {})):
                fac = factorize(method, w, density, gram=g, **options)
                assert fac.nnz <= math.floor(density * w.numel()), (name, method, density)
                errors[method] = reconstruction_error(w, fac.product, g)
            rows.append({"name": name, "density": density, **errors})
    print(f"\nlayer-wise, Wikipedia {tuple(wiki_token_batches.shape)} tokens: tr((W-P) G (W-P)^T)")
    print(f"{'matrix':<12}{'density':>8}{'dsf':>11}{'wanda':>11}{'admm':>11}{'dsf/wanda':>10}{'dsf/admm':>10}")
    for r in rows:
        print(f"{r['name']:<12}{r['density']:>8.2f}{r['dsf']:>11.5f}{r['wanda']:>11.5f}{r['admm']:>11.5f}"
              f"{r['dsf'] / r['wanda']:>10.3f}{r['dsf'] / r['admm']:>10.3f}")
    for density in LAYERWISE_DENSITIES:
        sel = [r for r in rows if r["density"] == density]
        print(f"density {density}: mean dsf/wanda {sum(r['dsf'] / r['wanda'] for r in sel) / len(sel):.3f}, "
              f"mean dsf/admm {sum(r['dsf'] / r['admm'] for r in sel) / len(sel):.3f}")
    return rows


def test_layerwise_recorded_real_activations(layerwise_results):
    assert all(math.isfinite(r[m]) and r[m] > 0 for r in layerwise_results for m in ("dsf", "wanda", "admm"))


@pytest.mark.parametrize("density", LAYERWISE_DENSITIES)
def test_layerwise_dsf_beats_wanda_per_matrix(layerwise_results, density):
    for r in (r for r in layerwise_results if r["density"] == density):
        assert r["dsf"] < r["wanda"], r


@pytest.mark.parametrize("density", LAYERWISE_DENSITIES)
def test_layerwise_dsf_beats_admm_per_matrix(layerwise_results, density):
    # With the paper's LLM finalization (S only) ADMM pruning wins on v_proj and down_proj
    # (dsf/admm 1.1-1.5); refitting F as well (the default) wins on every matrix.
    for r in (r for r in layerwise_results if r["density"] == density):
        assert r["dsf"] < r["admm"], r
