"""Results as tables: results.csv, and per reported metric (anomaly/metrics/registry.py) a categories ×
methods table with the papers' numbers, and for few-shot runs a (category, method) × k table."""

import csv
from collections.abc import Sequence
from pathlib import Path
from statistics import mean, stdev

import yaml

from anomaly.data.btad import BTAD_CATEGORIES
from anomaly.data.mvtec import MVTEC_CATEGORIES
from anomaly.data.mvtec_ad2 import AD2_CATEGORIES
from anomaly.data.mvtec_loco import LOCO_CATEGORIES
from anomaly.data.real_iad import REAL_IAD_OBJECTS
from anomaly.data.visa import VISA_CATEGORIES
from anomaly.metrics.registry import Metric, reported_metrics
from anomaly.reports.collect import (
    FEW_SHOT,
    PER_CATEGORY,
    columns,
    method_label,
    of_protocol,
    on_all_images,
    one_line,
    repeat,
)

REFERENCES_FILE = Path(__file__).with_name("paper_results.yaml")
BENCHMARK_CATEGORIES = {  # data set config -> all its categories: a published mean needs all of them run
    "mvtec": MVTEC_CATEGORIES,
    "visa": VISA_CATEGORIES,
    "btad": BTAD_CATEGORIES,
    "mvtec_loco": LOCO_CATEGORIES,
    "mvtec_ad2": AD2_CATEGORIES,
    "real_iad": REAL_IAD_OBJECTS,
}
Table = tuple[list[str], list[list[str]]]  # header, body rows
FEW_SHOT_NOTE = (
    "Few-shot (docs/benchmarks.md, Protocols): each model fitted on k normal training images drawn by "
    "dataset.shot_draw; the test set is the full one. Cells: mean ± std over the draws (and seeds); "
    '"all images": the same method fitted on every training image, where such a run is among these.'
)
VALUES_NOTE = (
    "Mean ± std over seeds (few-shot: over draws and seeds); (%): shares ×100; ↑/↓: higher/lower is better."
)


def write_results_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns(), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def aggregate(rows: list[dict], metric: str) -> dict[tuple[str, str], dict[tuple[int, int], float]]:
    """(category, method label) → {repeat (seed, draw): metric} of the successful runs (rows of one setting
    per method label: of one protocol, and of one k for few-shot runs)."""
    table: dict[tuple[str, str], dict[tuple[int, int], float]] = {}
    for row in rows:
        if row["status"] == "ok" and row.get(metric) is not None:
            table.setdefault((str(row["category"]), method_label(row)), {})[repeat(row)] = float(row[metric])
    return table


def format_cell(values: Sequence[float], metric: Metric) -> str:
    """The mean, ± the sample std when there are several repeats, each as :func:`format_value` shows it."""
    cell = format_value(mean(values), metric)
    return cell if len(values) == 1 else f"{cell} ± {format_value(stdev(values), metric)}"


def format_value(value: float, metric: Metric) -> str:
    """One value as the tables show ``metric``: a share ×100 with one decimal, else 4 significant digits."""
    return f"{100 * value:.1f}" if metric.percent else f"{value:.4g}"


def heading(metric: Metric) -> str:
    """A metric table's title: its key (as in metrics.json), label, unit and which way is better."""
    better = {True: " ↑", False: " ↓", None: ""}[metric.higher_is_better]
    return f"{metric.key}: {metric.label}{' (%)' if metric.percent else ''}{better}"


def load_references() -> dict:
    """Published numbers in percent: {data set: {method: {source, backbone, settings, metrics: {metric:
    {category: value}}}}}."""
    return yaml.safe_load(REFERENCES_FILE.read_text()) if REFERENCES_FILE.is_file() else {}


def applicable_reference(references: dict, rows: list[dict]) -> dict:
    """The paper's {metric: {category: value}} for one method label, if all its runs are comparable: the
    paper's data set, backbone (a published WRN50 number says little about our Lite0 runs) and protocol
    (``protocol`` in paper_results.yaml, default a model per category)."""
    dataset = rows[0]["dataset"]
    reference = references.get(dataset, {}).get(rows[0]["method"], {})
    backbone = reference.get("backbone") or ""
    protocol = reference.get("protocol", "per-category")
    settings = {key: str(value) for key, value in (reference.get("settings") or {}).items()}
    comparable = all(
        r["dataset"] == dataset
        and r["backbone"] == backbone
        and r.get("protocol", "per-category") == protocol
        and all(r["overrides"].get(key, value) == value for key, value in settings.items())
        for r in rows
    )
    return reference.get("metrics", {}) if reference and comparable else {}


