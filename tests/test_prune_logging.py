"""How a prune is logged (callbacks/prune_logging.py): totals as dsf/ metrics, layers as scalars or a W&B table."""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from torch import nn

from dsf_lightning.callbacks.prune_logging import log_report, report_totals
from dsf_lightning.pipeline.entry import prune


def _report():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    return prune(model, 0.5, "magnitude", progress=False)


def test_totals_do_not_collide_with_the_layer_table():
    totals = report_totals(_report())
    assert totals["dsf/layers_pruned"] == 2.0 and "dsf/layers" not in totals
    assert "dsf/layers_skipped" in totals and all(k.startswith("dsf/") for k in totals)


def test_loggers_without_tables_get_per_layer_scalars_only_when_asked(tmp_path):
    report = _report()
    for scalars in (False, True):
        lg = CSVLogger(tmp_path, name=f"scalars{scalars}")
        log_report([lg], report, step=3, layer_scalars=scalars)
        lg.save()
        with open(f"{lg.log_dir}/metrics.csv") as f:
            columns = set(next(csv.reader(f)))
        assert {"dsf/layers_pruned", "dsf/nnz"} <= columns
        assert ("dsf/layers/0/relative_error" in columns) is scalars
