"""Per reported metric (anomaly/metrics/registry.py) a grouped bar chart of a set of runs (categories on x,
a bar per method, ± std over seeds), and for few-shot runs a learning curve (the metric against k)."""

import math
from pathlib import Path
from statistics import mean, stdev

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from anomaly.metrics.registry import Metric, reported_metrics
from anomaly.reports.collect import FEW_SHOT, PER_CATEGORY, method_label, of_protocol
from anomaly.reports.tables import aggregate, column_mean


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
        share_axis(axis, metric, [v for by_repeat in values.values() for v in by_repeat.values()])
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


def save_learning_curves(rows: list[dict], folder: Path) -> list[Path]:
    """Per reported metric with few-shot results, ``learning_curve_<key>.png``: the metric against k (log₂
    axis), a line per method label through the mean over draws (and seeds) with a ± std band, over the
    categories' mean per repeat when there are several, and the same method on all training images as a
    dashed horizontal line where the rows hold such runs for every category."""
    few = of_protocol(rows, FEW_SHOT)
    ks = sorted({row["shots"] for row in few})
    labels = sorted({method_label(row) for row in few})
    categories = sorted({str(row["category"]) for row in few})
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in reported_metrics():
        per_k = {k: aggregate([r for r in few if r["shots"] == k], metric.key) for k in ks}
        if not any(per_k.values()):
            continue
        full = aggregate(of_protocol(rows, PER_CATEGORY), metric.key)
        figure = Figure(figsize=(6, 4))
        axis = figure.subplots()
        everything = []
        for label in labels:
            points = [(k, means) for k in ks if (means := column_mean(per_k[k], categories, label))]
            if not points:
                continue
            x = [k for k, _ in points]
            y = [mean(values) for _, values in points]
            spread = [stdev(values) if len(values) > 1 else 0.0 for _, values in points]
            (line,) = axis.plot(x, y, marker="o", label=label)
            axis.fill_between(x, [a - b for a, b in zip(y, spread, strict=True)],
                              [a + b for a, b in zip(y, spread, strict=True)], color=line.get_color(),
                              alpha=0.2)  # fmt: skip
            everything += [v for _, values in points for v in values]
            if all_images := column_mean(full, categories, label):
                axis.axhline(mean(all_images), color=line.get_color(), linestyle="--", linewidth=1,
                             label=f"{label}, all images")  # fmt: skip
                everything += all_images
        axis.set_xscale("log", base=2)
        axis.set_xticks(ks, [str(k) for k in ks])
        axis.set_xlabel("k (normal training images)")
        axis.set_ylabel(metric.label)
        where = categories[0] if len(categories) == 1 else f"mean over {len(categories)} categories"
        axis.set_title(f"{metric.label}: {where}", fontsize=10)
        share_axis(axis, metric, everything)
        axis.legend(fontsize=7)
        figure.tight_layout()
        paths.append(folder / f"learning_curve_{metric.key}.png")
        figure.savefig(paths[-1], dpi=90)
    return paths