def published_mean(published: dict, categories: list[str], dataset: str) -> float | None:
    """The paper number beside our mean row: its own mean when we ran all of the data set's categories, else
    the mean of its per-category values over ours (None when one of them has no published value)."""
    if set(categories) == set(BENCHMARK_CATEGORIES.get(dataset, ())) and "mean" in published:
        return published["mean"]
    values = [published.get(c) for c in categories]
    return None if any(v is None for v in values) else mean(values)


def column_mean(values: dict, categories: list[str], label: str) -> list[float] | None:
    """The mean over categories per repeat (seed, draw: those that all categories have); None when a
    category has no result (then there is no fair mean)."""
    per_category = [values.get((c, label)) for c in categories]
    if not all(per_category):
        return None
    seeds = sorted(set.intersection(*(set(v) for v in per_category)))
    return [mean(v[s] for v in per_category) for s in seeds] or None


def summary_tables(rows: list[dict]) -> dict[Metric, Table]:
    """Per reported metric that some successful run returned (:func:`measured_metrics`): categories ×
    method labels (mean ± std over seeds), a mean row, and the paper's value with our difference (Δ) where
    the runs are comparable to it. ``rows`` of one model per category on all training images (protocol
    per-category)."""
    references = load_references()
    labels = sorted({method_label(r) for r in rows})
    categories = sorted({str(r["category"]) for r in rows})
    failed = {(str(r["category"]), method_label(r)) for r in rows if r["status"] != "ok"}
    paper = {
        label: applicable_reference(references, [r for r in rows if method_label(r) == label])
        for label in labels
    }
    tables = {}
    for metric in measured_metrics(rows):
        values = aggregate(rows, metric.key)
        header = ["category"]
        for label in labels:
            header += [label] + ([f"{label.split(' ')[0]} paper", "Δ"] if metric.key in paper[label] else [])
        body = []
        for category in [*categories, "mean"]:
            cells = [category]
            for label in labels:
                if category == "mean":
                    ours = column_mean(values, categories, label)
                    incomplete = any(label == f for _, f in failed)
                else:
                    ours = list(values.get((category, label), {}).values()) or None
                    incomplete = (category, label) in failed
                cells.append(result_cell(ours, incomplete, category == "mean", metric))
                if metric.key in paper[label]:
                    published = paper[label][metric.key]
                    value = (
                        published_mean(published, categories, rows[0]["dataset"])
                        if category == "mean"
                        else published.get(category)
                    )
                    cells += reference_cells(ours, value, metric)
            body.append(cells)
        tables[metric] = (header, body)
    return tables


def measured_metrics(rows: list[dict]) -> list[Metric]:
    """The reported metrics, less those that no successful run returned (the per-sample AUROC of a data set
    without several views per part, pixel metrics without masks); all of them when no run succeeded, so
    that the failures show."""
    ok = [r for r in rows if r["status"] == "ok"]
    return [m for m in reported_metrics() if not ok or any(r.get(m.key) is not None for r in ok)]


def result_cell(values: list[float] | None, incomplete: bool, is_mean: bool, metric: Metric) -> str:
    """Our value, marked ⚠ when some of its runs failed; "failed" when all did, "–" when none ran."""
    if values:
        return format_cell(values, metric) + (" ⚠" if incomplete else "")
    if incomplete:
        return "– ⚠" if is_mean else "failed"
    return "–"


def few_shot_tables(rows: list[dict]) -> dict[Metric, Table]:
    """Per reported metric with few-shot results: a row per (category, method label), a column per k (each
    cell the mean ± std over draws and seeds), and the method's result on all training images where the
    rows hold a run of it (protocol per-category); with several categories, a mean row per method (per
    repeat the mean over categories, as in :func:`summary_tables`)."""
    few = of_protocol(rows, FEW_SHOT)
    ks = sorted({row["shots"] for row in few})
    parts = [[row for row in few if row["shots"] == k] for k in ks] + [of_protocol(rows, PER_CATEGORY)]
    failed = [{(str(r["category"]), method_label(r)) for r in part if r["status"] != "ok"} for part in parts]
    labels = sorted({method_label(row) for row in few})
    categories = sorted({str(row["category"]) for row in few})
    tables = {}
    for metric in reported_metrics():
        values = [aggregate(part, metric.key) for part in parts]
        if not any(values[:-1]):
            continue
        body = []
        for category in [*categories, *(["mean"] if len(categories) > 1 else [])]:
            for label in labels:
                cells = [category, label]
                for by_repeat, failures in zip(values, failed, strict=True):
                    if category == "mean":
                        ours = column_mean(by_repeat, categories, label)
                        incomplete = any(label == f for _, f in failures)
                    else:
                        ours = list(by_repeat.get((category, label), {}).values()) or None
                        incomplete = (category, label) in failures
                    cells.append(result_cell(ours, incomplete, category == "mean", metric))
                body.append(cells)
        tables[metric] = (["category", "method", *(f"k={k}" for k in ks), "all images"], body)
    return tables


