"""The block-by-block runner (pipeline/blocks.py): the same factors as pruning a block alone on the same inputs,
shared Grams for shared inputs, a working set that does not grow with depth, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dsf_lightning.config import PruneConfig
from dsf_lightning.pipeline.blocks import BlockRun, _shared_inputs, decoder_blocks
from dsf_lightning.pipeline.entry import prune
from dsf_lightning.pipeline.plan import plan_prune

FAST = {"outer_iters": 3}


def llama(layers: int = 2) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def batches(n: int = 3) -> list[torch.Tensor]:
    return [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def no_cache(model: nn.Module, ids: torch.Tensor):
    """The blocks run without a KV cache in both paths, so both compute attention the same way."""
    return model(input_ids=ids, use_cache=False)


def sequential(density: float = 0.5, **kw) -> PruneConfig:
    return PruneConfig(density=density, sequential=True, calibration_batches=None, factorization_options=FAST, **kw)


def _same_factors(a: nn.Module, b: nn.Module, names: list[str]) -> None:
    for n in names:
        for (pa, ma), (pb, mb) in zip(a.get_submodule(n).masked_parameters(), b.get_submodule(n).masked_parameters()):
            assert torch.equal(ma, mb) and torch.equal(pa, pb), n


def test_each_block_is_pruned_on_the_outputs_of_the_pruned_blocks_before_it():
    model = llama()
    dense = copy.deepcopy(model)
    report = prune(model, sequential(), calibration=batches(), forward=no_cache, progress=False)
    assert len(report.layers) == 14 and report.working_set_bytes > 0
    block = lambda i: [r.name for r in report.layers if r.name.startswith(f"model.layers.{i}.")]  # noqa: E731
    # block 0 sees the embeddings: the same problem as pruning it alone in one pass of the dense model
    alone = copy.deepcopy(dense)
    prune(alone, 0.5, "dsf", include=[r"model\.layers\.0\..*"], calibration=batches(), forward=no_cache,
          factorization_options=FAST, progress=False)
    _same_factors(model, alone, block(0))
    # block 1 sees the outputs of the pruned block 0: prune block 1 alone behind that same pruned block 0
    prune(alone, 0.5, "dsf", include=[r"model\.layers\.1\..*"], calibration=batches(), forward=no_cache,
          factorization_options=FAST, progress=False)
    _same_factors(model, alone, block(1))


def test_shared_inputs_share_one_gram():
    model = llama()
    plan = plan_prune(model, sequential())
    run = BlockRun()
    name, block = decoder_blocks(model)[0]
    run.capture(model, block, batches(1), lambda m, b: m(input_ids=b))
    targets = {n: m for n, m in plan.targets.items() if n.startswith(name + ".")}
    shared = _shared_inputs(block, run, targets)
    reps = {n.rsplit(".", 1)[1]: r.rsplit(".", 1)[1] for n, r in shared.items()}
    assert reps == {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj",
                    "gate_proj": "gate_proj", "up_proj": "gate_proj", "down_proj": "down_proj"}


def test_working_set_does_not_grow_with_depth():
    peaks = [prune(llama(n), sequential(0.3), calibration=batches(), progress=False).working_set_bytes
             for n in (2, 4)]
    assert peaks[0] == peaks[1]


def test_decoder_blocks_without_no_split_modules():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.fc(x)

    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(Block(), Block(), Block()), nn.Linear(8, 2))
    assert [n for n, _ in decoder_blocks(model)] == ["1.0", "1.1", "1.2"]
    data = [torch.randn(4, 8) for _ in range(2)]
    report = prune(model, sequential(family="llm"), calibration=data, progress=False)
    assert [r.name for r in report.layers] == ["1.0.fc", "1.1.fc", "1.2.fc"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(sequential=True), "set calibration_batches > 0"),
])
def test_bad_sequential_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneConfig(density=0.5, **kwargs)


@pytest.mark.parametrize("method", ["wanda", "dsf"])
def test_sequential_global_allocation_spends_the_model_budget_from_dense_input_norms(method):
    """The densities are allocated before block 0 from the dense model's input norms (only the Grams'
    diagonals are recorded): the same densities as allocating from the dense model's full Grams, the
    layers differ, and the nonzeros sum exactly to the model-wide budget."""
    from dsf_lightning.pipeline.calibration import record_grams
    from dsf_lightning.pipeline.plan import allocate_densities

    model, data = llama(), batches()
    cfg = PruneConfig(density=0.4, method=method, sequential=True, calibration_batches=None, allocation="global",
                      factorization_options=FAST if method == "dsf" else {})
    plan = plan_prune(model, cfg)
    full = record_grams(model, plan.targets, data, no_cache).grams
    expected = allocate_densities(plan, full).densities
    report = prune(model, cfg, calibration=data, forward=no_cache, progress=False)
    got = {r.name: r.density for r in report.layers}
    assert got == pytest.approx({n: expected[n] for n in got}, abs=1e-12)
    assert len({round(d, 4) for d in got.values()}) > 1  # not uniform
    numel = sum(r.shape[0] * r.shape[1] for r in report.layers)
    assert sum(r.nnz for r in report.layers) <= int(0.4 * numel)
    assert sum(r.budget for r in report.layers) == int(0.4 * numel)


def test_targets_outside_the_blocks_are_refused_before_work():
    model = llama()
    with pytest.raises(ValueError, match=r"\['lm_head'\] are outside the blocks"):
        prune(model, sequential(include=[r"model\.layers\.0\.mlp\..*", "lm_head"]), calibration=batches(),
              progress=False)
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
