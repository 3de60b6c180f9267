"""How a prune is logged, once for every caller: its totals as ``dsf/`` metrics, its layers as a table or scalars.

W&B loggers get the per-layer table ``dsf/layers`` (one row per pruned layer); other loggers get per-layer
scalars ``dsf/layers/<name>/<field>`` only when asked (many columns). ``DSFPruneCallback`` and the LLM
recipe both log through :func:`log_report`, so the names on a dashboard do not depend on the entry point.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from dsf_lightning.pipeline.report import PruneReport

__all__ = ["LAYER_SCALARS", "log_report", "report_totals"]

#: The per-layer fields logged as scalars for loggers without tables.
LAYER_SCALARS = ("achieved_density", "first_density", "second_density", "relative_error", "error_vs_magnitude",
                 "seconds")


def report_totals(report: PruneReport) -> dict[str, float]:
    """``dsf/<total>`` metrics of ``report``; the counts ``layers``/``skipped`` are renamed ``layers_pruned`` /
    ``layers_skipped`` so they do not collide with the ``dsf/layers`` table."""
    renamed = {"layers": "layers_pruned", "skipped": "layers_skipped"}
    return {f"dsf/{renamed.get(k, k)}": float(v) for k, v in report.totals().items()}


@rank_zero_only
def log_report(loggers: Sequence[Logger], report: PruneReport, step: int, layer_scalars: bool = False) -> None:
    """Log ``report`` to every logger (rank zero only): the totals at ``step``, then the layers."""
    totals, rows = report_totals(report), report.to_rows()
    for lg in loggers:
        lg.log_metrics(totals, step=step)
        if not rows:
            continue
        if isinstance(lg, WandbLogger):
            columns = list(rows[0])
            lg.log_table(key="dsf/layers", columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        elif layer_scalars:
            lg.log_metrics({f"dsf/layers/{row['name']}/{k}": float(row[k]) for row in rows for k in LAYER_SCALARS
                            if row.get(k) is not None}, step=step)