def reference_cells(values: list[float] | None, published: float | None, metric: Metric) -> list[str]:
    """The paper's value and our difference in the table's unit (paper_results.yaml: shares in percent)."""
    if published is None:
        return ["–", "–"]
    digits = ".1f" if metric.percent else ".4g"
    ours = (100 if metric.percent else 1) * mean(values) if values else None
    return [f"{published:{digits}}", "–" if ours is None else f"{ours - published:+{digits}}"]


def overview_tables(rows: list[dict]) -> dict[Metric, Table]:
    """Per reported metric that some successful run returned: method labels × data sets, each cell the mean
    over the categories with results
    (± std over seeds), their number where the data set has more, ⚠ where runs failed: one table across
    benchmarks."""
    datasets = sorted({r["dataset"] for r in rows})
    labels = sorted({method_label(r) for r in rows})
    tables = {}
    for metric in measured_metrics(rows):
        body = []
        for label in labels:
            cells = [label]
            for dataset in datasets:
                runs = [r for r in rows if r["dataset"] == dataset and method_label(r) == label]
                categories = sorted({str(r["category"]) for r in runs if r["status"] == "ok"})
                means = column_mean(aggregate(runs, metric.key), categories, label) if categories else None
                total = len(BENCHMARK_CATEGORIES.get(dataset, categories))
                count = f" ({len(categories)}/{total})" if len(categories) < total else ""
                failed = " ⚠" if any(r["status"] != "ok" for r in runs) else ""
                cells.append((format_cell(means, metric) + count if means else "–") + failed)
            body.append(cells)
        tables[metric] = (["method", *datasets], body)
    return tables


def summary_markdown(
    rows: list[dict],
    tables: dict[Metric, Table],
    notes: Sequence[str],
    title: str = "Benchmark summary",
    few_shot: dict[Metric, Table] | None = None,
) -> str:
    """The runs' count, ``tables`` (one model per category, all training images) and the ``few_shot``
    tables (:func:`few_shot_tables`), the failed runs and where the published numbers come from."""
    n_failed = sum(r["status"] != "ok" for r in rows)
    lines = [
        f"# {title}",
        "",
        f"{len(rows)} runs, {n_failed} failed. {VALUES_NOTE}",
    ]
    lines += [f"\n{note}" for note in notes] + [""]
    for metric, table in tables.items():
        lines += [f"## {heading(metric)}", "", *markdown_table(table), ""]
    if few_shot:
        lines += [FEW_SHOT_NOTE, ""]
    for metric, table in (few_shot or {}).items():
        lines += [f"## few-shot {heading(metric)}", "", *markdown_table(table), ""]
    if n_failed:
        lines += ["## Failed runs", ""]
        lines += [
            f"- {method_label(r)} / {r['category']} (seed {r['seed']}{shots_label(r)}): "
            f"{one_line(r['error'])}"
            for r in rows
            if r["status"] != "ok"
        ]
        lines.append("")
    lines += reference_sources(on_all_images(rows))  # the few-shot tables show none
    return "\n".join(lines) + "\n"


def shots_label(row: dict) -> str:
    """``, k=4 draw 1`` for a few-shot run, else nothing (run lists and captions)."""
    return f", k={row['shots']} draw {row['shot_draw']}" if row.get("shots") is not None else ""


def reference_sources(rows: list[dict]) -> list[str]:
    """Where the published numbers beside ``rows`` come from, as Markdown list lines."""
    references = {
        (r["dataset"], r["method"]): reference
        for r in rows
        if (reference := load_references().get(r["dataset"], {}).get(r["method"]))
    }
    if not references:
        return []
    lines = ["Published numbers, shown only beside runs on their data set with the paper's backbone:"]
    for (dataset, method), reference in sorted(references.items()):
        lines.append(f"- {method} on {dataset} ({reference.get('backbone') or 'own network'}): "
                     f"{reference.get('source')}")  # fmt: skip
    return lines


def markdown_table(table: Table) -> list[str]:
    header, body = table
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + [
        "| " + " | ".join(f"**{c}**" if c == "mean" else c for c in cells) + " |" for cells in body
    ]
