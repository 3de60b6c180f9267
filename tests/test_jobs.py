"""Layer jobs (pipeline/jobs.py): equal-shape small layers solved in batches, with per-layer results."""

from __future__ import annotations

import torch
from test_pruning import FAST  # tests/ is on sys.path


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
