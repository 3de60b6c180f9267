"""The distributed step's pure parts (pipeline/distributed.py); its collectives run in tests/test_callback_ddp.py."""

from __future__ import annotations

from dsf_lightning.pipeline.distributed import balance_layers, world


def test_balance_layers_is_cost_balanced():
    owners = balance_layers([100, 1, 60, 50, 10], 2)
    loads = [sum(c for c, o in zip([100, 1, 60, 50, 10], owners) if o == r) for r in range(2)]
    assert owners[0] != owners[2] and abs(loads[0] - loads[1]) <= 100
    assert balance_layers([5, 5, 5], 1) == [0, 0, 0]


def test_balance_layers_gives_every_rank_a_share_when_there_are_enough_layers():
    owners = balance_layers([7, 7, 7, 7], 4)
    assert sorted(owners) == [0, 1, 2, 3]


def test_world_without_a_process_group_is_one_process():
    assert world() == (0, 1)
