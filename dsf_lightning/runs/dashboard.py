"""The W&B dashboard: a Report of the paper's figures, metric against density per method, before and after fine-tuning.

    python -m dsf_lightning.runs.dashboard --entity ME --project dsf-cifar10   # val_acc
    python -m dsf_lightning.runs.dashboard --entity ME --project dsf-llm --metric ppl/wikipedia --log-y

Reads nothing locally: the Report queries the project's runs by the conventions every recipe (and
``DSFPruneCallback`` through them) logs by (docs/ARCHITECTURE.md, "W&B conventions"): the run config's
``identity`` (model, method, density, seed, allocation, options) and the summary's ``<stage>/<metric>``.
Each panel is a scatter of ``identity.density`` against one stage's summary metric with the runs grouped
by method, so every method is one series and its seeds are averaged; a runs table lists every run's
identity and stages. Needs the ``wandb-workspaces`` package (``pip install 'dsf-lightning[dashboard]'``)
and W&B credentials; offline, use ``dsf-compare`` on the local runs instead (same figures as PNGs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["STAGES_SHOWN", "build_report", "main"]

#: Stages shown side by side: the one-shot result and the fine-tuned one, the dense model for reference.
STAGES_SHOWN = ("dense", "pre_finetune", "post_finetune")


def build_report(entity: str, project: str, metric: str = "val_acc", *, title: str | None = None,
                 group: str | None = None, log_y: bool = False) -> Any:
    """The unsaved ``wandb_workspaces`` Report (``.save()`` publishes it). ``group`` restricts it to one
    experiment (a W&B group); ``log_y`` for perplexity."""
    import wandb_workspaces.reports.v2 as wr

    filters = f"Group == '{group}'" if group else ""
    runset = wr.Runset(entity=entity, project=project, name="pruned runs", filters=filters,
                       groupby=["identity.model", "identity.method", "identity.allocation"])
    panels = [wr.ScatterPlot(title=f"{stage}/{metric} vs density", x=wr.Config("identity.density"),
                             y=wr.SummaryMetric(f"{stage}/{metric}"), log_y=log_y or None)
              for stage in STAGES_SHOWN]
    blocks = [
        wr.H1(f"{metric} against density, one series per method"),
        wr.P("Each point is a method at a density (seeds averaged within a group); left to right: the dense "
             "model, the one-shot pruned model and the fine-tuned model, as in the DSF paper's figures."),
        wr.PanelGrid(runsets=[runset], panels=panels),
    ]
    return wr.Report(project=project, entity=entity, title=title or f"DSF: {metric} vs density ({project})",
                     description="made by python -m dsf_lightning.runs.dashboard", blocks=blocks, width="fluid")


def main(argv: Sequence[str] | None = None) -> int:
    """Build the Report and save it to W&B; prints its URL."""
    p = argparse.ArgumentParser(prog="python -m dsf_lightning.runs.dashboard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entity", required=True, help="W&B entity (user or team) that owns the project")
    p.add_argument("--project", required=True, help="W&B project, e.g. dsf-cifar10 or dsf-llm")
    p.add_argument("--metric", default="val_acc", help="summary metric after the stage prefix (default: val_acc)")
    p.add_argument("--group", default=None, help="only runs of this W&B group (one experiment)")
    p.add_argument("--title", default=None, help="Report title")
    p.add_argument("--log-y", action="store_true", help="log scale for the metric (perplexity)")
    args = p.parse_args(argv)
    try:
        report = build_report(args.entity, args.project, args.metric, title=args.title, group=args.group,
                              log_y=args.log_y)
    except ImportError:
        print("dashboard: error: needs wandb-workspaces: pip install 'dsf-lightning[dashboard]'", file=sys.stderr)
        return 2
    from dsf_lightning.recipes.common import wandb_has_credentials

    if not wandb_has_credentials():
        print("dashboard: error: no W&B credentials (WANDB_API_KEY or `wandb login`); offline, compare local runs "
              "with dsf-compare", file=sys.stderr)
        return 2
    report.save()
    print(report.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
