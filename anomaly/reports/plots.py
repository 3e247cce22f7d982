"""Per reported metric (anomaly/metrics/registry.py) a grouped bar chart of a set of runs (categories on x,
a bar per method, ± std over seeds)."""

import math
from pathlib import Path
from statistics import mean, stdev

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from anomaly.metrics.registry import Metric, reported_metrics
from anomaly.reports.collect import method_label
from anomaly.reports.tables import aggregate


def save_plots(rows: list[dict], folder: Path) -> list[Path]:
    """One grouped bar chart per reported metric with results, ``<key>.png``: categories on x, a bar per
    method label (mean, ± std over seeds)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    categories = sorted({str(r["category"]) for r in rows})
    labels = sorted({method_label(r) for r in rows})
    for metric in reported_metrics():
        values = aggregate(rows, metric.key)
        if not values:
            continue
        figure = Figure(figsize=(max(6, 0.9 * len(categories) * max(1, len(labels))), 3.5))
        axis = figure.subplots()
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            per_category = [list(values.get((c, label), {}).values()) for c in categories]
            heights = [mean(v) if v else math.nan for v in per_category]
            errors = [stdev(v) if len(v) > 1 else 0.0 for v in per_category]
            axis.bar(
                [x + i * width for x in range(len(categories))], heights, width, yerr=errors, label=label
            )
        axis.set_xticks(
            [x + 0.4 - width / 2 for x in range(len(categories))], categories, rotation=30, ha="right"
        )
        share_axis(axis, metric, [v for by_seed in values.values() for v in by_seed.values()])
        axis.set_ylabel(metric.label)
        axis.legend(fontsize=8)
        figure.tight_layout()
        paths.append(folder / f"{metric.key}.png")
        figure.savefig(paths[-1], dpi=90)
    return paths


def share_axis(axis: Axes, metric: Metric, values: list[float]) -> None:
    """A share that is better high (low) gets an axis ending at 1 (0) and starting just beyond its worst
    value, so that close results stay apart; any other metric keeps matplotlib's range."""
    if not metric.percent or metric.higher_is_better is None:
        return
    if metric.higher_is_better:
        axis.set_ylim(max(0.0, min(values) - 0.05), 1.0)
    else:
        axis.set_ylim(0.0, min(1.0, max(values) + 0.05))
