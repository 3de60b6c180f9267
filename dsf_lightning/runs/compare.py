"""Comparing runs: metric by model, method and density (mean +- std over seeds) as a table and as plots.

    python -m dsf_lightning.runs.compare lightning_logs/ wandb/       # or the console command dsf-compare
    dsf-compare runs/ --metric val_acc --plot-dir plots/

Runs are read by :func:`dsf_lightning.runs.records.find_runs` (recipe ``results.json`` files, Lightning CSV
logs, offline W&B runs) and grouped by model, method, density and allocation. For every metric the
table has one row per group and one column per stage (dense, before fine-tuning, after BatchNorm
recalibration, after fine-tuning); a stage no run of the group reached shows as ``-`` (the group is
kept). Each plot (:func:`figure`) shows a single density as grouped bars per stage, and a sweep as the
metric against density on a log axis, a line per method, a panel per stage: the layout of the paper's
figures; seeds' spread as error bars, the dense model as a dashed line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsf_lightning.runs.records import STAGES, RunRecord, find_runs

__all__ = ["default_metrics", "figure", "group", "main", "markdown_table", "plot", "verdict"]

STAGE_TITLES = {"dense": "dense", "pre_finetune": "before FT", "bn_recalibrated": "BN-recalibrated",
                "post_finetune": "after FT"}


def default_metrics(records: Sequence[RunRecord]) -> list[str]:
    """``val_acc`` where the runs have it, every perplexity (``ppl/<eval text>``) they have, and their zero-shot
    accuracy per task (``zs/<task>/acc``) and over the tasks (``zs/mean/acc``)."""
    names = {m for r in records for stage in r.metrics.values() for m in stage}
    zero_shot = sorted(m for m in names if m.startswith("zs/") and m.endswith("/acc") and m != "zs/mean/acc")
    return ((["val_acc"] if "val_acc" in names else []) + sorted(m for m in names if m.startswith("ppl/"))
            + zero_shot + (["zs/mean/acc"] if "zs/mean/acc" in names else []))


def group(records: Sequence[RunRecord]) -> dict[tuple[str, str, float, str], list[RunRecord]]:
    """Runs by ``(model, method, density, allocation)``, sorted."""
    out: dict[tuple[str, str, float, str], list[RunRecord]] = {}
    for r in records:
        out.setdefault(r.key, []).append(r)
    return dict(sorted(out.items()))


def _scale(metric: str) -> float:
    return 100.0 if metric.endswith("acc") or metric.endswith("acc5") else 1.0


def _stats(runs: Sequence[RunRecord], stage: str, metric: str) -> tuple[float, float, int] | None:
    vals = [r.metrics[stage][metric] * _scale(metric) for r in runs if metric in r.metrics.get(stage, {})]
    if not vals:
        return None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)


def markdown_table(records: Sequence[RunRecord], metric: str) -> str:
    """One markdown table of ``metric`` (accuracies in %): a row per group, a column per stage."""
    groups = group(records)
    stages = [s for s in STAGES if any(_stats(runs, s, metric) for runs in groups.values())]
    lines = [f"{metric}{' (%)' if _scale(metric) == 100 else ''}, mean +- std over seeds (n):",
             "| model | method | density | allocation | " + " | ".join(STAGE_TITLES[s] for s in stages) + " |",
             "|---|---|---:|---|" + "---:|" * len(stages)]
    for (model, method, density, allocation), runs in groups.items():
        cells = []
        for s in stages:
            st = _stats(runs, s, metric)
            cells.append("-" if st is None else f"{st[0]:.2f} +- {st[1]:.2f} ({st[2]})")
        lines.append(f"| {model} | {method} | {density:g} | {allocation} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(records: Sequence[RunRecord], metric: str = "val_acc", method: str = "dsf",
            baseline: str = "magnitude", resolution: float = 0.0) -> str:
    """One sentence, computed from the runs: where ``method`` leads, ties or trails ``baseline`` after
    fine-tuning, per density. A difference of the seed means counts when it exceeds both the larger of the
    two seed standard deviations and ``resolution`` (e.g. one validation sample, in the metric's units)."""
    scale = _scale(metric)
    by: dict[tuple[str, float], list[float]] = {}
    for r in records:
        if metric in r.metrics.get("post_finetune", {}):
            by.setdefault((r.method, r.density), []).append(r.metrics["post_finetune"][metric] * scale)
    sign = -1.0 if metric.startswith("ppl") or metric.endswith("perplexity") else 1.0  # lower is better
    words: dict[str, list[str]] = {"leads": [], "ties": [], "trails": []}
    for density in sorted({d for m, d in by if m == method and (baseline, d) in by}):
        a, b = by[(method, density)], by[(baseline, density)]
        diff = statistics.fmean(a) - statistics.fmean(b)
        spread = max(statistics.stdev(x) if len(x) > 1 else 0.0 for x in (a, b))
        # runs log float32 metrics: a difference of exactly one sample must stay a tie after their rounding
        slack = 4 * 2.0 ** -23 * max(abs(v) for v in a + b)
        word = ("ties" if abs(diff) <= max(spread, resolution) + slack
                else "leads" if sign * diff > 0 else "trails")
        words[word].append(f"{density:g} ({diff:+.2f}, seed std {spread:.2f})")
    if not any(words.values()):
        return f"No density has fine-tuned runs of both {method} and {baseline}."
    parts = [f"{w} {baseline if i == 0 else 'it'} at {', '.join(ds)}"
             for i, (w, ds) in enumerate((w, ds) for w, ds in words.items() if ds)]
    return (f"After fine-tuning, {method} " + "; ".join(parts) + f" (difference of the seed means of {metric}, "
            f"{baseline} as the reference; a tie is within the larger seed std or {resolution:.2f}).")


def figure(records: Sequence[RunRecord], metric: str, model: str) -> Any:
    """The matplotlib ``Figure`` of ``metric`` for ``model``'s runs (mean over seeds, the std as error bars,
    the dense model as a dashed reference line).

    One density: grouped bars on a categorical axis, a group per stage (before FT, BN-recalibrated, after FT)
    and a bar per method, each labelled with its value. Several: a panel per stage, the metric against
    density on a log axis (ticks at the densities run), a line per method (and allocation): the layout of
    the paper's figures. Perplexities get a log metric axis.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = [r for r in records if r.model == model]
    groups = group(runs)
    stages = [s for s in STAGES if s != "dense" and any(_stats(m, s, metric) for m in groups.values())]
    densities = sorted({density for (_, _, density, _) in groups})
    series: dict[tuple[str, str], dict[str, list[tuple[float, float, float]]]] = {}
    for (_, method, density, allocation), members in groups.items():
        for stage in stages:
            if (st := _stats(members, stage, metric)) is not None:
                series.setdefault((method, allocation), {}).setdefault(stage, []).append((density, st[0], st[1]))
    dense = [st[0] for members in groups.values() if (st := _stats(members, "dense", metric))]
    unit = metric + (" (%)" if _scale(metric) == 100 else "")

    def label(method: str, allocation: str) -> str:
        return method if allocation == "uniform" else f"{method} ({allocation})"

    if len(densities) == 1:
        fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(stages), 4))
        width = 0.8 / max(1, len(series))
        for i, ((method, allocation), by_stage) in enumerate(sorted(series.items())):
            xs = [j for j, s in enumerate(stages) if s in by_stage]
            means = [by_stage[stages[j]][0][1] for j in xs]
            stds = [by_stage[stages[j]][0][2] for j in xs]
            bars = ax.bar([x - 0.4 + width * (i + 0.5) for x in xs], means, width, yerr=stds, capsize=3,
                          label=label(method, allocation))
            ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
        ax.set_xticks(range(len(stages)), [STAGE_TITLES[s] for s in stages])
        ax.set_title(f"{model}, density {densities[0]:g}")
        axes = [ax]
    else:
        # each panel its own metric range: after fine-tuning the methods differ by points, before by tens
        fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 4), squeeze=False)
        axes = list(axes[0])
        for ax, stage in zip(axes, stages):
            for (method, allocation), by_stage in sorted(series.items()):
                if stage in by_stage:
                    xs, ys, es = zip(*sorted(by_stage[stage]))
                    ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label(method, allocation))
            ax.set_xscale("log")
            ax.set_xticks(densities, [f"{d:g}" for d in densities])
            ax.minorticks_off()
            ax.set_title(f"{model}: {STAGE_TITLES[stage]}")
            ax.set_xlabel("density (log scale)")
            ax.grid(alpha=0.3)
    for ax in axes:
        if dense:
            ax.axhline(statistics.fmean(dense), linestyle="--", color="gray", label="dense")
        if metric.startswith("ppl/"):
            ax.set_yscale("log")
    axes[0].set_ylabel(unit)
    axes[-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return fig


def plot(records: Sequence[RunRecord], metric: str, path: str | Path, model: str) -> Path:
    """:func:`figure` of ``metric`` for ``model``'s runs, written as a PNG to ``path``."""
    import matplotlib.pyplot as plt

    fig = figure(records, metric, model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def main(argv: Sequence[str] | None = None) -> int:
    """``dsf-compare``: print the tables of the runs under the given paths and write the plots."""
    p = argparse.ArgumentParser(prog="dsf-compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="files or folders to search for runs (recursively)")
    p.add_argument("--metric", action="append", default=None,
                   help="metric to compare (repeatable; default: val_acc and every perplexity the runs have)")
    p.add_argument("--plot-dir", default="compare", help="where the PNG plots go (default: ./compare)")
    p.add_argument("--no-plots", action="store_true", help="print the tables only")
    args = p.parse_args(argv)
    try:
        records = find_runs(args.paths)
    except ValueError as e:
        print(f"dsf-compare: error: {e}", file=sys.stderr)
        return 2
    metrics = args.metric or default_metrics(records)
    if not metrics:
        print("dsf-compare: error: the runs hold no metric to compare (val_acc or ppl/<text>); pass --metric",
              file=sys.stderr)
        return 2
    print(f"{len(records)} runs in {len(group(records))} groups\n")
    for metric in metrics:
        print(markdown_table(records, metric) + "\n")
        if not args.no_plots:
            for model in sorted({r.model for r in records}):
                if any(metric in s for r in records if r.model == model for s in r.metrics.values()):
                    out = plot(records, metric, Path(args.plot_dir) / f"{_safe(model)}-{_safe(metric)}.png", model)
                    print(f"plot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
