"""Per-metric grouped bar charts of a set of runs (categories on x, a bar per method, ± std over seeds)."""

import math
from pathlib import Path
from statistics import mean, stdev

from matplotlib.figure import Figure

from anomaly.reports.collect import METRICS, method_label
from anomaly.reports.tables import aggregate


def save_plots(rows: list[dict], folder: Path) -> list[Path]:
    """One grouped bar chart per metric: categories on x, a bar per method label (mean, ± std over seeds)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    categories = sorted({str(r["category"]) for r in rows})
    labels = sorted({method_label(r) for r in rows})
    for metric in METRICS:
        values = aggregate(rows, metric)
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
        axis.set_ylim(max(0.0, min(v for d in values.values() for v in d.values()) - 0.05), 1.0)
        axis.set_ylabel(metric)
        axis.legend(fontsize=8)
        figure.tight_layout()
        paths.append(folder / f"{metric}.png")
        figure.savefig(paths[-1], dpi=90)
    return paths
